"""Greedy AME (paper Appendix A.4): an AME run that keeps a step only if a held-out score improves.

    merged, history = greedy_merge(ingredients, evaluate, AMEConfig(optimizer="adam", lr=1e-3), scores=val_acc)

The run is ``ak.merge``'s schedule (same config: optimizer, lr_t, zeta_t, batches,
epochs) stepped one batch at a time through a ``Stew`` in 'merge' mode (the fused
step kernels). After each step the candidate ensemble is scored by ``evaluate``
(higher is better); a step that does not strictly improve the best score so far is
reverted to the preceding model and optimizer state and step count (a snapshot
restore: a rejected step leaves no trace, so the next accepted step is step t,
not t+1, and gets lr_t and zeta_t of that t).

Order and start (the paper's two variants): ``start="worst"`` sorts ingredients
by ascending score and starts the ensemble at the worst one (the paper's fairer
variant); ``start="best"`` sorts descending and starts at the best (the
model-soups convention, never worse than the best ingredient on ``evaluate``).
``scores=None`` scores every ingredient with ``evaluate`` first. The start
ingredient is the pivot x0 unless ``pivot`` is given ('soup', an index or
weights, as in ``ak.merge``). Every ingredient, the start one included, is
offered once per epoch, so when every step is accepted the result equals
``ak.merge(ingredients, config, pivot=<start index>, scores=scores,
descending=(start == "best"))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import math

from .checks import as_state_dicts, check_all_finite, check_structure, resolve_pivot
from .config import AMEConfig, make_config
from .errors import MergeError
from .schedule import schedule
from .stew import Stew

STARTS = ("worst", "best")


@dataclass(frozen=True)
class GreedyStep:
    """One offered step: the ingredient index (a tuple for a batch > 1), the candidate's score,
    whether it was kept, and the step count t after it (unchanged when rejected)."""

    ingredient: Union[int, Tuple[int, ...]]
    score: float
    accepted: bool
    step: int


def score_of(evaluate: Callable, model: Any, what: str) -> float:
    """evaluate(model) as a float; a MergeError naming ``what`` when it is not a number or is NaN."""
    try:
        s = float(evaluate(model))
    except (TypeError, ValueError) as e:
        raise MergeError(f"{what}: evaluate must return a number ({e})") from None
    if math.isnan(s):
        raise MergeError(f"{what}: evaluate returned NaN")
    return s


def ingredient_scores(ingredients: Sequence[Any], evaluate: Callable, scores: Optional[Sequence[float]], what: str) -> List[float]:
    """The given scores (checked: one finite number per ingredient), or evaluate() of each ingredient."""
    n = len(ingredients)
    if scores is None:
        return [score_of(evaluate, x, what) for x in ingredients]
    try:
        out = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise MergeError(f"{what}: scores must be numbers, got {scores!r}") from None
    if len(out) != n:
        raise MergeError(f"{what}: expected {n} scores (one per ingredient), got {len(out)}")
    if not all(math.isfinite(s) for s in out):
        raise MergeError(f"{what}: every score must be finite")
    return out


def greedy_merge(
    ingredients,
    evaluate: Callable[[Any], float],
    config: Optional[AMEConfig] = None,
    scores: Optional[Sequence[float]] = None,
    start: str = "worst",
    pivot: Any = None,
    **overrides: Any,
) -> Tuple[Any, List[GreedyStep]]:
    """Greedy amortized model ensembling (module docstring).

    ingredients: a list of tensors or of state dicts (as ``ak.merge``).
    evaluate: candidate (a tensor / state dict in the output dtype) -> score, higher is better.
    config / overrides: as ``ak.merge``; its ``order``/``scores`` must be unset (greedy orders by score).
    Returns (merged weights, history: one GreedyStep per offered step).
    """
    if not callable(evaluate):
        raise MergeError(f"greedy_merge: evaluate must be callable, got {type(evaluate).__name__}")
    if start not in STARTS:
        raise MergeError(f"greedy_merge: start must be 'worst' or 'best', got {start!r}")
    cfg = make_config(config, **overrides)
    if cfg.order is not None or cfg.scores is not None:
        raise MergeError("greedy_merge: pass scores as greedy_merge(scores=...), not in the config (order/scores)")
    dicts, form = as_state_dicts(ingredients)
    if form == "stacked":
        form = "list"
    names = check_structure(dicts)
    n = len(dicts)
    if cfg.check_finite:
        check_all_finite(dicts, names)
    ranked = ingredient_scores([d[""] if form == "list" else d for d in dicts], evaluate, scores, "greedy_merge")
    cfg = cfg.replace(scores=tuple(ranked), descending=(start == "best"))
    plan = schedule(cfg, n)
    first = plan.order[0]
    pivot_spec = first if pivot is None else pivot
    resolved = resolve_pivot(pivot_spec, dicts, names, form)
    if resolved is None:  # 'soup': the fp32 uniform mean
        from .backends.reference import batch_mean  # ascending index, / N: a full batch's mean to the bit

        x0 = {k: (batch_mean([d[k] for d in dicts]) if dicts[0][k].is_floating_point() else dicts[0][k])
              for k in names}
    elif isinstance(resolved, int):
        x0 = dicts[resolved]
    else:
        x0 = {k: resolved[k] for k in names}
    stew_cfg = cfg.replace(order=None, scores=None, pivot="soup")
    def as_input(d):
        return d[""] if form == "list" else d

    # As ak.merge: output in each tensor's dtype in the first ingredient, not the pivot's
    # (the fp32 soup pivot is kept in fp32 and only the output is rounded).
    stew = Stew(as_input(x0), stew_cfg, mode="merge", n=n, dtypes_like=as_input(dicts[0]))

    # The start model is the start ingredient itself (bit for bit) when evaluate scored it already.
    same = scores is None and pivot is None and cfg.out_dtype is None
    best = ranked[first] if same else score_of(evaluate, stew.weights, "greedy_merge")
    history: List[GreedyStep] = []
    for t in range(1, plan.steps + 1):
        members = plan.batch(t)
        snap = stew.snapshot()
        stew.add([as_input(dicts[i]) for i in sorted(members)])  # ascending: the batch mean's order
        score = score_of(evaluate, stew.weights, "greedy_merge")
        accepted = score > best
        if accepted:
            best = score
        else:
            stew.restore(snap)
        label = members[0] if len(members) == 1 else tuple(members)
        history.append(GreedyStep(ingredient=label, score=score, accepted=accepted, step=stew.t))
    return stew.weights, history


__all__ = ["GreedyStep", "greedy_merge", "ingredient_scores"]
