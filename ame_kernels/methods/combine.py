"""The combine pass: the one elementwise kernel every non-AME merge method runs.

Linear, task arithmetic, TIES, DARE, breadcrumbs, DELLA, SLERP and model stock all
reduce, once their per-tensor statistics are known, to one pass over the inputs with
per-ingredient scalars (a ``CombinePlan``). This module fixes that pass's arithmetic
(normative for every backend: reference, cpu, triton, cuda) and gives it in plain torch
(``combine_torch``), the oracle the kernels are tested against.

Per element j of a chunk (global index ``g = offset + j`` in the flattened tensor), all
in fp32, ingredients in ascending order i = 0..N-1:

    b     = base[j] if a base is given else 0
    tau_i = x_i[j] - b ;  m_i = |tau_i|
    keep_i = window_i(m_i, g)                              (magnitude-rank window)
             and u_i < p_i   when ingredient i draws        (random drop: DARE, DELLA)
        u_i = philox_uniform(seed, name_key, i, g)         (see below)
        p_i = probs[i][j] where per-element probs are given for i (always drawn),
              else density[i] (drawn when density[i] < 1)
    (the 1e-8 threshold below is compared in fp32, where it is 9.99999994e-9)
    t_i   = keep_i ? (inv_prob ? tau_i / p_i : tau_i) * scale[i] : 0
    y_i   = weight[i] * t_i
    elect == 0:  acc = sum_i y_i ;                   div = sum_i weight[i] ; |div| < 1e-8 -> 1
    elect == 1:  s = +1 if sum_i y_i >= 0 else -1                          ("sum", TIES)
    elect == 2:  s = +1 if sum_i sign(y_i) >= 0 else -1                    ("count")
    elect >= 1:  acc = sum_{i: sign(y_i) == s} y_i ; div = sum_{same i} weight[i] ; div == 0 -> 1
                 (sign(0) = 0 matches no s: dropped entries never vote nor count;
                  sign(NaN) = 0 too, as torch on the CPU; NaN payloads are not part of the contract)
    mixed = acc / div if normalize else acc
    out[j] = round_to_out_dtype(b + lam * mixed)          (round to nearest even)

The magnitude window (TIES, breadcrumbs) ranks a tensor's entries of tau_i by
descending magnitude, ties broken by ascending element index; it keeps the ranks
[r_lo, r_hi). A rank boundary is the (magnitude, index) key of the entry holding that
rank, so the test is elementwise:

    before(g, (m*, k*)) = m > m*  or  (m == m* and g < k*)
    window_i(m, g)      = not before(g, top_i)  and  (end_mag[i] < 0 or before(g, end_i))
    top_i = (top_mag[i], top_idx[i]) = key of rank r_lo   (r_lo = 0: (+inf, 0))
    end_i = (end_mag[i], end_idx[i]) = key of rank r_hi   (r_hi = numel: (-1, 0), "no end")

With no window (both sentinels) every entry is kept, a NaN included, so a NaN input
reaches the output (where the engine's finite check sees it).

``ame_kernels.methods.stats`` finds those keys exactly (radix selection over the fp32
bits of m, streamed over the chunks).

Random numbers: Philox4x32-10 (Salmon et al. 2011) with counter
(q mod 2^32, q >> 32, i, 0), q = g >> 2, and key (seed mod 2^32, (seed >> 32) xor
name_key); element g takes output word g mod 4 (each call serves four consecutive
elements, as curand's uniform4 does): u = (word >> 8) * 2^-24, exactly representable in fp32. ``name_key`` is
the FNV-1a 32-bit hash of the tensor's UTF-8 name (``name_key``). So a mask depends
only on (seed, tensor name, ingredient, element index): the same bits on every
backend, chunk size, thread count and torchrun world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

ELECT_NONE, ELECT_SUM, ELECT_COUNT = 0, 1, 2
ELECT_CODES = {None: ELECT_NONE, "none": ELECT_NONE, "sum": ELECT_SUM, "count": ELECT_COUNT}

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF
INF_MAG = float("inf")
NO_END_MAG = -1.0


def name_key(name: str) -> int:
    """FNV-1a 32-bit hash of ``name`` (UTF-8): the tensor's part of the random key."""
    h = 0x811C9DC5
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & MASK32
    return h


@dataclass(frozen=True)
class KeepBits:
    """An ingredient's keep mask of one chunk, already drawn, where its keep probabilities would go in
    a probs list: bit j % 8 of byte j / 8 for chunk element j, exactly what the pass would draw from
    those probabilities (``cpu.della_masks_buffers``). For passes that need the mask only (no
    ``inv_prob``); the cpu buffer ops read it as the kernels' ``masks_in``. ``l1``: this chunk's
    (sum |tau|, sum over kept |tau|) as the L1 pass would sum them, when the kernel made them."""

    bits: np.ndarray
    l1: Optional[np.ndarray] = None


@dataclass
class CombinePlan:
    """One tensor's combine pass: per-ingredient float32/int64 arrays of length N and scalars."""

    n: int
    weight: np.ndarray
    scale: np.ndarray = None
    top_mag: np.ndarray = None
    top_idx: np.ndarray = None
    end_mag: np.ndarray = None
    end_idx: np.ndarray = None
    density: np.ndarray = None
    seed: int = 0
    name_key: int = 0
    elect: int = ELECT_NONE
    normalize: bool = False
    lam: float = 1.0
    inv_prob: bool = False
    #: human-readable statistics behind the plan (provenance, tests); not read by kernels
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = int(self.n)
        f32 = lambda a, v: np.ascontiguousarray(np.full(n, v) if a is None else a, dtype=np.float32).reshape(n)  # noqa: E731
        i64 = lambda a, v: np.ascontiguousarray(np.full(n, v) if a is None else a, dtype=np.int64).reshape(n)  # noqa: E731
        self.weight = f32(self.weight, 1.0)
        self.scale = f32(self.scale, 1.0)
        self.top_mag = f32(self.top_mag, INF_MAG)
        self.top_idx = i64(self.top_idx, 0)
        self.end_mag = f32(self.end_mag, NO_END_MAG)
        self.end_idx = i64(self.end_idx, 0)
        self.density = f32(self.density, 1.0)
        self.seed = int(self.seed) & 0xFFFFFFFFFFFFFFFF
        self.name_key = int(self.name_key) & MASK32
        self.elect = int(self.elect)
        self.normalize = bool(self.normalize)
        self.lam = float(np.float32(self.lam))
        self.inv_prob = bool(self.inv_prob)

    def masked(self, i: int) -> bool:
        """Whether ingredient i's entries can be dropped (a rank window or a random mask)."""
        return bool(self.top_mag[i] != INF_MAG or self.end_mag[i] != NO_END_MAG or self.density[i] < 1)

    def hides(self, i: int) -> bool:
        """Whether a NaN/Inf entry of ingredient i can be missing from the output: masked, or
        outvoted by a sign election (a NaN vote elects -1 and a NaN never agrees with a sign)."""
        return self.masked(i) or self.elect != ELECT_NONE

    @property
    def random(self) -> bool:
        """Whether any ingredient draws a random mask (needs the Philox stream)."""
        return bool((self.density < 1).any())

    def kernel_kwargs(self) -> dict:
        """The plan as the native bindings' keyword arguments (``_C.combine``, ``_C_cuda.combine``)."""
        return dict(
            weight=self.weight, scale=self.scale, top_mag=self.top_mag, top_idx=self.top_idx,
            end_mag=self.end_mag, end_idx=self.end_idx, density=self.density, seed=self.seed,
            name_key=self.name_key, elect=self.elect, normalize=self.normalize, lam=self.lam,
            inv_prob=self.inv_prob,
        )


# --------------------------------------------------------------------------- Philox in torch


def _mulhilo(a, m: int):
    """(hi, lo) 32-bit words of the 64-bit product a * m, for int64 tensors a in [0, 2^32)."""
    m0, m1 = m & 0xFFFF, m >> 16
    t = a * m0  # < 2^48
    u = a * m1  # < 2^48
    hi = ((t >> 16) + u) >> 16
    lo = (t + ((u & 0xFFFF) << 16)) & MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding 32-bit words; returns the four output words."""
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_uniform(seed: int, key: int, ingredient: int, g):
    """u in [0, 1) (float32 tensor) for global element indices ``g`` (int64 tensor): word g mod 4
    of Philox4x32-10 on counter (q mod 2^32, q >> 32, ingredient, 0), q = g >> 2."""
    import torch

    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & MASK32, ((seed >> 32) ^ int(key)) & MASK32
    q = g >> 2
    c0 = q & MASK32
    c1 = q >> 32
    c2 = torch.full_like(g, int(ingredient) & MASK32)
    c3 = torch.zeros_like(g)
    words = torch.stack(philox4x32_10(c0, c1, c2, c3, k0, k1)).reshape(4, -1)
    r = torch.gather(words, 0, (g & 3).reshape(1, -1)).reshape(g.shape)
    return (r >> 8).to(torch.float32) * (2.0 ** -24)


# --------------------------------------------------------------------------- the oracle


def keep_masks(inputs: Sequence, base, plan: CombinePlan, offset: int, probs: Optional[Sequence] = None):
    """[(tau_i, keep_i, p_i)] in fp32 per ingredient, the first half of the pass (stats reuse it)."""
    import torch

    c = inputs[0].numel()
    dev = inputs[0].device
    b = base.reshape(-1).to(torch.float32) if base is not None else torch.zeros(c, dtype=torch.float32, device=dev)
    g = torch.arange(offset, offset + c, dtype=torch.int64, device=dev)
    out = []
    for i, x in enumerate(inputs):
        tau = x.reshape(-1).to(torch.float32) - b
        m = tau.abs()
        tm, ti = float(plan.top_mag[i]), int(plan.top_idx[i])
        em, ei = float(plan.end_mag[i]), int(plan.end_idx[i])
        before_top = (m > tm) | ((m == tm) & (g < ti))
        before_end = (m > em) | ((m == em) & (g < ei)) if em >= 0 else torch.ones_like(m, dtype=torch.bool)
        keep = ~before_top & before_end
        p = None
        if probs is not None and probs[i] is not None:
            p = probs[i].reshape(-1).to(torch.float32)
            keep = keep & (philox_uniform(plan.seed, plan.name_key, i, g) < p)
        elif plan.density[i] < 1:
            p = torch.full((c,), float(plan.density[i]), dtype=torch.float32, device=dev)
            keep = keep & (philox_uniform(plan.seed, plan.name_key, i, g) < p)
        out.append((tau, keep, p))
    return b, out


def combine_torch(inputs: Sequence, base, out, plan: CombinePlan, offset: int = 0, probs: Optional[Sequence] = None) -> None:
    """The combine pass in plain torch, exactly as the module docstring defines it; writes ``out``."""
    import torch

    b, parts = keep_masks(inputs, base, plan, offset, probs)
    ys = []
    for i, (tau, keep, p) in enumerate(parts):
        t = tau / p if (plan.inv_prob and p is not None) else tau
        t = t * torch.tensor(float(plan.scale[i]), dtype=torch.float32, device=t.device)
        t = torch.where(keep, t, torch.zeros_like(t))
        ys.append(torch.tensor(float(plan.weight[i]), dtype=torch.float32, device=t.device) * t)
    zero = torch.zeros_like(b)
    w = [torch.tensor(float(v), dtype=torch.float32, device=b.device) for v in plan.weight]
    if plan.elect == ELECT_NONE:
        acc = zero.clone()
        for y in ys:
            acc = acc + y
        div = torch.zeros((), dtype=torch.float32, device=b.device)
        for wi in w:
            div = div + wi
        div = torch.where(div.abs() < 1e-8, torch.ones_like(div), div).expand_as(acc)
    else:
        vote = zero.clone()
        for y in ys:
            vote = vote + (y if plan.elect == ELECT_SUM else torch.sign(y))
        s = torch.where(vote >= 0, torch.ones_like(vote), -torch.ones_like(vote))
        acc, div = zero.clone(), zero.clone()
        for y, wi in zip(ys, w):
            agree = torch.sign(y) == s
            acc = acc + torch.where(agree, y, zero)
            div = div + torch.where(agree, wi.expand_as(zero), zero)
        div = torch.where(div == 0, torch.ones_like(div), div)
    mixed = acc / div if plan.normalize else acc
    lam = torch.tensor(plan.lam, dtype=torch.float32, device=b.device)
    out.copy_((b + lam * mixed).reshape(out.shape))
