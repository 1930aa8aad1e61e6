"""What a merge method is: its parameters, its needs, its plan for the combine pass, its oracle.

A ``Method`` declares its parameters (``params.Param``), whether it needs a base model,
how many ingredients it takes, and turns one tensor's statistics into a ``CombinePlan``
(``plan``). The engine and ``ak.merge`` give it a ``TensorContext``: the tensor's name,
shape and chunks, with the streamed statistics (``rank_keys``, ``gram``, ``kept_l1``)
computed by the backend in use. ``reference`` is the method in plain torch on whole
tensors, written from its definition (sorts, not rank windows): the tests' oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import MergeError
from . import stats
from .combine import CombinePlan
from .params import Param, Params

BASE_REQUIRED, BASE_NEVER = "required", "never"


@dataclass
class TensorContext:
    """One tensor as a method sees it while planning: metadata, chunks and statistics."""

    name: str
    shape: Tuple[int, ...]
    n: int
    has_base: bool
    chunks: stats.Chunks
    ops: Any  # hist / gram / kept_l1 / magnitudes on this backend's chunk handles
    #: raise stats.NonFinite when a statistics pass meets NaN/Inf; ``seen`` then lists the
    #: ingredients whose every entry a pass read (so no mask can hide a NaN in them)
    check_finite: bool = False
    seen: dict = None
    #: what a method keeps for this tensor between its plan and its combine pass (DELLA: the
    #: probabilities of the last chunk its statistics pass ranked)
    memo: dict = None

    def __post_init__(self) -> None:
        self.seen = {}
        self.memo = {}

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def rank_keys(self, targets: Sequence[Tuple[int, int]]) -> List[Tuple[float, int]]:
        return stats.select_ranks(self.chunks, self.ops, self.numel, targets, self.seen if self.check_finite else None)

    def gram(self) -> np.ndarray:
        g = stats.gram(self.chunks, self.ops, self.n)
        if self.check_finite:  # a NaN/Inf entry makes its ingredient's sum of squares non-finite
            bad = [i for i in range(self.n) if not np.isfinite(g[i, i])]
            if bad:
                raise stats.NonFinite(bad)
            self.seen.update({i: 0 for i in range(self.n)})
        return g

    def kept_l1(self, plan: CombinePlan, probs_for: Optional[Callable] = None) -> np.ndarray:
        l1 = stats.kept_l1(self.chunks, self.ops, plan, probs_for)
        if self.check_finite:
            bad = [i for i in range(self.n) if not np.isfinite(l1[i, 0])]
            if bad:
                raise stats.NonFinite(bad)
            self.seen.update({i: 0 for i in range(self.n)})
        return l1


class Method:
    """Base class: subclasses set the class attributes and implement ``plan`` and ``reference``."""

    name: str = ""
    title: str = ""
    paper: str = ""
    formula: str = ""
    params: Tuple[Param, ...] = ()
    base: str = BASE_NEVER
    min_n: int = 1
    max_n: Optional[int] = None
    #: chunks must hold whole rows (prod(shape[1:]) elements): per-row statistics (DELLA)
    row_aligned: bool = False

    def check(self, p: Params, n: int, where: str) -> None:
        """Cross-parameter checks beyond each parameter's own range (override)."""

    def check_count(self, n: int, where: str) -> None:
        if n < self.min_n or (self.max_n is not None and n > self.max_n):
            want = f"exactly {self.min_n}" if self.max_n == self.min_n else f"at least {self.min_n}" + (
                f" and at most {self.max_n}" if self.max_n else "")
            raise MergeError(f"{where}: method {self.name!r} takes {want} ingredients, got {n}")

    def plan(self, ctx: TensorContext, p: Params) -> CombinePlan:
        raise NotImplementedError

    def probs_for(self, ctx: TensorContext, p: Params) -> Optional[Callable]:
        """None, or f(offset, inputs, base) -> per-ingredient keep probabilities of one chunk."""
        return None

    def reference(self, xs: Sequence, base, p: Params, name: str):
        """The merged tensor in fp32 from whole tensors, in plain torch (the oracle)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {
            "name": self.name, "title": self.title, "paper": self.paper, "formula": self.formula,
            "base": self.base, "min_n": self.min_n, "max_n": self.max_n,
            "params": {q.name: {"kind": q.kind, "default": q.default, "per_ingredient": q.per_ingredient,
                                "doc": q.describe()} for q in self.params},
        }


# ---------------------------------------------------------------------------- shared parameters

def weight_param(default: float = 1.0) -> Param:
    return Param("weight", "float", default, "the ingredient's weight", per_ingredient=True)


def lambda_param() -> Param:
    return Param("lambda", "float", 1.0, "scale of the merged task vector (base + lambda * merged)")


def normalize_param(default: bool) -> Param:
    return Param("normalize", "bool", default, "divide by the sum of the weights (of the agreeing entries under TIES election)")
