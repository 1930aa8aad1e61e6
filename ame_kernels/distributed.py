"""Distributed merges under torchrun (work in progress)."""

from __future__ import annotations

import os
from typing import Optional


def world_from_env() -> Optional[dict]:
    """{'rank', 'world_size', 'local_rank'} when launched by torchrun with WORLD_SIZE > 1, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1 or "RANK" not in os.environ:
        return None
    return {"rank": int(os.environ["RANK"]), "world_size": world, "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}


def main_distributed(args, world: dict) -> int:
    raise NotImplementedError("distributed merges are not implemented yet")
