"""Soupability diagnostics: how alike are the ingredients, and how would their soup sit among them?

    d = diagnostics([sd_a, sd_b, sd_c])                 # or checkpoint paths; base= for task vectors
    print(d.table()); d.summary["flags"]; d.model.cosine
    soup_gain(loss_soup, [loss_a, loss_b])              # "Too Salty", sec. 1.4

For the vectors v_i = x_i (or x_i - base, the task vectors, when ``base`` is given)
of every floating tensor and of the whole model (all floating tensors
concatenated), it reports the pairwise cosine similarity, the pairwise L2
distance ||x_i - x_j|| (the same with or without base), each ingredient's
distance to the uniform soup, the norms, and the soup's norm relative to the
mean norm (``norm_ratio``, 1 when all v_i agree; "Rethinking weight-averaged
merging" sec. 5: averaging shrinks magnitude, and strong shrinkage means the
ingredients' weights disagree).

One streaming pass with bounded memory: tensor by tensor, in element chunks of
``chunk_mb`` per ingredient (float64), it accumulates two N x N Gram matrices
in float64, of the v_i and of the v_i centred on their chunk mean (distances
come from the centred one, so close ingredients lose no precision to
cancellation). Only N chunks are in memory at a time; checkpoint paths are read
lazily through the engine's reader (``ame_kernels.io``, memory-mapped).

The summary's flags are heuristics, with thresholds in ``DEFAULT_THRESHOLDS``
(overridable) that no measurement here calibrates: the table lists the crossed ones with
their numbers and gives no verdict (the digits demo's ingredients, fine-tunes of one init,
cross the cosine and norm-ratio ones, and their soup beats the best ingredient by 19 points
on test). They are: low whole-model cosine of the weights (no shared trajectory:
"Too Salty" finds such soups often collapse), strong norm shrinkage, opposing
task vectors, an outlier ingredient far from the soup (warnings), and
near-duplicates, whose soup gains little (a note: "Too Salty" sec. 2.2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .config import resolve_config_path
from .errors import MergeError

DEFAULT_CHUNK_MB = 32

#: Heuristic thresholds of the summary flags (see the module docstring).
DEFAULT_THRESHOLDS = {
    "min_cosine": 0.9,  # weights: a pair below this shares little of its trajectory
    # task vectors: a pair below this pulls in opposing directions (independent updates are ~0)
    "min_task_cosine": -0.1,
    "min_norm_ratio": 0.9,  # weights: ||soup|| / mean ||x_i|| below this: the soup shrinks
    "min_tensor_norm_ratio": 0.5,  # weights, any one tensor
    "near_duplicate": 1e-3,  # max pairwise L2 / mean norm below this: little to gain
    "outlier": 3.0,  # distance to the soup above this many times the median (N >= 3)
}

_FLOAT_NAMES = ("float64", "float32", "bfloat16", "float16")


# --------------------------------------------------------------------------- sources


class _TorchSource:
    """A state dict (or a tensor, under the name '') read chunk by chunk as float64."""

    def __init__(self, sd: Mapping[str, Any], label: str):
        import torch

        self.label = label
        self.sd = sd
        self.names = list(sd.keys())
        self._flat = (None, None)  # (name, flat view): a non-contiguous tensor is flattened once, not per chunk
        for k in self.names:
            if not isinstance(sd[k], torch.Tensor):
                raise MergeError(f"diagnostics: {label}: {_lbl(k)} is a {type(sd[k]).__name__}, not a tensor")
            if sd[k].device.type == "meta":
                raise MergeError(f"diagnostics: {label}: {_lbl(k)} is a meta tensor (shape only, no data); materialise it first")

    def shape(self, name: str) -> tuple:
        return tuple(self.sd[name].shape)

    def dtype(self, name: str) -> str:
        return str(self.sd[name].dtype).replace("torch.", "")

    def read(self, name: str, start: int, count: int) -> np.ndarray:
        import torch

        if self._flat[0] != name:
            self._flat = (name, self.sd[name].detach().reshape(-1))
        t = self._flat[1][start : start + count]
        return t.to(device="cpu", dtype=torch.float64).numpy()

    def close(self) -> None:
        self._flat = (None, None)


class _CheckpointSource:
    """A checkpoint on disk (folder or file), memory-mapped by the engine's reader."""

    def __init__(self, path: str, label: str):
        try:
            from .io.checkpoint import open_checkpoint
        except ImportError as e:  # pragma: no cover (the io package ships with the library)
            raise MergeError(f"diagnostics: reading checkpoint paths needs ame_kernels.io ({e})") from None
        self.label = label
        self.ckpt = open_checkpoint(path)
        self.names = list(self.ckpt.tensors)

    def shape(self, name: str) -> tuple:
        return tuple(self.ckpt.tensors[name].shape)

    def dtype(self, name: str) -> str:
        return self.ckpt.tensors[name].dtype

    def read(self, name: str, start: int, count: int) -> np.ndarray:
        info = self.ckpt.tensors[name]
        v = self.ckpt.view(name, start, count)
        if info.dtype == "bfloat16":  # numpy has no bfloat16: the file's uint16 bits are the top half of an fp32
            v = (v.astype(np.uint32) << 16).view(np.float32)
        out = v.astype(np.float64)
        reader = self.ckpt.reader(info)
        if hasattr(reader, "release"):
            reader.release(info, start, count)
        return out

    def close(self) -> None:
        self.ckpt.close()


def _lbl(name: str) -> str:
    return f"tensor {name!r}" if name else "the tensor"


def _open(x: Any, label: str):
    import torch

    if isinstance(x, (str, os.PathLike)):
        return _CheckpointSource(os.fspath(x), label)
    if isinstance(x, torch.Tensor):
        return _TorchSource({"": x}, label)
    if isinstance(x, Mapping):
        return _TorchSource(x, label)
    raise MergeError(f"diagnostics: {label} must be a tensor, a state dict or a checkpoint path, got {type(x).__name__}")


# --------------------------------------------------------------------------- results


@dataclass
class PairStats:
    """Statistics of N vectors from their Gram matrices (float64)."""

    numel: int
    norms: np.ndarray  # [N] ||v_i||
    cosine: np.ndarray  # [N, N] (NaN where a norm is 0)
    l2: np.ndarray  # [N, N] ||x_i - x_j||
    dist_to_soup: np.ndarray  # [N] ||x_i - mean_j x_j||
    soup_norm: float  # ||mean_i v_i||
    norm_ratio: float  # soup_norm / mean_i ||v_i|| (NaN if the mean norm is 0)

    @classmethod
    def from_gram(cls, gram: np.ndarray, centred: np.ndarray, numel: int) -> "PairStats":
        n = gram.shape[0]
        diag = np.clip(np.diag(gram), 0.0, None)
        norms = np.sqrt(diag)
        with np.errstate(divide="ignore", invalid="ignore"):
            outer = np.outer(norms, norms)
            cosine = np.where(outer > 0, gram / np.where(outer > 0, outer, 1.0), np.nan)
        cosine = np.clip(cosine, -1.0, 1.0)
        np.fill_diagonal(cosine, np.where(norms > 0, 1.0, np.nan))
        cd = np.diag(centred)
        l2 = np.sqrt(np.clip(cd[:, None] + cd[None, :] - 2.0 * centred, 0.0, None))
        np.fill_diagonal(l2, 0.0)
        dist = np.sqrt(np.clip(cd, 0.0, None))
        soup_norm = math.sqrt(max(float(gram.sum()) / (n * n), 0.0))
        mean_norm = float(norms.mean())
        ratio = soup_norm / mean_norm if mean_norm > 0 else float("nan")
        return cls(numel, norms, cosine, l2, dist, soup_norm, ratio)

    def to_dict(self) -> dict:
        def clean(a):
            return [clean(x) for x in a] if isinstance(a, (list, np.ndarray)) else (None if not math.isfinite(a) else float(a))

        return {
            "numel": self.numel,
            "norms": clean(self.norms),
            "cosine": clean(self.cosine),
            "l2": clean(self.l2),
            "dist_to_soup": clean(self.dist_to_soup),
            "soup_norm": clean(self.soup_norm),
            "norm_ratio": clean(self.norm_ratio),
        }


@dataclass
class Diagnostics:
    """Result of ``diagnostics``: whole-model and per-tensor PairStats and a summary with flags."""

    n: int
    labels: List[str]
    relative_to: str  # 'weights' or 'task vectors'
    model: PairStats
    tensors: Dict[str, PairStats]
    skipped: List[str]  # non-floating tensors (not compared)
    summary: dict = field(default_factory=dict)
    #: per pair, from the models' outputs on held-out data (``model=``, ``data=``): KL and MSE of
    #: logits, linear CKA of logits and features, and the measured soup gain (soupability module)
    outputs: List[dict] = field(default_factory=list)

    @property
    def flags(self) -> List[dict]:
        return self.summary.get("flags", [])

    @property
    def soupable(self) -> bool:
        """No warning flag was raised (notes do not count)."""
        return self.summary.get("soupable", True)

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "labels": self.labels,
            "relative_to": self.relative_to,
            "model": self.model.to_dict(),
            "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
            "skipped": self.skipped,
            "summary": self.summary,
            "outputs": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in self.outputs],
        }

    def table(self, top: int = 10) -> str:
        """A plain-text report: models, whole-model matrices, the least similar tensors, flags."""
        m, n = self.model, self.n
        lines = [
            f"{n} models, {len(self.tensors)} floating tensors ({m.numel:,} parameters), "
            f"compared as {self.relative_to}" + (f"; {len(self.skipped)} non-floating tensors skipped" if self.skipped else ""),
            "",
            f"{'model':>6}  {'norm':>12}  {'dist to soup':>12}  path",
        ]
        for i in range(n):
            lines.append(f"{f'[{i}]':>6}  {_fmt(m.norms[i]):>12}  {_fmt(m.dist_to_soup[i]):>12}  {self.labels[i]}")
        for title, mat in (("pairwise cosine similarity (whole model)", m.cosine), ("pairwise L2 distance (whole model)", m.l2)):
            lines += ["", title, "      " + "".join(f"{f'[{j}]':>12}" for j in range(n))]
            for i in range(n):
                lines.append(f"{f'[{i}]':>6}" + "".join(f"{_fmt(mat[i, j]):>12}" for j in range(n)))
        lines += ["", f"soup norm {_fmt(m.soup_norm)}, norm ratio (||soup|| / mean ||x_i||) {_fmt(m.norm_ratio)}"]
        worst = self.summary.get("least_similar_tensors", [])[:top]
        if worst:
            lines += ["", f"least similar tensors (lowest min cosine, top {len(worst)})",
                      f"{'min cos':>10}  {'max L2':>12}  {'norm ratio':>10}  name"]
            for row in worst:
                cos = _fmt(row["min_cosine"]) if row["min_cosine"] is not None and math.isfinite(row["min_cosine"]) else "zero norm"
                lines.append(f"{cos:>10}  {_fmt(row['max_l2']):>12}  {_fmt(row['norm_ratio']):>10}  {row['name']}")
        zero = self.summary.get("zero_norm_tensors", [])
        if zero:
            shown = ", ".join(zero[:5]) + (f" and {len(zero) - 5} more" if len(zero) > 5 else "")
            lines += ["", f"zero in some model, no cosine (not counted as least similar): {shown}"]
        # No verdict: the thresholds are heuristics that no measurement here calibrates (the demo's ingredients
        # cross two of them and their soup beats the best ingredient by 19 points), so the numbers are shown.
        if self.flags:
            lines += ["", "threshold checks (heuristics, not a prediction; the soup's own score is the test):"]
            lines += [f"  {f['code']}: {f['message']}" for f in self.flags]
        else:
            lines += ["", "threshold checks: none crossed (heuristics, not a prediction)"]
        if self.outputs:
            lines += ["", "from the outputs on the held-out data (KL/MSE of logits, linear CKA; gain = measured soup gain):",
                      f"{'pair':>8}  {'KL':>10}  {'MSE':>10}  {'CKA logits':>10}  {'CKA feat.':>10}  {'soup gain':>10}"]
            for r in self.outputs:
                i, j = r["pair"]
                lines.append(f"{f'{i}-{j}':>8}  {r['kl']:>10.4g}  {r['mse']:>10.4g}  {r['cka_logits']:>10.4f}  "
                             f"{r['cka_features']:>10.4f}  {r['gain']:>10.4g}")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "nan"
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


# --------------------------------------------------------------------------- the pass


def _check_structure(sources: list, base) -> tuple:
    """(float names, skipped names), after checking names, shapes and kinds from metadata only."""
    first = sources[0]
    names = first.names
    ref = set(names)
    for s in sources[1:] + ([base] if base is not None else []):
        keys = set(s.names)
        if s is base:
            missing = sorted(k for k in ref - keys if first.dtype(k) in _FLOAT_NAMES)
            if missing:
                raise MergeError(f"diagnostics: the base lacks {missing}")
            continue
        if keys != ref:
            raise MergeError(
                f"diagnostics: {s.label} does not match {first.label}: missing {sorted(ref - keys) or 'none'}, "
                f"extra {sorted(keys - ref) or 'none'}"
            )
    floats, skipped = [], []
    for k in names:
        is_float = first.dtype(k) in _FLOAT_NAMES
        for s in sources[1:] + ([base] if base is not None else []):
            if s.shape(k) != first.shape(k):
                raise MergeError(f"diagnostics: {_lbl(k)} has shape {s.shape(k)} in {s.label} but {first.shape(k)} in {first.label}")
            if s is not base and (s.dtype(k) in _FLOAT_NAMES) != is_float:
                raise MergeError(f"diagnostics: {_lbl(k)} is {s.dtype(k)} in {s.label} but {first.dtype(k)} in {first.label}")
            if s is base and is_float and s.dtype(k) not in _FLOAT_NAMES:
                raise MergeError(f"diagnostics: {_lbl(k)} of the base is {s.dtype(k)}, not floating")
        (floats if is_float else skipped).append(k)
    return floats, skipped


def diagnostics(
    ingredients: Sequence[Any],
    base: Any = None,
    *,
    chunk_mb: float = DEFAULT_CHUNK_MB,
    thresholds: Optional[dict] = None,
    labels: Optional[Sequence[str]] = None,
    model: Any = None,
    data: Any = None,
    loss_fn: Any = None,
    head: Optional[str] = None,
    higher_is_better: bool = False,
) -> Diagnostics:
    """Pairwise similarity of ``ingredients`` (tensors, state dicts or checkpoint paths), see the module docstring.

    base: a tensor / state dict / path: compare task vectors x_i - base instead of weights.
    chunk_mb: float64 chunk per ingredient (memory ~ (N + 2) x chunk_mb).
    thresholds: overrides of DEFAULT_THRESHOLDS. labels: names for the report (default: paths or indices).
    model, data (with loss_fn, head, higher_is_better): the architecture (an nn.Module) and held-out
        (inputs, targets) batches: adds, per pair, what the outputs say (``Diagnostics.outputs``:
        ``soupability.output_diagnostics``: KL, MSE, CKA of logits and features, the soup gain).
    """
    if (model is None) != (data is None):
        raise MergeError("diagnostics: give model= and data= together (the architecture and held-out batches)")
    import torch

    if isinstance(ingredients, (dict, str, os.PathLike)):
        raise MergeError("diagnostics: ingredients must be a list (of tensors, state dicts or checkpoint paths)")
    if isinstance(ingredients, torch.Tensor):
        ingredients = list(ingredients.unbind(0)) if ingredients.dim() >= 1 else [ingredients]
    items = list(ingredients)
    if len(items) < 2:
        raise MergeError(f"diagnostics: need at least 2 ingredients to compare, got {len(items)}")
    th = dict(DEFAULT_THRESHOLDS)
    for k, v in (thresholds or {}).items():
        if k not in th:
            raise MergeError(f"diagnostics: unknown threshold {k!r}; known: {', '.join(th)}")
        try:
            th[k] = float(v)
        except (TypeError, ValueError):
            raise MergeError(f"diagnostics: threshold {k!r} must be a number, got {v!r}") from None
        if math.isnan(th[k]):
            raise MergeError(f"diagnostics: threshold {k!r} must be a number, got NaN")
    try:
        chunk_mb = float(chunk_mb)
    except (TypeError, ValueError):
        raise MergeError(f"diagnostics: chunk_mb must be a number, got {chunk_mb!r}") from None
    if not (chunk_mb > 0 and math.isfinite(chunk_mb)):
        raise MergeError(f"diagnostics: chunk_mb must be a finite number > 0, got {chunk_mb}")
    n = len(items)
    if labels is None:
        labels = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"ingredient {i}" for i, x in enumerate(items)]
    elif len(labels) != n:
        raise MergeError(f"diagnostics: expected {n} labels, got {len(labels)}")
    labels = [str(x) for x in labels]
    kinds = {type(x).__name__ for x in items if not isinstance(x, (str, os.PathLike, Mapping, torch.Tensor))}
    if kinds:
        raise MergeError(f"diagnostics: ingredients must be tensors, state dicts or checkpoint paths, got {sorted(kinds)}")
    if any(isinstance(x, torch.Tensor) for x in items) and not all(isinstance(x, torch.Tensor) for x in items):
        raise MergeError("diagnostics: ingredients must be all tensors or all state dicts / paths")
    sources: list = []
    base_src = None
    try:
        for i, x in enumerate(items):
            sources.append(_open(x, labels[i]))
        if base is not None:
            base_src = _open(base, "the base")
        floats, skipped = _check_structure(sources, base_src)
        chunk = max(1, int(chunk_mb * 2**20) // 8)
        gram_total = np.zeros((n, n))
        centred_total = np.zeros((n, n))
        per_tensor: Dict[str, PairStats] = {}
        total = 0
        for name in floats:
            numel = int(np.prod(sources[0].shape(name), dtype=np.int64))
            gram = np.zeros((n, n))
            centred = np.zeros((n, n))
            for start in range(0, numel, chunk):
                count = min(chunk, numel - start)
                x = np.empty((n, count))
                for i, s in enumerate(sources):
                    x[i] = s.read(name, start, count)
                if not np.isfinite(x).all():
                    bad = [labels[i] for i in range(n) if not np.isfinite(x[i]).all()]
                    raise MergeError(f"diagnostics: {_lbl(name)} contains NaN or Inf in {', '.join(bad)}")
                if base_src is not None:
                    b = base_src.read(name, start, count)
                    if not np.isfinite(b).all():
                        raise MergeError(f"diagnostics: {_lbl(name)} contains NaN or Inf in the base")
                    x -= b
                gram += x @ x.T
                x -= x.mean(axis=0)  # centred: distances without cancellation
                centred += x @ x.T
                del x
            per_tensor[name] = PairStats.from_gram(gram, centred, numel)
            gram_total += gram
            centred_total += centred
            total += numel
    finally:
        for s in sources + ([base_src] if base_src is not None else []):
            s.close()
    stats = PairStats.from_gram(gram_total, centred_total, total)
    result = Diagnostics(n, labels, "task vectors" if base is not None else "weights", stats, per_tensor, skipped)
    result.summary = _summarise(result, th)
    if model is not None:
        from .soupability import output_diagnostics
        from .strategies import load_state_dict

        sds = [load_state_dict(str(x)) if isinstance(x, (str, os.PathLike)) else x for x in items]
        result.outputs = output_diagnostics(sds, model, data, loss_fn=loss_fn, head=head,
                                            higher_is_better=higher_is_better)
    return result


def _offdiag(mat: np.ndarray) -> np.ndarray:
    n = mat.shape[0]
    return mat[~np.eye(n, dtype=bool)]


def _summarise(d: Diagnostics, th: dict) -> dict:
    m, n = d.model, d.n
    task = d.relative_to == "task vectors"
    cos, l2 = _offdiag(m.cosine), _offdiag(m.l2)
    flags: List[dict] = []

    def flag(level: str, code: str, message: str) -> None:
        flags.append({"level": level, "code": code, "message": message})

    def worst_pair(mat: np.ndarray, lowest: bool = True):
        a = np.where(np.eye(n, dtype=bool), np.inf if lowest else -np.inf, np.nan_to_num(mat, nan=np.inf if lowest else -np.inf))
        i, j = np.unravel_index(np.argmin(a) if lowest else np.argmax(a), a.shape)
        return int(i), int(j)

    if m.numel == 0:
        flag("note", "empty", "no floating parameters to compare")
    elif np.isnan(cos).any():
        flag("warning", "zero_vector", "an ingredient has a zero " + ("task vector (it equals the base)" if task else "weight vector"))
    else:
        i, j = worst_pair(m.cosine)
        limit = th["min_task_cosine"] if task else th["min_cosine"]
        if m.cosine[i, j] < limit:
            if task:
                flag("warning", "opposing_task_vectors",
                     f"the task vectors of [{i}] and [{j}] have cosine {m.cosine[i, j]:.4f} < {limit:g}: their updates pull in "
                     "opposing directions and cancel in the soup")
            else:
                flag("warning", "low_similarity",
                     f"lowest whole-model cosine {m.cosine[i, j]:.4f} ([{i}] and [{j}]) < {limit:g}: models trained "
                     "apart (no shared init) sit near 0 and do not soup (Too Salty); fine-tunes of one init can sit "
                     f"below {limit:g} and soup well")
        # Task vectors shrink in a soup by design (orthogonal ones to 1/sqrt(N)): the
        # shrinkage warnings are about weights only.
        if not task and m.norm_ratio < th["min_norm_ratio"]:
            flag("warning", "norm_shrinkage",
                 f"the soup's norm is {m.norm_ratio:.4f} of the mean norm (< {th['min_norm_ratio']:g}): "
                 "averaging cancels part of the ingredients' weights (Rethinking weight-averaged merging, sec. 5)")
        shrunk = [] if task else sorted(
            (s.norm_ratio, k) for k, s in d.tensors.items()
            if s.numel > 1 and math.isfinite(s.norm_ratio) and s.norm_ratio < th["min_tensor_norm_ratio"])
        if shrunk:
            names = ", ".join(f"{k!r} ({r:.3f})" for r, k in shrunk[:3])
            flag("warning", "tensor_norm_shrinkage",
                 f"{len(shrunk)} tensor(s) keep less than {th['min_tensor_norm_ratio']:g} of their mean norm in the soup: {names}")
        mean_norm = float(m.norms.mean())
        if mean_norm > 0 and float(l2.max()) / mean_norm < th["near_duplicate"]:
            flag("note", "near_duplicates",
                 f"the largest pairwise distance is {float(l2.max()) / mean_norm:.2e} of the mean norm: the ingredients are "
                 "near-duplicates, so the soup will gain little (Too Salty)")
        if n >= 3:
            med = float(np.median(m.dist_to_soup))
            far = [i for i in range(n) if med > 0 and m.dist_to_soup[i] > th["outlier"] * med]
            if far:
                flag("warning", "outlier",
                     f"{', '.join(f'[{i}]' for i in far)} lie(s) more than {th['outlier']:g}x the median distance from the soup: "
                     "consider leaving them out (or a greedy soup)")
    rows, zero_norm = [], []
    for k, s in d.tensors.items():
        if s.numel == 0:
            continue
        if not (s.norms > 0).all():  # zero in some model (a zero-initialised bias): no cosine to rank it by
            zero_norm.append(k)
            continue
        oc = _offdiag(s.cosine)
        rows.append({
            "name": k,
            "min_cosine": float(np.nanmin(oc)) if np.isfinite(oc).any() else float("nan"),
            "max_l2": float(_offdiag(s.l2).max()),
            "norm_ratio": s.norm_ratio,
        })
    rows.sort(key=lambda r: r["min_cosine"])

    def clean(x):
        return None if x is None or not math.isfinite(x) else float(x)

    return {
        "relative_to": d.relative_to,
        "parameters": m.numel,
        "cosine": {"min": clean(float(cos.min())) if cos.size else None, "mean": clean(float(cos.mean())) if cos.size else None,
                   "max": clean(float(cos.max())) if cos.size else None},
        "l2": {"min": float(l2.min()), "mean": float(l2.mean()), "max": float(l2.max())},
        "dist_to_soup": [float(v) for v in m.dist_to_soup],
        "norm_ratio": clean(m.norm_ratio),
        "least_similar_tensors": [{k: (clean(v) if k != "name" else v) for k, v in r.items()} for r in rows[:20]],
        "zero_norm_tensors": zero_norm,
        "flags": flags,
        "soupable": not any(f["level"] == "warning" for f in flags),
        "thresholds": th,
    }


# --------------------------------------------------------------------------- soup gain


def soup_gain(loss_soup: float, losses_ingredients: Sequence[float], higher_is_better: bool = False) -> float:
    """"Too Salty" soup gain: min_i L(x_i) - L(soup) (positive: the soup beats every ingredient).

    With ``higher_is_better=True`` (accuracy): A(soup) - max_i A(x_i).
    """
    try:
        soup = float(loss_soup)
        vals = [float(v) for v in losses_ingredients]
    except (TypeError, ValueError):
        raise MergeError("soup_gain: losses must be numbers") from None
    if not vals:
        raise MergeError("soup_gain: need at least one ingredient loss")
    if not all(math.isfinite(v) for v in vals + [soup]):
        raise MergeError("soup_gain: every loss must be finite")
    return soup - max(vals) if higher_is_better else min(vals) - soup


# --------------------------------------------------------------------------- CLI


def _load_models(path: str) -> tuple:
    """(model paths, base path or None) of a merge config, read as ame-merge reads it (``spec``)."""
    from .spec import load_spec

    spec = load_spec(path)
    return spec.models, spec.base


def _is_config(path: str) -> bool:
    return path.lower().endswith((".yaml", ".yml"))


def inspect_main(argv: Optional[Sequence[str]] = None) -> int:
    """``ame-merge inspect (CONFIG.yaml | MODEL MODEL ...) [--base PATH] [--json] [--top K] [--chunk-mb M]``."""
    p = argparse.ArgumentParser(prog="ame-merge inspect",
                                description="Soupability diagnostics of models (no merge is run): give a merge config "
                                "(its 'models:' and 'base:') or two or more model folders / checkpoint files.")
    p.add_argument("models", nargs="+", metavar="CONFIG.yaml | MODEL",
                   help="a YAML merge config, or the model folders / checkpoint files to compare")
    p.add_argument("--base", help="compare task vectors against this checkpoint (overrides the config's base:)")
    p.add_argument("--json", action="store_true", help="print the full diagnostics as JSON (per-tensor included)")
    p.add_argument("--top", type=int, default=10, help="least similar tensors to list in the table (default 10)")
    p.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_MB, help="float64 chunk per model (default 32)")
    p.add_argument("--data", metavar="module:function", help="also compare the models' outputs: a function "
                   "returning {'model': nn.Module, 'data': (inputs, targets) or batches, optional 'loss_fn', "
                   "'head', 'higher_is_better'}")
    try:
        args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return int(e.code or 0)
    try:
        configs = [m for m in args.models if _is_config(m)]
        if configs and len(args.models) > 1:
            raise MergeError(f"give one config file or model paths, not both (got {len(configs)} config(s) "
                             f"among {len(args.models)} arguments)")
        if configs:
            models, base = _load_models(configs[0])
        else:
            models, base = [resolve_config_path(m, os.getcwd(), "model") for m in args.models], None
            if len(models) < 2:
                raise MergeError(f"need at least 2 models to compare, got {len(models)} ({models[0]})")
        if args.base:
            base = os.path.abspath(os.path.expanduser(args.base))
        extra = {}
        if args.data:
            from .strategies import load_callable

            got = load_callable(args.data, os.getcwd(), "--data")()
            if not isinstance(got, dict) or "model" not in got or "data" not in got:
                raise MergeError(f"--data: {args.data} must return a dict with 'model' and 'data' "
                                 f"(and optional loss_fn, head, higher_is_better), got {type(got).__name__}")
            unknown = set(got) - {"model", "data", "loss_fn", "head", "higher_is_better"}
            if unknown:
                raise MergeError(f"--data: {args.data} returned unknown keys {sorted(unknown)}")
            extra = got
        d = diagnostics(models, base=base, chunk_mb=args.chunk_mb, **extra)
    except MergeError as e:
        print(f"ame-merge inspect: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(d.to_dict(), indent=1))
    else:
        print(d.table(top=args.top))
    return 0


__all__ = ["DEFAULT_THRESHOLDS", "Diagnostics", "PairStats", "diagnostics", "inspect_main", "soup_gain"]
