"""Model soups (Wortsman et al. 2022) on the engine's methods and kernels.

- ``uniform_soup``: the mean, the ``linear`` method with equal weights (one combine pass).
- ``weighted_soup``: sum_i a_i x_i / sum_i a_i (``linear``), or without the division; with a base
  and ``normalize=False`` it is task arithmetic, base + sum_i a_i (x_i - base)
  (``task_arithmetic``); with ``normalize=True`` a base cancels and is refused as meaningless.
- ``greedy_soup``: the model-soups recipe (sort by held-out score, descending; start from the
  best; keep a candidate only if the soup's score strictly improves), as a running uniform
  mean in a ``Stew`` (GD, lr_t = 1/t: x_k = x_{k-1} + (w - x_{k-1}) / k) whose rejected steps
  are reverted by snapshot/restore, so each candidate costs one fused step, not a re-soup.

Arithmetic is fp32; outputs are in each tensor's dtype in the first ingredient (the base,
when one is given) unless ``out_dtype`` is given.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

from .api import merge
from .checks import as_state_dicts, check_all_finite, check_structure
from .config import AMEConfig
from .errors import MergeError
from .greedy import GreedyStep, ingredient_scores, score_of
from .stew import Stew


def uniform_soup(ingredients, *, backend: str = "auto", out_dtype: Optional[str] = None,
                 threads: Optional[int] = None, check_finite: bool = True):
    """The uniform mean of the ingredients (tensors or state dicts): ``linear`` with equal weights."""
    return merge(ingredients, method="linear", backend=backend, out_dtype=out_dtype, threads=threads,
                 check_finite=check_finite)


def weighted_soup(ingredients, weights: Sequence[float], *, normalize: bool = True, base: Any = None,
                  backend: str = "auto", out_dtype: Optional[str] = None, threads: Optional[int] = None,
                  check_finite: bool = True):
    """sum_i a_i x_i (divided by sum_i a_i when ``normalize``), a = weights.

    base: a tensor / state dict like the ingredients; with ``normalize=False`` the result is
    base + sum_i a_i (x_i - base) (task arithmetic). With ``normalize=True`` a base would cancel,
    so giving one is an error rather than silently unused.
    """
    dicts, _ = as_state_dicts(ingredients)
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
        if base is not None:
            raise MergeError("weighted_soup: a base cancels in sum a_i x_i / sum a_i (normalize=True); drop it, or "
                             "pass normalize=False for base + sum a_i (x_i - base)")
    common = dict(backend=backend, out_dtype=out_dtype, threads=threads, check_finite=check_finite)
    try:
        if base is not None:
            return merge(ingredients, method="task_arithmetic", base=base, weights=a, **common)
        return merge(ingredients, method="linear", weights=a, normalize=normalize, **common)
    except MergeError as e:
        raise MergeError(f"weighted_soup: {e}") from None


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
    dicts, form = as_state_dicts(ingredients)
    names = check_structure(dicts)
    if check_finite:
        check_all_finite(dicts, names)
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
    best = score_of(evaluate, stew.weights, "greedy_soup") if given else ranked[best_i]
    history: List[GreedyStep] = []
    for i in order[1:]:
        snap = stew.snapshot()
        stew.add(items[i])
        score = score_of(evaluate, stew.weights, "greedy_soup")
        accepted = score > best
        if accepted:
            best = score
        else:
            stew.restore(snap)
        history.append(GreedyStep(ingredient=i, score=score, accepted=accepted, step=stew.t))
    return stew.weights, history


__all__ = ["greedy_soup", "uniform_soup", "weighted_soup"]
