"""What every ame-merge entry path shares (one process, torchrun ranks, strategies): the exit
codes, the one-line error, and a config file + flags turned into a checked MergePlan.

A module of its own so that ``cli`` and ``distributed`` both import it and neither imports
the other."""

from __future__ import annotations

import argparse
import sys

from .errors import MergeError
from .spec import UsageError, check_call, float_arg, load_spec

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: flags that override a config key, and how an error names them
FLAGS = {"backend": "--backend", "threads": "--threads", "out_dtype": "--out-dtype"}


#: the longest error line printed; a longer one (a value quoted from a hostile file) is cut in the middle
MAX_ERROR_CHARS = 1000


def error(msg: str) -> None:
    if len(msg) > MAX_ERROR_CHARS:
        cut = len(msg) - MAX_ERROR_CHARS + 200
        msg = f"{msg[: MAX_ERROR_CHARS - 400]} ...[{cut} characters cut]... {msg[-200:]}"
    print(f"ame-merge: error: {msg}", file=sys.stderr)


def prepare(args: argparse.Namespace):
    """Config file + flags -> a checked MergePlan (UsageError/MergeError before any work)."""
    from .engine import DEFAULT_CHUNK_MB, DEFAULT_SHARD_SIZE, parse_size, plan_merge

    spec = load_spec(args.config)
    overrides = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    try:
        check_call(spec, overrides)
    except MergeError as e:
        msg = str(e)
        for k, flag in FLAGS.items():
            if k in overrides:
                msg = msg.replace(f"AMEConfig.{k}", flag)
        raise UsageError(msg) from None
    chunk_mb = float_arg(args.chunk_mb, "--chunk-mb") if args.chunk_mb is not None else spec.engine.get("chunk_mb", DEFAULT_CHUNK_MB)
    if not (chunk_mb > 0 and chunk_mb != float("inf")):
        raise UsageError(f"--chunk-mb: must be a number > 0, got {args.chunk_mb!r}")
    if args.shard_size is not None:
        try:
            shard_size = parse_size(args.shard_size, "--shard-size")
        except MergeError as e:
            raise UsageError(str(e)) from None
    else:
        shard_size = spec.engine.get("shard_size", DEFAULT_SHARD_SIZE)
    device = str(args.device if args.device is not None else spec.engine.get("device", "cpu"))
    return plan_merge(spec.models, None, pivot_path=spec.pivot_path, chunk_mb=chunk_mb, shard_size=shard_size,
                      device=device, method=spec.method, base=spec.base, per_model=spec.per_model,
                      **{**spec.options, **overrides})
