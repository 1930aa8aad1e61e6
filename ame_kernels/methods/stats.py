"""Per-tensor statistics, exact and streamed chunk by chunk, before a method's combine pass.

Three primitives run per chunk on a backend (plain torch here, the oracle; native
versions in the cpu backend), and drivers combine them over a tensor's chunks:

- ``magnitude_bracket``: for brackets [lo, hi] of fp32 bit patterns of m = |x - b| (a
  non-negative float's bits sort like its value), the counts of entries above, inside
  and non-finite, and the entries inside (bits, index). ``select_ranks`` finds the exact
  key (magnitude, index) of the entry of a given rank in the order "descending
  magnitude, ascending index" (the combine pass's magnitude window) in one pass: a
  stratified sample of a few thousand entries places a bracket around the rank, the pass
  counts what lies above it and collects what lies inside, and the key is selected among
  the collected entries. The counts verify the bracket, so the result is exact whatever
  the sample; when a bracket misses (or would hold too many entries: heavy ties) the
  rank falls back to the radix passes below. Small tensors are collected whole. A
  bracket whose sampled entries are all whole bf16 / fp16 steps (fine-tunes' task
  vectors: few magnitudes, each many times) is binned: its inside entries are counted
  per step and per block of BIN_TASK entries, only those between the steps listed, and
  the rank's index is found in the one block that holds it.
- ``magnitude_histogram``: counts of the bit patterns in 2^k bins, among the entries
  whose high bits match a prefix: the radix fallback runs it twice (high 16 bits, then
  low 16 bits under the found prefix) and then counts equal entries chunk by chunk.
  Memory is 65536 counters per target, never the tensor.
- ``gram``: G[i][k] = sum_j tau_i[j] tau_k[j] (tau = x - b in fp32, products and sums in
  float64): norms, dot products and cosines for SLERP and model stock.
- ``kept_l1``: per ingredient (sum |tau|, sum over kept entries |tau|) under a combine
  plan's masks: mergekit's L1 rescale of DARE and DELLA.
"""

from __future__ import annotations

import functools
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


def magnitude_bracket_torch(inputs: Sequence, base, which: Sequence[int], lo: Sequence[int], hi: Sequence[int],
                            cap: int, shift: Optional[Sequence[int]] = None):
    """(int64[k, 3], [(uint32 bits, int64 index)] * k, [int32[tasks, nbins]] * k): per target t over
    the bits m of |x - b| of input which[t], the counts of m > hi[t], of lo[t] <= m <= hi[t] and of
    m >= +inf, and the entries inside the bracket (index ascending; empty arrays when more than
    ``cap``). With ``shift[t]`` = s > 0 the inside entries whose low s bits are zero are counted per
    task of BIN_TASK entries and bin (m - lo) >> s instead of listed (``bin_count`` bins)."""
    import torch

    counts = np.zeros((len(which), 3), dtype=np.int64)
    found, bins = [], []
    for t, i in enumerate(which):
        m = _mag_bits(inputs[i], base)
        inside = (m >= int(lo[t])) & (m <= int(hi[t]))
        counts[t] = [int((m > int(hi[t])).sum()), int(inside.sum()), int((m >= INF_BITS).sum())]
        s = int(shift[t]) if shift else 0
        nb = bin_count(int(lo[t]), int(hi[t]), s)
        ntasks = -(-m.numel() // BIN_TASK)
        if nb:
            even = inside & (((m - int(lo[t])) & ((1 << s) - 1)) == 0)
            pos = torch.nonzero(even).reshape(-1)
            flat = (pos // BIN_TASK) * nb + ((m[pos] - int(lo[t])) >> s)
            bins.append(torch.bincount(flat, minlength=ntasks * nb).reshape(ntasks, nb).cpu().numpy().astype(np.int32))
            inside = inside & ~even
        else:
            bins.append(np.zeros((ntasks, 0), np.int32))
        if int(inside.sum()) <= cap:
            idx = torch.nonzero(inside).reshape(-1)
            found.append((m[idx].cpu().numpy().astype(np.uint32), idx.cpu().numpy().astype(np.int64)))
        else:
            found.append((np.zeros(0, np.uint32), np.zeros(0, np.int64)))
    return counts, found, bins


def magnitude_sample_torch(x, base, positions: np.ndarray) -> np.ndarray:
    """uint32 bits of |x - b| at ``positions`` (chunk-local)."""
    import torch

    pos = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)).to(x.device)
    xs = x.reshape(-1)[pos]
    bs = base.reshape(-1)[pos] if base is not None else None
    return _mag_bits(xs, bs).cpu().numpy().astype(np.uint32)


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


def magnitudes_torch(x, base, device: bool = False):
    """|x - b| in fp32 as a numpy array (to locate an entry within one chunk), or with ``device``
    as a tensor on x's device."""
    m = _tau(x, base).abs()
    return m if device else m.cpu().numpy()


# --------------------------------------------------------------------------- drivers

#: a chunk source: yields (offset, inputs, base) per chunk of one tensor, in index order
Chunks = Callable[[], Iterable[Tuple[int, Sequence, object]]]


class TorchStats:
    """The statistics primitives on torch tensors (any device): the reference implementation."""

    hist = staticmethod(magnitude_histogram_torch)
    bracket = staticmethod(magnitude_bracket_torch)
    sample = staticmethod(magnitude_sample_torch)
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
INF_BITS = NONFINITE_BIN << 16
ALL_BITS = 0xFFFFFFFF

SAMPLE = 1 << 16           # stratified sample per ingredient that places a bracket
EXACT_MAX = 1 << 18        # tensors up to this many entries are collected whole
BRACKET_BUDGET = 1 << 23   # entries one bracket pass may collect over all targets (12 bytes each)
SIGMAS = 4.0               # a bracket's half-width in binomial standard deviations of the sample
BIN_TASK = 1 << 16         # entries per row of a binned bracket's counts (the native kStatsTask)
BIN_MAX = 64               # most bins of a binned bracket (the native kBracketMaxBins)
BIN_SHIFTS = (16, 13)      # magnitude steps that bin: bf16 and fp16 task vectors' (low bits zero)
BIN_MIN = 1 << 15          # entries expected inside a bracket from which binning beats listing them


def bin_count(lo: int, hi: int, shift: int) -> int:
    """A binned bracket's bins, ((hi - lo) >> shift) + 1; 0 without a shift."""
    return ((hi - lo) >> shift) + 1 if shift else 0


def select_ranks(chunks: Chunks, ops, numel: int, targets: Sequence[Tuple[int, int]],
                 seen: Optional[dict] = None) -> List[Tuple[float, int]]:
    """Exact (magnitude, index) keys of the entries of rank r (descending magnitude, ascending
    index) of ingredient i's task vector, for each target (i, r); streamed over ``chunks``.
    ``seen`` (optional): ingredient -> count of non-finite magnitudes, for every ingredient
    whose entries were all counted (a free NaN/Inf check; NonFinite raised when any)."""
    keys: List[Optional[Tuple[float, int]]] = [rank_key(numel, r) for _, r in targets]
    todo = [t for t, k in enumerate(keys) if k is None]
    if not todo:
        return keys  # type: ignore[return-value]
    source = chunks()
    first = next(iter(source), None)
    if first is not None and ops.length(first[1][targets[todo[0]][0]]) == numel:
        # one chunk: the sample and the pass read the same mapped views (pages faulted once)
        try:
            return _select(lambda: [first], ops, numel, targets, keys, todo, seen)
        finally:
            for _ in source:  # the source releases its views as it ends
                pass
    for _ in source:
        pass
    return _select(chunks, ops, numel, targets, keys, todo, seen)


def _select(chunks: Chunks, ops, numel: int, targets, keys: list, todo: list, seen: Optional[dict]) -> list:
    shifts = {t: 0 for t in todo}
    if numel <= EXACT_MAX or numel >= 1 << 32:  # whole (or too large for 32-bit sample maths)
        brackets = {t: (0, ALL_BITS) for t in todo}
    else:
        brackets, shifts = sample_brackets(chunks, ops, numel, targets, todo)
    cap = max(EXACT_MAX, BRACKET_BUDGET // len(todo))
    if numel > EXACT_MAX and all(brackets[t][0] == brackets[t][1] and not shifts[t] for t in todo):
        cap = 0  # brackets of one magnitude each (ties): their counts give the value, the index is located
    counts, found, bins = bracket_pass(chunks, ops, [targets[t][0] for t in todo], [brackets[t] for t in todo], cap,
                                       [shifts[t] for t in todo])
    _check_seen({targets[t][0]: int(counts[q, 2]) for q, t in enumerate(todo)}, seen)
    missed, tied, located = [], {}, {}
    for q, t in enumerate(todo):
        above, inside = int(counts[q, 0]), int(counts[q, 1])
        i, r = targets[t]
        if not above <= r < above + inside:
            missed.append(t)
        elif shifts[t]:
            key, where = _binned_key(found[q], bins[q], brackets[t][0], shifts[t], inside, r - above)
            if key is not None:
                keys[t] = key
            elif where is not None:
                located[t] = (i,) + where
            else:
                missed.append(t)  # more entries between the bins' values than could be listed
        elif len(found[q][0]) == inside:
            keys[t] = _nth_key(found[q][0], found[q][1], r - above)
        elif brackets[t][0] == brackets[t][1]:
            # a bracket of one magnitude too many times to collect (ties: bf16 fine-tunes): the
            # value is known, only the index of its (r - above)-th entry is left to find
            tied[t] = (i, brackets[t][0], r - above)
        else:
            missed.append(t)
    keys_at = _locate_in_tasks(chunks, ops, located)
    for t, k in list(_find_equal(chunks, ops, numel, tied).items()) + list(keys_at.items()):
        keys[t] = k
    if missed:
        for t, k in zip(missed, select_ranks_radix(chunks, ops, numel, [targets[t] for t in missed])):
            keys[t] = k
    return keys  # type: ignore[return-value]


def _binned_key(odd: Tuple[np.ndarray, np.ndarray], bins: list, lo: int, shift: int, inside: int, nth: int):
    """The entry of rank ``nth`` inside a binned bracket (descending magnitude, ascending index) as
    (key, None) when it is one of the listed (odd) entries, else (None, (bits, chunk offset, task,
    rank among that task's entries of those bits)) to locate; (None, None) when the odd entries
    overflowed their list. ``bins``: per chunk (offset, int32[tasks, nbins])."""
    per_bin = sum(c.sum(axis=0, dtype=np.int64) for _, c in bins)
    if len(odd[0]) != inside - int(per_bin.sum()):
        return None, None
    # every magnitude inside with its count, descending: the bins' values and the odd ones (which
    # lie between them: their low bits are not zero, so no value is both)
    values = np.concatenate([lo + (np.arange(len(per_bin), dtype=np.int64) << shift), odd[0].astype(np.int64)])
    counts = np.concatenate([per_bin, np.ones(len(odd[0]), np.int64)])
    order = np.argsort(-values, kind="stable")
    above = np.cumsum(counts[order])
    k = int(np.searchsorted(above, nth, side="right"))
    j = int(order[k])
    nth -= int(above[k - 1]) if k else 0
    if j >= len(per_bin):  # an odd entry (one each, equal values in index order: a stable sort)
        return (float(np.uint32(values[j]).view(np.float32)), int(odd[1][j - len(per_bin)])), None
    for off, c in bins:
        col = c[:, j].astype(np.int64)
        run = np.cumsum(col)
        if nth < run[-1]:
            task = int(np.searchsorted(run, nth, side="right"))
            return None, (int(values[j]), off, task, nth - (int(run[task - 1]) if task else 0))
        nth -= int(run[-1])
    raise AssertionError("select_ranks: a binned rank is in no task (counts changed)")


def _locate_in_tasks(chunks: Chunks, ops, items: dict) -> dict:
    """Per item t -> (ingredient, bits, chunk offset, task, nth): the key of that task's nth entry
    (ascending index) whose magnitude has exactly ``bits``; one task's magnitudes computed
    (``_locate`` on the task's span)."""
    keys, pending = {}, dict(items)
    for off, xs, b in chunks():
        if not pending:
            break
        for t in [t for t, it in pending.items() if it[2] == off]:
            i, bits, _, task, nth = pending.pop(t)
            a = task * BIN_TASK
            z = min(ops.length(xs[i]), a + BIN_TASK)
            bb = ops.slice(b, a, z) if b is not None else None
            at = _locate(ops, ops.slice(xs[i], a, z), bb, bits, nth)
            keys[t] = (float(np.uint32(bits).view(np.float32)), off + a + at)
    assert not pending, "select_ranks: a binned rank's chunk was not found"
    return keys


def _check_seen(nonfinite: dict, seen: Optional[dict]) -> None:
    if seen is None:
        return
    seen.update(nonfinite)
    bad = sorted(i for i, c in nonfinite.items() if c)
    if bad:
        raise NonFinite(bad)


def bracket_pass(chunks: Chunks, ops, which: Sequence[int], brackets: Sequence[Tuple[int, int]], cap: int,
                 shifts: Optional[Sequence[int]] = None):
    """``magnitude_bracket`` over a tensor's chunks: counts summed, entries (global indices)
    concatenated in index order (a target whose entries pass ``cap`` keeps none), and per target
    its bins per chunk, [(offset, int32[tasks, nbins])] (empty lists for unbinned targets)."""
    lo, hi = [b[0] for b in brackets], [b[1] for b in brackets]
    k = len(which)
    counts = np.zeros((k, 3), dtype=np.int64)
    parts: List[list] = [[] for _ in range(k)]
    bins: List[list] = [[] for _ in range(k)]
    binned = np.zeros(k, dtype=np.int64)  # entries counted in bins so far, per target
    for off, xs, b in chunks():
        c, found, got = ops.bracket(xs, b, which, lo, hi, cap, shifts)
        counts += c
        for q in range(k):
            if got[q].size:
                bins[q].append((off, got[q]))
                binned[q] += int(got[q].sum())
            if parts[q] is not None and counts[q, 1] - binned[q] <= cap:
                parts[q].append((found[q][0], found[q][1] + off if off else found[q][1]))
            else:
                parts[q] = None
    out = []
    for q in range(k):
        if parts[q] and len(parts[q]) == 1:  # one chunk: its arrays as they are
            out.append(parts[q][0])
        elif parts[q]:
            out.append((np.concatenate([p[0] for p in parts[q]]), np.concatenate([p[1] for p in parts[q]])))
        else:
            out.append((np.zeros(0, np.uint32), np.zeros(0, np.int64)))
    return counts, out, bins


def _nth_key(bits: np.ndarray, idx: np.ndarray, nth: int) -> Tuple[float, int]:
    """The key of the nth (0-based) entry in (bits descending, index ascending) order (indices
    below 2^32: one uint64 per entry, bits high, the index's complement low, then a partition)."""
    key = (bits.astype(np.uint64) << np.uint64(32)) | (np.uint64(ALL_BITS) - idx.astype(np.uint64))
    j = len(key) - 1 - nth
    k = int(np.partition(key, j)[j])
    return float(np.uint32(k >> 32).view(np.float32)), ALL_BITS - (k & ALL_BITS)


@functools.lru_cache(maxsize=32)
def sample_positions(numel: int, size: int) -> np.ndarray:
    """``size`` ascending positions, one per stratum [k numel / size, (k + 1) numel / size), at a
    fixed pseudo-random offset inside it (a hash of k): deterministic, spread over the tensor.
    Cached (a model's tensors share a few sizes) and read-only."""
    k = np.arange(size, dtype=np.uint64)
    start = (k * np.uint64(numel)) // np.uint64(size)
    width = ((k + np.uint64(1)) * np.uint64(numel)) // np.uint64(size) - start
    h = (k + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    pos = (start + h % np.maximum(width, np.uint64(1))).astype(np.int64)
    pos.flags.writeable = False
    return pos


def sample_brackets(chunks: Chunks, ops, numel: int, targets, todo) -> Tuple[dict, dict]:
    """Per target, a bracket [lo, hi] of bit patterns that holds its rank unless the sample misleads:
    the sample's quantile at the rank's fraction, widened by SIGMAS binomial deviations; and its
    shift: where the sample predicts at least BIN_MIN entries inside, all of one magnitude step
    (low bits zero: bf16 or fp16 task vectors), the bracket is widened to whole steps and binned."""
    ingredients = sorted({targets[t][0] for t in todo})
    pos = sample_positions(numel, SAMPLE)
    got = {i: [] for i in ingredients}
    for off, xs, b in chunks():
        length = ops.length(xs[ingredients[0]])
        a, z = np.searchsorted(pos, [off, off + length])
        if z > a:
            for i in ingredients:
                got[i].append(ops.sample(xs[i], b, pos[a:z] - off))
    desc = {i: np.sort(np.concatenate(got[i]))[::-1] for i in ingredients}
    out, shifts = {}, {}
    for t in todo:
        i, r = targets[t]
        s = desc[i]
        q = r / numel * len(s)
        d = SIGMAS * np.sqrt(len(s) * (r / numel) * (1 - r / numel)) + 2
        j_hi, j_lo = int(np.floor(q - d)), int(np.ceil(q + d))
        hi = ALL_BITS if j_hi < 0 else int(s[min(j_hi, len(s) - 1)])
        lo = 0 if j_lo >= len(s) else int(s[max(j_lo, 0)])
        out[t], shifts[t] = _bin_bracket(s, min(lo, hi), hi, numel)
    return out, shifts


def _bin_bracket(sample: np.ndarray, lo: int, hi: int, numel: int) -> Tuple[Tuple[int, int], int]:
    """The bracket [lo, hi] as it is with shift 0, or widened to whole magnitude steps and binned."""
    inside = sample[(sample >= lo) & (sample <= hi)]
    if len(inside) * numel < BIN_MIN * len(sample):
        return (lo, hi), 0
    for shift in BIN_SHIFTS:
        low = (1 << shift) - 1
        blo, bhi = lo & ~low, hi | low
        if not (inside & low).any() and bin_count(blo, bhi, shift) <= BIN_MAX:
            return (blo, bhi), shift
    return (lo, hi), 0


def select_ranks_radix(chunks: Chunks, ops, numel: int, targets: Sequence[Tuple[int, int]],
                       seen: Optional[dict] = None) -> List[Tuple[float, int]]:
    """``select_ranks`` by radix passes only (three passes, whatever the ties): the fallback."""
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
    for t, k in _find_equal(chunks, ops, numel, {t: (targets[t][0], value_bits[t], nth_equal[t]) for t in todo}).items():
        keys[t] = k
    return keys  # type: ignore[return-value]


def _find_equal(chunks: Chunks, ops, numel: int, items: dict) -> dict:
    """Per item t -> (ingredient, bits, nth): the key (magnitude, index) of that ingredient's nth
    (0-based, ascending index) entry whose magnitude has exactly ``bits``; one pass over the chunks
    (a count per chunk and target), the chunk that holds it bisected (``_locate``)."""
    keys, seen, pending = {}, {t: 0 for t in items}, set(items)
    for off, xs, b in chunks():
        if not pending:
            break
        for t in sorted(pending):
            i, bits, nth = items[t]
            whole = ops.length(xs[i]) == numel  # one chunk: the entry is in it, no count needed
            count = numel if whole else int(ops.hist(xs[i], b, 0xFFFFFFFF, bits, 0, 1)[0])
            if seen[t] + count > nth:
                keys[t] = (float(np.uint32(bits).view(np.float32)), off + _locate(ops, xs[i], b, bits, nth - seen[t]))
                pending.discard(t)
            else:
                seen[t] += count
    assert not pending, "select_ranks: a rank was not found (counts changed between passes)"
    return keys


LOCATE_BLOCK = 1 << 16


def _locate(ops, x, b, bits: int, nth: int) -> int:
    """The index in chunk ``x`` of its nth (0-based) entry whose magnitude has exactly ``bits``: the
    backend counts the first half of the span left, which halves it, until a block is left (about
    one read of the chunk in log2(chunk / block) calls, whatever the ties); then only that block's
    magnitudes are computed here."""
    start, stop = 0, ops.length(x)
    while stop - start > LOCATE_BLOCK:
        mid = start + (stop - start) // 2
        xb, bb = ops.slice(x, start, mid), (ops.slice(b, start, mid) if b is not None else None)
        count = int(ops.hist(xb, bb, 0xFFFFFFFF, bits, 0, 1)[0])
        if nth < count:
            stop = mid
        else:
            nth, start = nth - count, mid
    xb, bb = ops.slice(x, start, stop), (ops.slice(b, start, stop) if b is not None else None)
    hits = np.flatnonzero(ops.magnitudes(xb, bb).view(np.uint32) == np.uint32(bits))
    assert nth < len(hits), "select_ranks: the located entry is not in its chunk (counts changed)"
    return start + int(hits[nth])


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
