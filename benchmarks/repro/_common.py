"""Small helpers shared by the reproduction scripts: tables, machine line, result paths."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import List, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent.parent

if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))


def machine() -> str:
    import torch

    return (
        f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"python {platform.python_version()}"
    )


def results_dir(out: str | os.PathLike | None = None) -> Path:
    d = Path(out) if out is not None else RESULTS
    d.mkdir(parents=True, exist_ok=True)
    return d


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join(str(c) for c in r) + "\n")


def mean_std(xs: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    a = np.asarray(list(xs), dtype=np.float64) * scale
    if a.size == 1:
        return f"{a[0]:.{digits}f}"
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}"


def iqr(xs: Sequence[float]) -> List[float]:
    a = np.asarray(list(xs), dtype=np.float64)
    return [float(np.percentile(a, 25)), float(np.percentile(a, 75))]
