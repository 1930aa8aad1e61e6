"""Sweeps: choose a merge recipe on held-out data (AME paper, Appendix A.2 and Table 3).

    res = ak.sweep(ingredients, evaluate, {"optimizer": ["adam"], "lr": [1e-3, 1e-2], "epochs": [1, 5]}, top=3)
    res.best, res.best_params, res.best_score, res.table, res.top_soup
    res.to_csv("sweep.csv"); res.plot("sweep.png")

A *candidate* is a dict of keyword arguments to ``ak.merge`` (AME's fields: optimizer, lr,
epochs, batch_size, amplification, pivot, ...; or ``method=`` with that method's parameters). The grid is a dict of lists (their Cartesian product, the
last key varying fastest) or a list of dicts. ``evaluate(merged) -> number`` scores each
candidate (higher is better, ``maximize=False`` for a loss); the table keeps every candidate's
parameters and score, and ``top=n`` adds the uniform soup of the n best merges (the paper's
step 3: rank on validation, keep the top n, ensemble them).

**One read for many candidates** (``merge_many``). Candidates are merged in groups of
``group_size``; within a group the ingredients are walked once, tensor by tensor in element
chunks of ``chunk_elems`` (default: ``CHUNK_BYTES``, 1 MiB of input across the N ingredients),
and every candidate of the group is computed on a chunk while that
chunk is in cache:

- candidates that differ only in coefficients (``method="linear"`` with ``weights`` /
  ``normalize``, and GD-AME, which is linear in the ingredients and the pivot:
  ``schedule.linear_coefficients``) become one row of a [K, N+1] coefficient matrix and are
  computed together in torch, K outputs from one fp32 conversion of the chunk, as
  ``acc[k] = (((w_k0 x_0) + w_k1 x_1) + ...)`` (one rounding per product and per sum, in
  ascending ingredient order, so each output is bit-identical whatever K and the chunk size).
  That is the path off the native cpu backend (GPU tensors, the reference backend) or with
  ``fold=True``; on the cpu backend (``fold='auto'``) the backend's own folded GD kernel is
  faster than torch's elementwise ops, so these candidates run it chunk by chunk like the
  others (a linear candidate runs the linear method's combine pass, bit-identical to
  ``ak.merge(method="linear")`` and ``ak.weighted_soup``);
- other AME candidates (Adam, Adagrad, ...) run the backend's whole-run kernel on the chunk,
  one candidate after another: each output is bit-identical to ``ak.merge`` with the same
  arguments on the same backend (the update is elementwise);
- any other method is passed to ``ak.merge`` as is, one candidate at a time.

``one_pass=False`` runs every candidate through ``ak.merge`` instead (the baseline the
benchmark compares against, ``benchmarks/bench_sweep.py``).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import numbers
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from .api import merge
from .checks import DTYPE_BY_NAME, FLOAT_DTYPES, as_state_dicts, check_all_finite, check_structure, copy_non_float, label, resolve_pivot
from .backends import get_backend
from .config import FIELD_NAMES, make_config
from .errors import MergeError, suggest
from .schedule import linear_coefficients, schedule

#: parameters of the merge methods (``ak.merge(method=...)``), accepted as grid keys; a candidate
#: with a method other than 'ame' and 'linear' goes to ``ak.merge`` as is, which checks them.
METHOD_KEYS = ("method", "weights", "normalize", "base", "density", "lambda_", "lambda", "t", "gamma", "epsilon",
               "count", "transform", "rescale", "k")
KNOWN_KEYS = tuple(FIELD_NAMES) + tuple(k for k in METHOD_KEYS if k not in FIELD_NAMES)
LINEAR_KEYS = ("method", "weights", "normalize", "out_dtype", "backend", "threads", "check_finite")

#: bytes of input per chunk of the one-read pass (all N ingredients together) when chunk_elems is
#: None: about a core's L2, so the K candidates re-read the chunk from cache. Measured on this
#: project's 2-core VM (N = 8 bf16, Adam): 1 MiB chunks (64 Ki elements) gave ~6x per candidate
#: at K = 4, 4 MiB chunks nothing.
CHUNK_BYTES = 1 << 20
DEFAULT_CHUNK_ELEMS = None
DEFAULT_GROUP_SIZE = 8

Grid = Union[Dict[str, Sequence[Any]], Sequence[Dict[str, Any]]]


def _check_keys(keys, where: str) -> None:
    for key in keys:
        if not isinstance(key, str):
            raise MergeError(f"sweep: {where}: keys must be parameter names (strings), got {key!r}")
        if key not in KNOWN_KEYS:
            raise MergeError(f"sweep: {where}: unknown key {key!r}{suggest(key, KNOWN_KEYS)}; "
                             "valid keys are ak.merge's (AMEConfig fields, method parameters)")


def expand_grid(grid: Grid) -> List[Dict[str, Any]]:
    """The candidates of a grid: a dict of lists (Cartesian product, last key fastest; a value
    that is not a list or tuple is a single fixed value) or a list of dicts (as given)."""
    if isinstance(grid, dict):
        if not grid:
            raise MergeError("sweep: the grid is empty (give a dict of lists or a list of dicts)")
        _check_keys(grid.keys(), "grid")
        values = []
        for key, v in grid.items():
            vals = list(v) if isinstance(v, (list, tuple)) else [v]
            if not vals:
                raise MergeError(f"sweep: grid key {key!r} has an empty list of values")
            values.append(vals)
        return [dict(zip(grid.keys(), combo)) for combo in itertools.product(*values)]
    if isinstance(grid, (str, bytes)) or not hasattr(grid, "__iter__"):
        raise MergeError(f"sweep: the grid must be a dict of lists or a list of dicts, got {type(grid).__name__}")
    cands = list(grid)
    if not cands:
        raise MergeError("sweep: the grid is empty (give a dict of lists or a list of dicts)")
    for k, c in enumerate(cands):
        if not isinstance(c, dict):
            raise MergeError(f"sweep: grid entry {k} must be a dict of ak.merge arguments, got {type(c).__name__}")
        _check_keys(c.keys(), f"grid entry {k}")
    return [dict(c) for c in cands]


def describe(params: Dict[str, Any]) -> str:
    """A candidate's parameters as one short line: ``optimizer=adam lr=0.001``."""
    if not params:
        return "(defaults)"
    parts = []
    for k, v in params.items():
        if isinstance(v, torch.Tensor) or isinstance(v, dict):
            v = f"<{type(v).__name__}>"
        parts.append(f"{k}={v}")
    return " ".join(parts)


# --------------------------------------------------------------------------- one read, many outputs


@dataclass
class _Job:
    """One candidate of a group, checked and resolved: kind 'coef' (a row of the coefficient
    matrix), 'ame' (the backend's whole-run kernel per chunk), 'combine' (the linear method's
    combine pass per chunk) or 'merge' (ak.merge as is)."""

    index: int
    params: Dict[str, Any]
    kind: str
    coef: Any = None  # float64 [N+1]: out = sum_i coef[i] x_i + coef[N] * pivot
    pivot: Any = None  # 'coef': None or name -> tensor; 'ame': None (soup), an index or name -> tensor
    plan: Any = None
    cfg: Any = None
    backend: Any = None
    out_dtype: Optional[str] = None
    threads: Optional[int] = None
    check_finite: bool = True


def _linear_row(params: Dict[str, Any], n: int, where: str) -> Any:
    import numpy as np

    extra = sorted(set(params) - set(LINEAR_KEYS))
    if extra:
        raise MergeError(f"{where}: method 'linear' takes weights and normalize, not {extra}")
    w = params.get("weights")
    if w is None:
        w = [1.0] * n
    if isinstance(w, torch.Tensor):
        w = w.tolist()
    if isinstance(w, (str, bytes)) or not hasattr(w, "__iter__"):
        raise MergeError(f"{where}: weights must be a list of {n} numbers (one per ingredient), got {w!r} "
                         "(in a dict grid, a list is the values to try: write one weights vector as [[...]])")
    try:
        a = [float(v) for v in w]
    except (TypeError, ValueError):
        raise MergeError(f"{where}: weights must be numbers, got {w!r}") from None
    if len(a) != n:
        raise MergeError(f"{where}: expected {n} weights (one per ingredient), got {len(a)}")
    if not all(math.isfinite(v) for v in a):
        raise MergeError(f"{where}: every weight must be finite, got {a}")
    normalize = params.get("normalize", True)
    if not isinstance(normalize, bool):
        raise MergeError(f"{where}: normalize must be true or false, got {normalize!r}")
    if normalize:
        total = math.fsum(a)
        if abs(total) <= 1e-6 * math.fsum(abs(v) for v in a):
            raise MergeError(f"{where}: the weights sum to 0 (or nearly), so they cannot be normalised (normalize=False?)")
        a = [v / total for v in a]
    return np.array(a + [0.0], dtype=np.float64)


def _use_coef(fold: Any, backend: Any) -> bool:
    """fold: True (the coefficient matrix), False (the backend kernel), 'auto': the kernel on the
    native cpu backend (its folded GD kernel is faster than torch ops there), the matrix elsewhere."""
    if fold == "auto":
        return getattr(backend, "name", "") != "cpu"
    return bool(fold)


def _prepare(dicts, names, form, index: int, params: Dict[str, Any], fold: Any) -> _Job:
    """Check one candidate before any compute; errors name it."""
    where = f"sweep: candidate {index} ({describe(params)})"
    method = params.get("method")
    n = len(dicts)
    device = dicts[0][names[0]].device if names else torch.device("cpu")
    try:
        if method == "linear":
            out_dtype = params.get("out_dtype")
            if out_dtype is not None and out_dtype not in DTYPE_BY_NAME:
                raise MergeError(f"out_dtype must be one of {', '.join(DTYPE_BY_NAME)}, got {out_dtype!r}")
            row = _linear_row(params, n, where)
            backend = get_backend(params.get("backend", "auto"), device.type)
            if _use_coef(fold, backend):
                return _Job(index, params, "coef", coef=row, out_dtype=out_dtype,
                            check_finite=bool(params.get("check_finite", True)))
            # the linear method's own combine pass, chunk by chunk: ak.merge(method="linear") exactly
            from .methods.combine import CombinePlan

            w = params.get("weights")
            w = [1.0] * n if w is None else [float(v) for v in (w.tolist() if isinstance(w, torch.Tensor) else w)]
            return _Job(index, params, "combine", plan=CombinePlan(n, weight=w, normalize=params.get("normalize", True)),
                        backend=backend, out_dtype=out_dtype, threads=params.get("threads"),
                        check_finite=bool(params.get("check_finite", True)))
        elif method not in (None, "ame"):
            return _Job(index, params, "merge")
        else:
            fields = {k: v for k, v in params.items() if k != "method"}
        bad = sorted(set(fields) - set(FIELD_NAMES))
        if bad:
            raise MergeError(f"{bad} are not AME options (name a method= to use them)")
        cfg = make_config(None, **fields)
        pivot = resolve_pivot(cfg.pivot, dicts, names, form)
        plan = schedule(cfg, n)
        backend = get_backend(cfg.backend, device.type)
        job = _Job(index, params, "ame", pivot=pivot, plan=plan, cfg=cfg, backend=backend, out_dtype=cfg.out_dtype,
                   threads=cfg.threads, check_finite=cfg.check_finite)
        if cfg.optimizer == "sgd" and _use_coef(fold, backend):
            c = linear_coefficients(plan, cfg.adaptive_pivot)
            if c is not None:
                c = c.copy()
                if pivot is None:  # soup: w_0 = mean x_i
                    c[:n] += c[n] / n
                    c[n] = 0.0
                    job.pivot = None
                elif isinstance(pivot, int):
                    c[pivot] += c[n]
                    c[n] = 0.0
                    job.pivot = None
                job.kind, job.coef = "coef", c
        return job
    except MergeError as e:
        msg = str(e)
        msg = msg[len("merge: "):] if msg.startswith("merge: ") else msg
        raise MergeError(f"{where}: {msg}") from None


def check_candidates(ingredients, candidates: Sequence[Dict[str, Any]]) -> None:
    """Check every candidate against the ingredients (names, values, pivots) before any compute;
    a MergeError names the first bad one. Methods other than 'ame' and 'linear' are checked by
    ``ak.merge`` when they run."""
    dicts, form = as_state_dicts(ingredients)
    names = check_structure(dicts)
    for k, c in enumerate(candidates):
        _prepare(dicts, names, form, k, dict(c), fold="auto")


def merge_many(ingredients, candidates: Sequence[Dict[str, Any]], *, chunk_elems: Optional[int] = DEFAULT_CHUNK_ELEMS,
               fold: Any = "auto", inputs_checked: bool = False) -> List[Any]:
    """Merge the ingredients once per candidate (a dict of ``ak.merge`` arguments) in one pass
    over the inputs (module docstring); returns one merged tensor / state dict per candidate,
    as ``ak.merge`` would. ``fold``: where linear and GD-AME candidates run: True, the
    coefficient matrix; False, the backend's kernel, chunk by chunk (bit-identical to ``ak.merge``
    / ``ak.weighted_soup``); 'auto' (default), the kernel on the native cpu backend, else the matrix.
    Every candidate is checked before any compute; an error names the candidate. The inputs'
    NaN/Inf check runs once per call (``inputs_checked=True``: the caller ran it already; ``sweep``
    runs it once for all its groups: on bf16 inputs it can cost more than an Adam merge)."""
    cands = [dict(c) for c in candidates]
    if not cands:
        return []
    if chunk_elems is not None and (isinstance(chunk_elems, bool) or not isinstance(chunk_elems, numbers.Integral)
                                    or chunk_elems < 1):
        raise MergeError(f"sweep: chunk_elems must be None (automatic) or an integer >= 1, got {chunk_elems!r}")
    dicts, form = as_state_dicts(ingredients)
    names = check_structure(dicts)
    if chunk_elems is None:  # CHUNK_BYTES of input across the N ingredients, a multiple of 4096 elements
        width = sum(dicts[i][k].element_size() for i in range(len(dicts)) for k in names[:1]) if names else 1
        chunk_elems = max(4096, (CHUNK_BYTES // max(1, width)) // 4096 * 4096)
    jobs = [_prepare(dicts, names, form, k, p, fold) for k, p in enumerate(cands)]
    if any(j.check_finite for j in jobs if j.kind != "merge"):
        if not inputs_checked:
            check_all_finite(dicts, names)
        for j in jobs:
            if isinstance(j.pivot, dict):
                from .checks import check_reference_finite

                check_reference_finite(j.pivot, names)
    results: List[Any] = [None] * len(jobs)
    for j in jobs:
        if j.kind == "merge":
            try:
                results[j.index] = merge(ingredients, **j.params)
            except MergeError as e:
                raise MergeError(f"sweep: candidate {j.index} ({describe(j.params)}): {e}") from None
    fused = [j for j in jobs if j.kind != "merge"]
    if fused:
        outs = _run_fused(dicts, names, fused, int(chunk_elems))
        for j, out in zip(fused, outs):
            results[j.index] = out if form == "dict" else out[""]
    return results


def _run_fused(dicts, names, jobs: List[_Job], chunk: int) -> List[Dict[str, torch.Tensor]]:
    import numpy as np

    n = len(dicts)
    coef_jobs = [j for j in jobs if j.kind == "coef"]
    ame_jobs = [j for j in jobs if j.kind == "ame"]
    combine_jobs = [j for j in jobs if j.kind == "combine"]
    device = dicts[0][names[0]].device if names else torch.device("cpu")
    if coef_jobs:
        W = torch.tensor(np.stack([j.coef for j in coef_jobs]), dtype=torch.float32, device=device)  # [K, N+1]
        wcols = [W[:, i:i + 1] for i in range(n + 1)]
        sub = max(1024, min(chunk, (1 << 18) // len(coef_jobs)))  # K x sub fp32 = 1 MiB
        acc_buf = torch.empty(len(coef_jobs), sub, dtype=torch.float32, device=device)
        tmp_buf = torch.empty_like(acc_buf)
    outs: List[Dict[str, torch.Tensor]] = [{} for _ in jobs]
    pos = {id(j): r for r, j in enumerate(jobs)}
    for name in names:
        first = dicts[0][name]
        if first.dtype not in FLOAT_DTYPES:
            copy = copy_non_float(dicts, name)
            for r in range(len(jobs)):
                outs[r][name] = copy.clone() if r else copy
            continue
        numel = first.numel()
        flats = [d[name].detach().contiguous().reshape(-1) for d in dicts]
        buf = {}
        for j in jobs:
            dt = DTYPE_BY_NAME[j.out_dtype] if j.out_dtype else first.dtype
            buf[id(j)] = torch.empty(numel, dtype=dt, device=device)
        piv = {id(j): j.pivot[name].detach().to(device).contiguous().reshape(-1)
               for j in jobs if isinstance(j.pivot, dict)}
        for c0 in range(0, numel, chunk):
            c1 = min(numel, c0 + chunk)
            xs = [f[c0:c1] for f in flats]
            for s0 in range(c0, c1, sub) if coef_jobs else ():  # sub-chunks: the [K, C] accumulator in cache
                s1 = min(c1, s0 + sub)
                xf = [f[s0:s1].float() for f in flats]
                acc = torch.mul(wcols[0], xf[0], out=acc_buf[:, :s1 - s0])  # one rounding per product and sum
                tmp = tmp_buf[:, :s1 - s0]
                for i in range(1, n):
                    acc.add_(torch.mul(wcols[i], xf[i], out=tmp))
                for r, j in enumerate(coef_jobs):
                    row = acc[r]
                    if id(j) in piv and j.coef[n] != 0.0:
                        row = row + wcols[n][r] * piv[id(j)][s0:s1].float()
                    buf[id(j)][s0:s1].copy_(row)
            for j in ame_jobs:
                p = piv[id(j)][c0:c1] if id(j) in piv else j.pivot
                j.backend.whole_run(xs, j.plan, p, j.cfg.adaptive_pivot, buf[id(j)][c0:c1], threads=j.threads)
            for j in combine_jobs:
                j.backend.combine(xs, None, buf[id(j)][c0:c1], j.plan, c0, threads=j.threads)
        for j in jobs:
            out = buf[id(j)]
            if out.dtype == torch.float16 and j.check_finite and numel and not bool(torch.isfinite(out).all()):
                raise MergeError(f"sweep: candidate {j.index} ({describe(j.params)}): {label(name)}: merged values "
                                 "exceed the float16 range and were rounded to Inf; use out_dtype='bfloat16' or 'float32'")
            outs[pos[id(j)]][name] = out.reshape(first.shape)
    return outs


def linear_many(ingredients, weights, *, normalize: bool = True, out_dtype: Optional[str] = None,
                chunk_elems: Optional[int] = DEFAULT_CHUNK_ELEMS, check_finite: bool = True, fold: Any = "auto") -> List[Any]:
    """K weighted sums of the N ingredients from one read: ``weights`` is [K, N] (rows of
    per-ingredient weights; each row divided by its sum when ``normalize``). Returns K
    tensors / state dicts, each bit-identical whatever K and ``chunk_elems``."""
    rows = weights.tolist() if isinstance(weights, torch.Tensor) else [list(r) for r in weights]
    cands = [{"method": "linear", "weights": r, "normalize": normalize, "check_finite": check_finite,
              **({"out_dtype": out_dtype} if out_dtype else {})} for r in rows]
    return merge_many(ingredients, cands, chunk_elems=chunk_elems, fold=fold)


# --------------------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    """What ``sweep`` found. ``table``: one dict per candidate, in grid order: ``candidate``
    (its index), its parameters, ``score`` and ``rank`` (1 = best). ``best``: the best merge;
    ``top_soup``: the uniform soup of the ``top`` best merges (None without ``top``)."""

    best: Any
    best_params: Dict[str, Any]
    best_score: float
    table: List[Dict[str, Any]]
    top_soup: Any = None
    top_params: List[Dict[str, Any]] = field(default_factory=list)
    top_soup_score: Optional[float] = None
    maximize: bool = True
    seconds: float = 0.0

    def to_csv(self, path: str) -> None:
        """The table as CSV (list-valued parameters as JSON)."""
        keys: List[str] = ["candidate"]
        for row in self.table:
            for k in row:
                if k not in keys and k not in ("score", "rank"):
                    keys.append(k)
        keys += ["score", "rank"]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            for row in self.table:
                w.writerow([_csv_value(row.get(k, "")) for k in keys])

    def plot(self, path: str) -> Optional[str]:
        """Score against each swept parameter (one panel per parameter that takes more than one
        value), written to ``path``; returns the path, or None when matplotlib is missing."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        swept = []
        for k in self.table[0]:
            if k in ("candidate", "score", "rank"):
                continue
            vals = {_csv_value(r.get(k)) for r in self.table}
            if len(vals) > 1:
                swept.append(k)
        swept = swept or ["candidate"]
        fig, axes = plt.subplots(1, len(swept), figsize=(4 * len(swept), 3.2), squeeze=False)
        scores = [r["score"] for r in self.table]
        for ax, k in zip(axes[0], swept):
            raw = [r.get(k) for r in self.table]
            numeric = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in raw)
            if numeric:
                xs = [float(v) for v in raw]
                ax.scatter(xs, scores, s=18)
                if all(v > 0 for v in xs) and max(xs) / min(xs) >= 100:
                    ax.set_xscale("log")
            else:
                labels = sorted({_csv_value(v) for v in raw})
                xs = [labels.index(_csv_value(v)) for v in raw]
                ax.scatter(xs, scores, s=18)
                ax.set_xticks(range(len(labels)))
                ax.set_xticklabels(labels, rotation=30, fontsize=7)
            ax.set_xlabel(k)
            ax.set_ylabel("score")
            ax.axhline(self.best_score, color="gray", lw=0.7, ls="--")
        fig.suptitle(f"sweep: {len(self.table)} candidates, best {self.best_score:.4g} ({describe(self.best_params)})",
                     fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _csv_value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return json.dumps(v.tolist()) if v.numel() <= 64 else f"<tensor {tuple(v.shape)}>"
    if isinstance(v, dict):
        return "<state dict>"
    if isinstance(v, (list, tuple)):
        try:
            return json.dumps(list(v))
        except TypeError:
            return str(list(v))
    return v


def _score(evaluate: Callable, model: Any, index: int, params: Dict[str, Any], where: Optional[str] = None) -> float:
    where = where or f"sweep: candidate {index} ({describe(params)})"
    try:
        s = evaluate(model)
    except MergeError:
        raise
    except Exception as e:  # noqa: BLE001 (the user's evaluate: name the candidate, keep the cause)
        raise MergeError(f"{where}: evaluate raised {type(e).__name__}: {e}") from e
    if isinstance(s, torch.Tensor) and s.numel() == 1:
        s = s.item()
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        raise MergeError(f"{where}: evaluate must return a number, got {type(s).__name__} {s!r}")
    return float(s)


def sweep(ingredients, evaluate: Callable[[Any], float], grid: Grid, top: Optional[int] = None, *,
          maximize: bool = True, one_pass: bool = True, group_size: int = DEFAULT_GROUP_SIZE,
          chunk_elems: Optional[int] = DEFAULT_CHUNK_ELEMS, progress: Union[bool, Callable[[str], None]] = False,
          evaluate_top_soup: bool = True) -> SweepResult:
    """Merge the ingredients once per candidate of ``grid`` and rank the merges by ``evaluate``.

    ingredients: as ``ak.merge`` (tensors or state dicts); evaluate: merged model -> number
    (higher is better; ``maximize=False`` for a loss; NaN ranks last, with a warning);
    grid: a dict of lists or a list of dicts of ``ak.merge`` arguments (``expand_grid``);
    top: also return the uniform soup of the ``top`` best merges (and its score when
    ``evaluate_top_soup``). one_pass / group_size / chunk_elems: ``merge_many`` groups
    (``group_size`` merged models are in memory at a time, plus the ``top`` best).
    progress: True prints one line per candidate to stderr; a callable receives the lines.
    """
    t_start = time.perf_counter()
    if not callable(evaluate):
        raise MergeError(f"sweep: evaluate must be callable (merged model -> score), got {type(evaluate).__name__}")
    cands = expand_grid(grid)
    k_total = len(cands)
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, numbers.Integral) or not 1 <= top <= k_total:
            raise MergeError(f"sweep: top must be an integer in [1, {k_total}] (the number of candidates), got {top!r}")
        top = int(top)
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise MergeError(f"sweep: group_size must be an integer >= 1, got {group_size!r}")
    log = progress if callable(progress) else ((lambda line: print(line, file=sys.stderr)) if progress else None)
    check_candidates(ingredients, cands)  # every candidate checked before any compute
    inputs_checked = False
    if one_pass and any(c.get("check_finite", True) for c in cands):
        dicts, _ = as_state_dicts(ingredients)
        check_all_finite(dicts, check_structure(dicts))  # once for the sweep, not once per group
        inputs_checked = True

    sign = 1.0 if maximize else -1.0
    keep = max(1, top or 1)
    kept: List[tuple] = []  # (sort key, index, model), best first, at most `keep`
    table: List[Dict[str, Any]] = []
    for g0 in range(0, k_total, group_size):
        group = cands[g0:g0 + group_size]
        t0 = time.perf_counter()
        if one_pass:
            models = merge_many(ingredients, group, chunk_elems=chunk_elems, inputs_checked=inputs_checked)
        else:
            models = []
            for k, c in enumerate(group, start=g0):
                try:
                    models.append(merge(ingredients, **c))
                except MergeError as e:
                    raise MergeError(f"sweep: candidate {k} ({describe(c)}): {e}") from None
        t_merge = (time.perf_counter() - t0) / len(group)
        for k, (c, model) in enumerate(zip(group, models), start=g0):
            t1 = time.perf_counter()
            s = _score(evaluate, model, k, c)
            if math.isnan(s):
                warnings.warn(f"sweep: candidate {k} ({describe(c)}): evaluate returned NaN; ranked last", stacklevel=2)
            table.append({"candidate": k, **c, "score": s})
            key = (0 if math.isnan(s) else 1, sign * s if not math.isnan(s) else 0.0, -k)  # higher is better; ties: earlier
            kept.append((key, k, model))
            kept.sort(key=lambda e: e[0], reverse=True)
            del kept[keep:]
            if log is not None:
                log(f"sweep: [{k + 1}/{k_total}] {describe(c)}: score {s:.6g} "
                    f"(merge {t_merge:.3g}s, evaluate {time.perf_counter() - t1:.3g}s)")
        del models
    order = sorted(range(k_total), key=lambda i: (0 if math.isnan(table[i]["score"]) else 1,
                                                  sign * table[i]["score"] if not math.isnan(table[i]["score"]) else 0.0,
                                                  -i), reverse=True)
    if math.isnan(table[order[0]]["score"]):
        raise MergeError(f"sweep: evaluate returned NaN for every one of the {k_total} candidates")
    for rank, i in enumerate(order, start=1):
        table[i]["rank"] = rank
    best_i = kept[0][1]
    result = SweepResult(best=kept[0][2], best_params=dict(cands[best_i]), best_score=table[best_i]["score"],
                         table=table, maximize=maximize)
    if top is not None:
        from .soups import uniform_soup

        models = [m for _, _, m in kept[:top]]
        result.top_params = [dict(cands[i]) for _, i, _ in kept[:top]]
        result.top_soup = uniform_soup(models)
        if evaluate_top_soup:
            result.top_soup_score = _score(evaluate, result.top_soup, -1, {}, where=f"sweep: the top-{top} soup")
            if log is not None:
                log(f"sweep: uniform soup of the top {top}: score {result.top_soup_score:.6g}")
    result.seconds = time.perf_counter() - t_start
    return result


__all__ = ["SweepResult", "check_candidates", "expand_grid", "linear_many", "merge_many", "sweep"]
