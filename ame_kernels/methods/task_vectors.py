"""Task-vector methods: task arithmetic, TIES, DARE, breadcrumbs, DELLA (mergekit's definitions).

Each ingredient's task vector tau_i = x_i - base is sparsified (or not), weighted, then
summed, with TIES sign election for the ``*_ties`` variants and ``della``:

    tau_i'  = sparsify(tau_i)                 (trim / drop / keep a magnitude band)
    y_i     = weight_i * rescale_i(tau_i')
    merged  = sum_i y_i                      (election: only entries whose sign is the
                                              sign of sum_i y_i, or of the count of signs)
    merged /= sum of the weights counted      (when normalize)
    out     = base + lambda * merged

Sparsification, per tensor (as mergekit; each tensor ranked on its own):
- ``magnitude`` (TIES, Yadav et al. 2023): keep the k = max(1, int(density * numel)) entries
  of largest |tau| (none at density 0).
- ``random`` (DARE, Yu et al. 2023): keep each entry with probability ``density``.
- ``outliers`` (breadcrumbs, Davari & Belilovsky 2023): drop the n_top = int(gamma * numel)
  largest entries, keep the next int(density * numel).
- ``della`` (DELLA, Deep et al. 2024): keep each entry with a probability that grows with
  its magnitude rank in its row: p = (density - epsilon) + 2 epsilon * rank / (cols - 1).
Ties in magnitude are broken by element index (lower index ranks higher), so the kept
set is exact and the same on every backend; random masks come from Philox (see
``combine``). ``rescale``: ``l1`` (mergekit's default for DARE and DELLA: kept entries
scaled so the tensor's L1 norm is unchanged), ``inverse`` (the papers': divide each kept
entry by its keep probability), or ``none``.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from ..errors import MergeError
from .base import BASE_REQUIRED, Method, lambda_param, normalize_param, weight_param
from .combine import ELECT_CODES, ELECT_NONE, CombinePlan, KeepBits, name_key, philox_uniform
from .params import Param, Params

L1_EPS = 1e-7  # mergekit: no L1 rescale when either norm is below this
RESCALES = ("l1", "inverse", "none", True, False)


def _density(low_open: bool = False) -> Param:
    return Param("density", "float", 1.0, "fraction of each tensor's task vector kept", per_ingredient=True,
                 low=0.0, high=1.0, low_open=low_open)


SEED = Param("seed", "int", 0, "seed of the random masks (Philox, keyed on seed, tensor name, ingredient, index)",
             low=0, high=2**64 - 1)


class TaskVectorMethod(Method):
    """The generalized task-arithmetic family; subclasses set ``sparsify``, ``consensus`` and defaults."""

    base = BASE_REQUIRED
    sparsify: Optional[str] = None  # None, 'magnitude', 'random', 'outliers', 'della'
    consensus: bool = False
    default_normalize = False
    default_rescale = "none"

    def __init__(self) -> None:
        ps = [weight_param(), lambda_param(), normalize_param(self.default_normalize)]
        if self.sparsify is not None:
            ps.append(_density(low_open=self.sparsify in ("random", "della")))
            ps.append(Param("rescale", "choice", self.default_rescale,
                            "l1 (keep each tensor's L1 norm), inverse (divide kept entries by their keep "
                            "probability, as the papers), none (true = l1, false = none)", choices=RESCALES))
        if self.sparsify == "outliers":
            ps.append(Param("gamma", "float", 0.01, "fraction of the largest entries dropped", per_ingredient=True,
                            low=0.0, high=1.0, high_open=True))
        if self.sparsify == "della":
            ps.append(Param("epsilon", "float", 0.15, "half-width of the keep probabilities around density",
                            per_ingredient=True, low=0.0, high=0.5, high_open=True))
        if self.sparsify in ("random", "della"):
            ps.append(SEED)
        if self.consensus:
            ps.append(Param("consensus", "choice", "sum", "sign election: sign of the weighted sum (TIES) or of the count",
                            choices=("sum", "count")))
        self.params = tuple(ps)

    # -- checks -----------------------------------------------------------------------------
    def rescale_mode(self, p: Params) -> str:
        r = p.get("rescale", "none")
        return {True: "l1", False: "none"}.get(r, r) if isinstance(r, bool) else r

    def check(self, p: Params, n: int, where: str) -> None:
        if self.sparsify == "outliers":
            for i, (d, g) in enumerate(zip(p["density"], p["gamma"])):
                if d < 1 and d + g > 1:
                    raise MergeError(f"{where}: gamma + density must be <= 1 (ingredient {i}: gamma {g:g} + density {d:g})")
        if self.sparsify == "della":
            for i, (d, e) in enumerate(zip(p["density"], p["epsilon"])):
                if d < 1 and not (0 < d - e and d + e < 1):
                    raise MergeError(f"{where}: density -/+ epsilon must lie in (0, 1) (ingredient {i}: density {d:g}, "
                                     f"epsilon {e:g})")
        if self.rescale_mode(p) == "inverse" and self.sparsify not in ("random", "della"):
            raise MergeError(f"{where}: rescale 'inverse' divides by a keep probability; method {self.name!r} keeps "
                             "entries by magnitude (use 'l1' or 'none')")

    # -- plan ----------------------------------------------------------------------------------
    def windows(self, numel: int, p: Params) -> list:
        """Per ingredient (r_lo, r_hi): the rank window kept by a magnitude method, or None."""
        out = []
        for i in range(len(p["weight"])):
            if self.sparsify not in ("magnitude", "outliers") or p["density"][i] >= 1:
                out.append(None)
                continue
            d = p["density"][i]
            target = int(d * numel)
            if self.sparsify == "magnitude":  # mergekit keeps at least one entry of a density > 0
                out.append((0, max(1, target) if d > 0 else 0))
                continue
            n_top = int(p["gamma"][i] * numel)
            n_bot = numel - target - n_top
            if n_bot < 0:
                n_top += n_bot
            out.append((n_top, n_top + target))
        return out

    def plan(self, ctx, p: Params) -> CombinePlan:
        n = ctx.n
        plan = CombinePlan(n, weight=p["weight"], lam=p["lambda"], normalize=p["normalize"],
                           elect=ELECT_CODES[p.get("consensus")] if self.consensus else ELECT_NONE,
                           seed=p.get("seed", 0), name_key=name_key(ctx.name))
        wins = self.windows(ctx.numel, p)
        targets = []
        for i, w in enumerate(wins):
            if w is not None:
                targets += [(i, w[0]), (i, w[1])]
        if targets:
            keys = iter(ctx.rank_keys(targets))
            for i, w in enumerate(wins):
                if w is not None:
                    (plan.top_mag[i], plan.top_idx[i]), (plan.end_mag[i], plan.end_idx[i]) = next(keys), next(keys)
            plan.notes["windows"] = wins
        if self.sparsify == "random":
            plan.density[:] = [d if d < 1 else 1.0 for d in p["density"]]
        mode = self.rescale_mode(p) if self.sparsify else "none"
        plan.inv_prob = mode == "inverse"
        if mode == "l1" and any(d < 1 for d in p["density"]):
            l1 = ctx.kept_l1(plan, self.probs_for(ctx, p))
            for i, d in enumerate(p["density"]):
                if d < 1 and l1[i, 0] >= L1_EPS and l1[i, 1] >= L1_EPS:
                    plan.scale[i] = np.float32(l1[i, 0] / l1[i, 1])
            plan.notes["l1"] = l1.tolist()
        return plan

    def probs_for(self, ctx, p: Params):
        if self.sparsify != "della" or all(d >= 1 for d in p["density"]):
            return None
        shape = ctx.shape
        dens, eps = p["density"], p["epsilon"]
        # the last chunk's probabilities, kept on the tensor's context: plan's statistics pass and the
        # combine pass each ask for a probs function, and a one-chunk tensor's combine reuses them
        last = ctx.memo.setdefault(("della_probs", tuple(dens), tuple(eps)), {})
        # where the pass needs the mask only (not the inverse rescale) and the ops draw it, the keep
        # bits themselves (KeepBits), decided mostly without ranking every entry
        bits = ctx.ops.draws_bits and self.rescale_mode(p) != "inverse" and _rows(shape, ctx.numel)[2] == 1
        seed, key = int(p.get("seed", 0)) & 0xFFFFFFFFFFFFFFFF, name_key(ctx.name)  # as the plan holds them
        # bits are an eighth of a byte per entry: a tensor of several chunks keeps every chunk's (a
        # copy: the ops reuse their buffers) up to BITS_CACHE_BYTES, so its combine pass does not
        # decide them a second time
        drawing = sum(d < 1 for d in dens)
        cache = None
        if bits and drawing * (ctx.numel // 8 + 1) <= BITS_CACHE_BYTES:
            cache = ctx.memo.setdefault(("della_bits", tuple(dens), tuple(eps)), {})

        def probs(offset, xs, b):
            length = ctx.ops.length(xs[0])
            if last.get("offset") == offset and last.get("length") == length:
                return last["probs"]
            if cache is not None and (offset, length) in cache:
                return cache[(offset, length)]
            out = []
            for i, x in enumerate(xs):
                if dens[i] >= 1:
                    out.append(None)
                    continue
                if bits:
                    out.append(ctx.ops.della_bits(x, b, shape, dens[i], eps[i], seed, key, i, offset))
                else:
                    out.append(ctx.ops.della_probs(x, b, shape, dens[i], eps[i], slot=i))
            last.update(offset=offset, length=length, probs=out)
            if cache is not None and length < ctx.numel:
                cache[(offset, length)] = [None if k is None else KeepBits(k.bits.copy(), k.l1) for k in out]
            return out

        return probs

    # -- oracle --------------------------------------------------------------------------------
    def reference(self, xs: Sequence, base, p: Params, name: str):
        import torch

        b = base.reshape(-1).float()
        numel = b.numel()
        key = name_key(name)
        idx = torch.arange(numel, dtype=torch.int64)
        ys, ws = [], []
        mode = self.rescale_mode(p) if self.sparsify else "none"
        for i, x in enumerate(xs):
            tau = x.reshape(-1).float() - b
            d = p["density"][i] if self.sparsify else 1.0
            prob = None
            if self.sparsify is None or d >= 1:
                mask = torch.ones(numel, dtype=torch.bool)
            elif self.sparsify in ("magnitude", "outliers"):
                lo, hi = self.windows(numel, p)[i]
                order = torch.sort(-tau.abs(), stable=True).indices  # descending |tau|, ties by index
                mask = torch.zeros(numel, dtype=torch.bool)
                mask[order[lo:hi]] = True
            else:
                if self.sparsify == "random":
                    prob = torch.full((numel,), float(np.float32(d)))
                else:
                    prob = della_probs_torch(tau.abs(), tuple(xs[i].shape), d, p["epsilon"][i])
                mask = philox_uniform(p["seed"], key, i, idx) < prob
            kept = torch.where(mask, tau, torch.zeros_like(tau))
            if mode == "inverse" and prob is not None:
                kept = torch.where(mask, tau / prob, torch.zeros_like(tau))
            elif mode == "l1" and self.sparsify and d < 1:
                before, after = tau.abs().double().sum(), kept.abs().double().sum()
                if before >= L1_EPS and after >= L1_EPS:
                    kept = kept * torch.tensor(float(np.float32(before / after)))
            ys.append(torch.tensor(float(np.float32(p["weight"][i]))) * kept)
            ws.append(float(np.float32(p["weight"][i])))
        y = torch.stack(ys)
        w = torch.tensor(ws, dtype=torch.float32)[:, None].expand_as(y)
        if self.consensus:
            sign = torch.sign(y)
            vote = y.sum(0) if p["consensus"] == "sum" else sign.sum(0)
            majority = torch.where(vote >= 0, 1.0, -1.0)
            agree = sign == majority
            mixed = torch.where(agree, y, 0.0).sum(0)
            div = torch.where(agree, w, 0.0).sum(0)
            div = torch.where(div == 0, 1.0, div)
        else:
            mixed = y.sum(0)
            div = w.sum(0)
            div = torch.where(div.abs() < 1e-8, 1.0, div)
        if p["normalize"]:
            mixed = mixed / div
        return b + torch.tensor(float(np.float32(p["lambda"]))) * mixed


# Most bytes of DELLA keep bits one tensor keeps across its passes (probs_for).
BITS_CACHE_BYTES = 128 << 20


def _rows(shape: tuple, numel: int) -> tuple:
    """(rows, cols, rest): DELLA ranks along dim 1 (a 1-D tensor is one row), as mergekit."""
    if len(shape) < 2:
        return 1, numel, 1
    rest = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    return -1, int(shape[1]), rest


def della_kernel_args(shape: tuple, numel: int, density: float, epsilon: float) -> dict:
    """A native kernel's arguments for ``della_probs`` of a chunk of ``numel`` elements: the
    ranked dim's length, the elements after it, and the two fp32 constants numpy rounds to."""
    _, cols, rest = _rows(shape, numel)
    return {"cols": max(int(cols), 1), "rest": max(int(rest), 1), "eps": float(np.float32(epsilon)),
            "low": float(np.float32(density - epsilon))}


def della_probs(m: np.ndarray, shape: tuple, density: float, epsilon: float) -> np.ndarray:
    """Keep probabilities (fp32) of a chunk of whole rows from its magnitudes ``m`` (fp32)."""
    _, cols, rest = _rows(shape, m.size)
    v = m.reshape(-1, cols, rest)
    rank = np.empty(v.shape, dtype=np.float32)
    steps = np.arange(cols, dtype=np.float32)[None, :, None]

    def rows(lo: int, hi: int) -> None:  # ascending magnitude, ties by index; the inverse permutation
        np.put_along_axis(rank[lo:hi], np.argsort(v[lo:hi], axis=1, kind="stable"), steps, axis=1)

    workers = min(os.cpu_count() or 1, v.shape[0])
    if workers > 1 and v.size >= 1 << 20:  # numpy's sort releases the GIL: rows split over the cores
        from concurrent.futures import ThreadPoolExecutor

        bounds = np.linspace(0, v.shape[0], workers + 1).astype(int)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(rows, bounds[:-1], bounds[1:]))
    else:
        rows(0, v.shape[0])
    norm = rank / np.float32(max(cols - 1, 1))
    p = norm * np.float32(2.0) * np.float32(epsilon) + np.float32(density - epsilon)
    return p.reshape(-1).astype(np.float32)


def della_probs_torch(m, shape: tuple, density: float, epsilon: float):
    """``della_probs`` in torch on m's device, bitwise: one stable argsort per line (NaN last, as
    numpy), the ranks scattered back, then the same fp32 operations. The oracle of the torch
    paths, and what the GPU backends run (``Backend.della_probs``)."""
    import torch

    _, cols, rest = _rows(shape, m.numel())
    v = m.reshape(-1, cols, rest)
    order = torch.argsort(v, dim=1, stable=True)
    steps = torch.arange(cols, dtype=torch.float32, device=m.device).view(1, cols, 1).expand_as(v)
    rank = torch.empty(v.shape, dtype=torch.float32, device=m.device).scatter_(1, order, steps)
    norm = rank / float(max(cols - 1, 1))
    return (norm * 2.0 * float(np.float32(epsilon)) + float(np.float32(density - epsilon))).reshape(-1)


class TaskArithmetic(TaskVectorMethod):
    name, title, paper = "task_arithmetic", "Task arithmetic", "Ilharco et al. 2023, arXiv:2212.04089"
    formula = "base + lambda * sum_i w_i (x_i - base)"


class Ties(TaskVectorMethod):
    name, title, paper = "ties", "TIES-merging", "Yadav et al. 2023, arXiv:2306.01708"
    formula = "trim each tau_i to its top density by magnitude, elect signs, disjoint mean; base + lambda * merged"
    sparsify, consensus, default_normalize = "magnitude", True, True


class DareLinear(TaskVectorMethod):
    name, title, paper = "dare_linear", "DARE (linear)", "Yu et al. 2023, arXiv:2311.03099"
    formula = "drop tau_i entries with probability 1 - density, rescale; base + lambda * sum_i w_i tau_i'"
    sparsify, default_rescale = "random", "l1"


class DareTies(DareLinear):
    name, title = "dare_ties", "DARE with TIES sign election"
    consensus = True


class Breadcrumbs(TaskVectorMethod):
    name, title, paper = "breadcrumbs", "Model breadcrumbs", "Davari & Belilovsky 2023, arXiv:2312.06795"
    formula = "drop the largest gamma and keep the next density of each tau_i by magnitude; base + lambda * sum"
    sparsify = "outliers"


class BreadcrumbsTies(Breadcrumbs):
    name, title = "breadcrumbs_ties", "Model breadcrumbs with TIES sign election"
    consensus = True


class Della(TaskVectorMethod):
    name, title, paper = "della", "DELLA-merging", "Deep et al. 2024, arXiv:2406.11617"
    formula = "keep tau_i entries with probability rising with their magnitude rank per row, rescale, elect; base + lambda * merged"
    sparsify, consensus, default_normalize, default_rescale = "della", True, True, "l1"
    row_aligned = True


class DellaLinear(Della):
    name, title = "della_linear", "DELLA without sign election"
    consensus, default_normalize = False, False
