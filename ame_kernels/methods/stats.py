"""Per-tensor statistics, exact and streamed chunk by chunk, before a method's combine pass.

Three primitives run per chunk on a backend (plain torch here, the oracle; native
versions in the cpu backend), and drivers combine them over a tensor's chunks:

- ``magnitude_histogram``: counts of the fp32 bit patterns of m = |x - b| (a
  non-negative float's bits sort like its value) in 2^k bins, among the entries whose
  high bits match a prefix. ``select_rank`` runs it twice (high 16 bits, then low 16
  bits under the found prefix) and then counts equal entries chunk by chunk, to find
  the exact key (magnitude, index) of the entry of a given rank in the order
  "descending magnitude, ascending index" (the combine pass's magnitude window). Memory
  is 65536 counters per target, never the tensor.
- ``gram``: G[i][k] = sum_j tau_i[j] tau_k[j] (tau = x - b in fp32, products and sums in
  float64): norms, dot products and cosines for SLERP and model stock.
- ``kept_l1``: per ingredient (sum |tau|, sum over kept entries |tau|) under a combine
  plan's masks: mergekit's L1 rescale of DARE and DELLA.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .combine import INF_MAG, NO_END_MAG, CombinePlan, keep_masks

HIST_BITS = 16
NBINS = 1 << HIST_BITS


# --------------------------------------------------------------------------- torch primitives


def _tau(x, base):
    import torch

    t = x.reshape(-1).to(torch.float32)
    return t - base.reshape(-1).to(torch.float32) if base is not None else t


def _mag_bits(x, base):
    """The fp32 bit patterns of |x - b| as int64 (non-negative, ordered like the values)."""
    import torch

    return _tau(x, base).abs().view(torch.int32).to(torch.int64)


def magnitude_histogram_torch(x, base, prefix_mask: int, prefix: int, shift: int, nbins: int) -> np.ndarray:
    """int64[nbins]: counts of ((m >> shift) & (nbins - 1)) over entries with (m & prefix_mask) == prefix."""
    import torch

    m = _mag_bits(x, base)
    if prefix_mask:
        m = m[(m & prefix_mask) == prefix]
    idx = (m >> shift) & (nbins - 1)
    return torch.bincount(idx, minlength=nbins).cpu().numpy().astype(np.int64)


def gram_torch(inputs: Sequence, base) -> np.ndarray:
    """float64[N, N] of sum_j tau_i[j] * tau_k[j]."""
    import torch

    taus = torch.stack([_tau(x, base) for x in inputs]).to(torch.float64)
    return (taus @ taus.T).cpu().numpy()


def kept_l1_torch(inputs: Sequence, base, plan: CombinePlan, offset: int, probs=None) -> np.ndarray:
    """float64[N, 2]: (sum |tau_i|, sum over kept entries |tau_i|) under ``plan``'s masks."""
    import torch

    _, parts = keep_masks(inputs, base, plan, offset, probs)
    out = np.zeros((len(parts), 2))
    for i, (tau, keep, _) in enumerate(parts):
        m = tau.abs().to(torch.float64)
        out[i, 0] = float(m.sum())
        out[i, 1] = float(torch.where(keep, m, torch.zeros_like(m)).sum())
    return out


def magnitudes_torch(x, base) -> np.ndarray:
    """|x - b| in fp32 as a numpy array (to locate an entry within one chunk)."""
    return _tau(x, base).abs().cpu().numpy()


# --------------------------------------------------------------------------- drivers

#: a chunk source: yields (offset, inputs, base) per chunk of one tensor, in index order
Chunks = Callable[[], Iterable[Tuple[int, Sequence, object]]]


class TorchStats:
    """The statistics primitives on torch tensors (any device): the reference implementation."""

    hist = staticmethod(magnitude_histogram_torch)
    length = staticmethod(lambda x: x.numel())
    slice = staticmethod(lambda x, a, b: x[a:b])
    gram = staticmethod(gram_torch)
    kept_l1 = staticmethod(kept_l1_torch)
    magnitudes = staticmethod(magnitudes_torch)


def rank_key(numel: int, rank: int) -> Optional[Tuple[float, int]]:
    """The sentinel key of a boundary rank outside (0, numel), or None when a search is needed."""
    if rank <= 0:
        return (INF_MAG, 0)
    if rank >= numel:
        return (NO_END_MAG, 0)
    return None


class NonFinite(Exception):
    """NaN or Inf task-vector entries met by a statistics pass (``ingredients``: their indices)."""

    def __init__(self, ingredients: Sequence[int]):
        super().__init__(f"NaN or Inf in ingredients {list(ingredients)}")
        self.ingredients = list(ingredients)


NONFINITE_BIN = 0x7F80  # high 16 bits of +inf: bins at or above hold Inf/NaN magnitudes


def select_ranks(chunks: Chunks, ops, numel: int, targets: Sequence[Tuple[int, int]],
                 seen: Optional[dict] = None) -> List[Tuple[float, int]]:
    """Exact (magnitude, index) keys of the entries of rank r (descending magnitude, ascending
    index) of ingredient i's task vector, for each target (i, r); streamed over ``chunks``.
    ``seen`` (optional): ingredient -> count of non-finite magnitudes, for every ingredient
    whose entries were all histogrammed (a free NaN/Inf check)."""
    keys: List[Optional[Tuple[float, int]]] = [rank_key(numel, r) for _, r in targets]
    todo = [t for t, k in enumerate(keys) if k is None]
    if not todo:
        return keys  # type: ignore[return-value]
    # pass 1: the high 16 bits of every target's ingredient (one histogram per ingredient)
    ingredients = sorted({targets[t][0] for t in todo})
    hi = {i: np.zeros(NBINS, dtype=np.int64) for i in ingredients}
    for _, xs, b in chunks():
        for i in ingredients:
            hi[i] += ops.hist(xs[i], b, 0, 0, HIST_BITS, NBINS)
    if seen is not None:
        for i in ingredients:
            seen[i] = int(hi[i][NONFINITE_BIN:].sum())
        bad = [i for i in ingredients if seen[i]]
        if bad:
            raise NonFinite(bad)
    prefix, remaining = {}, {}
    for t in todo:
        i, r = targets[t]
        bin_, r_in = _descend(hi[i], r)
        prefix[t], remaining[t] = bin_ << HIST_BITS, r_in
    # pass 2: the low 16 bits among the entries with that prefix
    lo = {t: np.zeros(NBINS, dtype=np.int64) for t in todo}
    for _, xs, b in chunks():
        for t in todo:
            lo[t] += ops.hist(xs[targets[t][0]], b, 0xFFFF0000, prefix[t], 0, NBINS)
    value_bits, nth_equal = {}, {}
    for t in todo:
        bin_, r_in = _descend(lo[t], remaining[t])
        value_bits[t], nth_equal[t] = prefix[t] | bin_, r_in
    # pass 3: the index of the nth_equal-th entry (ascending index) with exactly that magnitude
    seen = {t: 0 for t in todo}
    pending = set(todo)
    for off, xs, b in chunks():
        if not pending:
            break
        for t in sorted(pending):
            i = targets[t][0]
            whole = ops.length(xs[i]) == numel  # one chunk: the entry is in it, no count needed
            count = numel if whole else int(ops.hist(xs[i], b, 0xFFFFFFFF, value_bits[t], 0, 1)[0])
            if seen[t] + count > nth_equal[t]:
                idx = off + _locate(ops, xs[i], b, value_bits[t], nth_equal[t] - seen[t])
                keys[t] = (float(np.uint32(value_bits[t]).view(np.float32)), idx)
                pending.discard(t)
            else:
                seen[t] += count
    assert not pending, "select_ranks: a rank was not found (counts changed between passes)"
    return keys  # type: ignore[return-value]


LOCATE_BLOCK = 1 << 16


def _locate(ops, x, b, bits: int, nth: int) -> int:
    """The index in chunk ``x`` of its nth (0-based) entry whose magnitude has exactly ``bits``:
    counted block by block by the backend, then only one block's magnitudes computed here."""
    n = ops.length(x)
    for start in range(0, n, LOCATE_BLOCK):
        stop = min(n, start + LOCATE_BLOCK)
        xb, bb = ops.slice(x, start, stop), (ops.slice(b, start, stop) if b is not None else None)
        count = int(ops.hist(xb, bb, 0xFFFFFFFF, bits, 0, 1)[0]) if stop - start < n else n
        if nth < count:
            m = ops.magnitudes(xb, bb).view(np.uint32)
            return start + int(np.flatnonzero(m == np.uint32(bits))[nth])
        nth -= count
    raise AssertionError("select_ranks: the located entry is not in its chunk (counts changed)")


def _descend(hist: np.ndarray, r: int) -> Tuple[int, int]:
    """The bin holding rank r counting from the highest bin down, and r's rank inside it."""
    above = np.cumsum(hist[::-1])  # above[k] = entries in the top k+1 bins
    k = int(np.searchsorted(above, r, side="right"))
    before = int(above[k - 1]) if k else 0
    return len(hist) - 1 - k, r - before


def gram(chunks: Chunks, ops, n: int) -> np.ndarray:
    g = np.zeros((n, n))
    for _, xs, b in chunks():
        g += ops.gram(xs, b)
    return g


def kept_l1(chunks: Chunks, ops, plan: CombinePlan, probs_for=None) -> np.ndarray:
    out = np.zeros((plan.n, 2))
    for off, xs, b in chunks():
        out += ops.kept_l1(xs, b, plan, off, probs_for(off, xs, b) if probs_for else None)
    return out
