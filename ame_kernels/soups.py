"""Model soups (Wortsman et al. 2022) as GD-AME, through the same fused kernels as ``ak.merge``.

A soup is one epoch of gradient descent with a fixed pivot p, lr 1 (constant) and
batch size 1 (paper eq. 3/4, DESIGN section 1). With per-step amplification zeta_t,
step t uses gscale_t = zeta_t / N, so (GD, ``w -= lr * gscale_t * (p - x_t)``)

    w_N = p - sum_t (zeta_t / N) (p - x_t) = (1 - sum_t zeta_t / N) p + sum_t (zeta_t / N) x_t.

- ``uniform_soup``: zeta_t = 1 -> sum = 1, the p terms cancel: w_N = mean_t x_t (any p; p = x_1).
- ``weighted_soup``: zeta_t = N * a_t -> w_N = (1 - sum a) p + sum a_t x_t. With normalised
  weights (sum a = 1) that is sum a_t x_t for any p (p = x_1, no extra memory); with a base
  and ``normalize=False`` it is task arithmetic, base + sum a_t (x_t - base); with neither,
  p = 0 and w_N = sum a_t x_t exactly.
- ``greedy_soup``: the model-soups recipe (sort by held-out score, descending; start from the
  best; keep a candidate only if the soup's score strictly improves), as a running uniform
  mean in a ``Stew`` (GD, lr_t = 1/t: x_k = x_{k-1} + (w - x_{k-1}) / k) whose rejected steps
  are reverted by snapshot/restore, so each candidate costs one fused step, not a re-soup.

Arithmetic is fp32; outputs are in each tensor's dtype in the first ingredient unless
``out_dtype`` is given.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from .api import _as_state_dicts, _check_finite, _check_structure, merge
from .config import AMEConfig
from .errors import MergeError
from .greedy import GreedyStep, _score, ingredient_scores
from .stew import Stew


def _soup_config(**kw: Any) -> AMEConfig:
    return AMEConfig(optimizer="sgd", lr=1.0, lr_schedule="constant", adaptive_pivot=False,
                     epochs=1, batch_size=1, shuffle=False, **kw)


def uniform_soup(ingredients, *, backend: str = "auto", out_dtype: Optional[str] = None,
                 threads: Optional[int] = None, check_finite: bool = True):
    """The uniform mean of the ingredients (tensors or state dicts), computed as GD-AME."""
    cfg = _soup_config(amplification=1.0, pivot=0, backend=backend, out_dtype=out_dtype, threads=threads,
                       check_finite=check_finite)
    return merge(ingredients, cfg)


def weighted_soup(ingredients, weights: Sequence[float], *, normalize: bool = True, base: Any = None,
                  backend: str = "auto", out_dtype: Optional[str] = None, threads: Optional[int] = None,
                  check_finite: bool = True):
    """sum_i a_i x_i as GD-AME (module docstring), a = weights (divided by their sum when ``normalize``).

    base: a tensor / state dict like the ingredients; with ``normalize=False`` the result is
    base + sum_i a_i (x_i - base) (task arithmetic); with ``normalize=True`` the base cancels.
    """
    dicts, form = _as_state_dicts(ingredients)
    n = len(dicts)
    try:
        a = [float(v) for v in weights]
    except (TypeError, ValueError):
        raise MergeError(f"weighted_soup: weights must be numbers, got {weights!r}") from None
    if len(a) != n:
        raise MergeError(f"weighted_soup: expected {n} weights (one per ingredient), got {len(a)}")
    if not all(math.isfinite(v) for v in a):
        raise MergeError("weighted_soup: every weight must be finite")
    if normalize:
        total = math.fsum(a)
        # a sum that is cancellation residue (e.g. [1, -1, 1e-12]) would blow the weights up by
        # ~1/residue: as ill-posed as an exact 0
        if abs(total) <= 1e-6 * math.fsum(abs(v) for v in a):
            raise MergeError(f"weighted_soup: the weights sum to 0 (or nearly: {total:g} against weights of "
                             f"total size {math.fsum(abs(v) for v in a):g}), so they cannot be normalised "
                             "(normalize=False?)")
        a = [v / total for v in a]
    if base is not None:
        pivot = base
    elif normalize:
        pivot = 0  # the p terms cancel (sum a = 1): any pivot, so one that costs no memory
    else:
        # p = 0, so w_N = sum a_t x_t; expanded zeros are materialised one tensor at a time by merge.
        names = _check_structure(dicts)
        zeros = {k: torch.zeros((), dtype=torch.float32, device=dicts[0][k].device).expand(dicts[0][k].shape)
                 for k in names}
        pivot = zeros[""] if form in ("list", "stacked") else zeros
    cfg = _soup_config(amplification=tuple(n * v for v in a), backend=backend, out_dtype=out_dtype,
                       threads=threads, check_finite=check_finite)
    try:
        return merge(ingredients, cfg, pivot=pivot)
    except MergeError as e:
        if base is not None and "pivot" in str(e):  # the user wrote base=, merge knows it as its pivot
            raise MergeError(f"weighted_soup: base (merged as the pivot): {e}") from None
        raise


def greedy_soup(ingredients, evaluate: Callable[[Any], float], scores: Optional[Sequence[float]] = None, *,
                backend: str = "auto", out_dtype: Optional[str] = None, threads: Optional[int] = None,
                check_finite: bool = True) -> Tuple[Any, List[GreedyStep]]:
    """The greedy soup recipe (module docstring).

    ingredients: tensors or state dicts; evaluate: model -> held-out score (higher is better);
    scores: the ingredients' held-out scores (None: ``evaluate`` each ingredient).
    Returns (soup, history): one GreedyStep per candidate after the best, ``step`` = soup size after it.
    """
    if not callable(evaluate):
        raise MergeError(f"greedy_soup: evaluate must be callable, got {type(evaluate).__name__}")
    dicts, form = _as_state_dicts(ingredients)
    names = _check_structure(dicts)
    if check_finite:
        _check_finite(dicts, names)
    items = [d[""] for d in dicts] if form in ("list", "stacked") else dicts
    given = scores is not None
    ranked = ingredient_scores(items, evaluate, scores, "greedy_soup")
    order = sorted(range(len(items)), key=lambda i: ranked[i], reverse=True)  # stable: ties keep their order
    cfg = AMEConfig(optimizer="sgd", lr=1.0, lr_schedule="harmonic", backend=backend, out_dtype=out_dtype,
                    threads=threads, check_finite=False)
    best_i = order[0]
    # server mode: gscale 1, lr_t = 1/t -> running mean; output in the first ingredient's dtypes, as merge
    stew = Stew(items[best_i], cfg, dtypes_like=items[0])
    stew.add(items[best_i])  # x_1 = the best ingredient exactly (g = 0)
    best = _score(evaluate, stew.weights, "greedy_soup") if given else ranked[best_i]
    history: List[GreedyStep] = []
    for i in order[1:]:
        snap = stew.snapshot()
        stew.add(items[i])
        score = _score(evaluate, stew.weights, "greedy_soup")
        accepted = score > best
        if accepted:
            best = score
        else:
            stew.restore(snap)
        history.append(GreedyStep(ingredient=i, score=score, accepted=accepted, step=stew.t))
    return stew.weights, history


__all__ = ["greedy_soup", "uniform_soup", "weighted_soup"]
