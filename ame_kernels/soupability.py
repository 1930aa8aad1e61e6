"""Soupability from outputs ("Too Salty", Section 2.3): which pairs of models soup well?

    rows = ak.output_diagnostics(models, model, (x_val, y_val), head="fc")   # one row per pair
    ak.soupability_report(rows)   # Spearman correlation of each predictor with the soup gain

Per pair (i, j) on held-out data: ``kl``, the mean over samples of KL(softmax(f_i) ||
softmax(f_j)); ``mse``, the mean squared difference of the logits; ``cka_logits`` and
``cka_features``, linear CKA (Kornblith et al. 2019) of the logits and of the penultimate
features (the input of ``head``); ``l2`` and ``cosine`` of the flattened floating weights;
the losses of i, j and of their uniform soup, and the soup gain,
``min(L_i, L_j) - L_soup`` (Too Salty's definition; positive: the soup beats both).
The paper finds all of these predictors correlate similarly with the gain (KL: Spearman
-0.86 over 5,000 ResNet-50 pairs); ``soupability_report`` computes those correlations.

``linear_cka(X, Y) = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` with column-centred
X_c, Y_c (rows are samples), in float64: 1 for X with itself, invariant to orthogonal
transforms and isotropic scaling of either side.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .diagnostics import soup_gain
from .ensembles import as_state_dicts, check_names, forward, resolve_head
from .errors import MergeError


def _mat(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(torch.float64).cpu()
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        t = t.reshape(t.shape[0], -1)
    return t


def linear_cka(X: Any, Y: Any) -> float:
    """Linear CKA of two representations of the same samples (rows): [n, p] and [n, q]."""
    X, Y = _mat(X, "X"), _mat(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise MergeError(f"linear_cka: X and Y must have the same number of rows (samples), got {X.shape[0]} and {Y.shape[0]}")
    X = X - X.mean(0, keepdim=True)
    Y = Y - Y.mean(0, keepdim=True)
    num = float(torch.linalg.matrix_norm(Y.T @ X) ** 2)
    den = float(torch.linalg.matrix_norm(X.T @ X) * torch.linalg.matrix_norm(Y.T @ Y))
    return num / den if den > 0 else float("nan")


def logit_kl(a: Any, b: Any) -> float:
    """Mean over samples of KL(softmax(a) || softmax(b)) (logits [n, classes], float64)."""
    a, b = _mat(a, "a"), _mat(b, "b")
    if a.shape != b.shape:
        raise MergeError(f"logit_kl: logits must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    la, lb = a.log_softmax(1), b.log_softmax(1)
    return float((la.exp() * (la - lb)).sum(1).mean().clamp_min(0.0))


def logit_mse(a: Any, b: Any) -> float:
    """Mean squared difference of two logit tensors."""
    a, b = _mat(a, "a"), _mat(b, "b")
    if a.shape != b.shape:
        raise MergeError(f"logit_mse: logits must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(((a - b) ** 2).mean())


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get average ranks); NaN when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise MergeError(f"spearman: expected two sequences of one length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(x) - (len(x) + 1) / 2.0, _ranks(y) - (len(y) + 1) / 2.0
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def _batches(data: Any) -> list:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return [data]
    try:
        out = list(data)
    except TypeError:
        raise MergeError("output_diagnostics: data must be an (inputs, targets) pair or an iterable of them") from None
    for i, b in enumerate(out):
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise MergeError(f"output_diagnostics: data batch {i} must be an (inputs, targets) pair")
    if not out:
        raise MergeError("output_diagnostics: data has no batches")
    return out


def _weights_vec(sd: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).double() for v in sd.values() if v.is_floating_point()])


def output_diagnostics(models: Sequence[Any], model: torch.nn.Module, data: Any,
                       loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                       head: Optional[str] = None, higher_is_better: bool = False,
                       pairs: Optional[Sequence[tuple]] = None) -> List[Dict[str, Any]]:
    """One row per pair of ``models`` (state dicts / modules of ``model``'s architecture) on
    held-out ``data`` ((inputs, targets) or an iterable of such batches); module docstring.

    loss_fn(outputs, targets) -> mean loss (default: cross-entropy); with ``higher_is_better``
    it is a score (accuracy) and the gain is ``S_soup - max(S_i, S_j)``. head: the module whose
    input is the penultimate features (default: the last module with parameters; ``""``: no
    feature CKA). pairs: the (i, j) to report (default: all i < j)."""
    what = "output_diagnostics"
    sds = as_state_dicts(models, what)
    if not isinstance(model, torch.nn.Module):
        raise MergeError(f"{what}: model must be an nn.Module (the architecture), got {type(model).__name__}")
    for i, sd in enumerate(sds):
        check_names(model, sd, what, f"model {i}")
    batches = _batches(data)
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    head_mod = None if head == "" else resolve_head(model, head, what)[1]

    def run(sd):
        logits, feats, total, count = [], [], 0.0, 0
        with torch.no_grad():
            for x, y in batches:
                out, f = forward(model, sd, x, head_mod)
                try:
                    v = float(loss_fn(out, y))
                except Exception as e:  # noqa: BLE001
                    raise MergeError(f"{what}: loss_fn raised {type(e).__name__}: {e}") from e
                n = int(out.shape[0]) if out.dim() else 1
                total += v * n
                count += n
                logits.append(out.detach().reshape(out.shape[0], -1).double().cpu())
                if f is not None:
                    feats.append(f.detach().reshape(f.shape[0], -1).double().cpu())
        return torch.cat(logits), (torch.cat(feats) if feats else None), total / count

    per = [run(sd) for sd in sds]
    vecs = [_weights_vec(sd) for sd in sds]
    n = len(sds)
    todo = list(pairs) if pairs is not None else [(i, j) for i in range(n) for j in range(i + 1, n)]
    rows = []
    for i, j in todo:
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise MergeError(f"{what}: pair {(i, j)} is not two distinct model indices in [0, {n})")
        soup = {k: ((sds[i][k].float() + sds[j][k].float()) / 2).to(sds[i][k].dtype) if sds[i][k].is_floating_point()
                else sds[i][k] for k in sds[i]}
        _, _, loss_soup = run(soup)
        (li, fi, Li), (lj, fj, Lj) = per[i], per[j]
        vi, vj = vecs[i], vecs[j]
        den = float(vi.norm() * vj.norm())
        rows.append({
            "pair": (i, j), "kl": logit_kl(li, lj), "mse": logit_mse(li, lj),
            "cka_logits": linear_cka(li, lj), "cka_features": linear_cka(fi, fj) if fi is not None else float("nan"),
            "l2": float((vi - vj).norm()), "cosine": float(vi @ vj) / den if den > 0 else float("nan"),
            "loss_i": Li, "loss_j": Lj, "loss_soup": loss_soup,
            "gain": soup_gain(loss_soup, [Li, Lj], higher_is_better=higher_is_better),
        })
    return rows


PREDICTORS = ("kl", "mse", "cka_logits", "cka_features", "l2", "cosine")


def soupability_report(rows: Sequence[Dict[str, Any]], predictors: Sequence[str] = PREDICTORS, gain: str = "gain",
                       positive_only: bool = False) -> Dict[str, float]:
    """Spearman correlation of each predictor with the soup gain over ``rows`` (from
    ``output_diagnostics`` or any dicts with those keys); ``positive_only``: only the pairs with
    a positive gain (Too Salty's Figure 4 / A4)."""
    rows = list(rows)
    if not rows:
        raise MergeError("soupability_report: no rows")
    for k, r in enumerate(rows):
        if gain not in r:
            raise MergeError(f"soupability_report: row {k} has no {gain!r} column")
    if positive_only:
        rows = [r for r in rows if r[gain] > 0]
    out = {}
    for p in predictors:
        if not all(p in r for r in rows):
            continue
        out[p] = spearman([r[p] for r in rows], [r[gain] for r in rows])
    return out


__all__ = ["linear_cka", "logit_kl", "logit_mse", "output_diagnostics", "soupability_report", "spearman"]
