"""The one-pass rank selection (``methods.stats.select_ranks``): a sampled bracket, verified by
its counts, must give exactly the keys of the radix passes (``select_ranks_radix``), which the
combine oracle's tests check against sorting, on every ops flavour (torch, the cpu backend's
native bracket on tensors, and on buffers) and whatever the sample: heavy ties, zeros, narrow
and wide distributions, several chunks, ranks at the edges, brackets forced to miss."""

import numpy as np
import pytest
import torch

from ame_kernels.backends.cpu import CpuBackend, magnitude_bracket_buffers
from ame_kernels.errors import MergeError
from ame_kernels.methods import stats
from ame_kernels.methods.run import BufferOps, TorchOps


def _np(t):
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _dtype(t):
    return {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[t.dtype]


def _family(kind, c, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(c, generator=g) * 0.02).to(dtype)
    xs = []
    for i in range(n):
        tau = torch.randn(c, generator=g) * 1e-3
        if kind == "sparse":  # most of the task vector exactly zero
            tau = tau * (torch.rand(c, generator=g) < 0.1)
        elif kind == "rows":  # each row of 64 at its own scale
            tau = tau * torch.repeat_interleave(torch.rand(c // 64 + 1, generator=g) * 10, 64)[:c]
        elif kind == "coarse":  # few distinct magnitudes: ties everywhere
            tau = torch.round(tau * 2e3) / 2e3
        xs.append((base.float() + tau).to(dtype))
    return xs, base


def _chunks(xs, base, size):
    c = xs[0].numel()
    return lambda: [(lo, [x[lo:lo + size] for x in xs], base[lo:lo + size]) for lo in range(0, c, size)]


def _buffer_chunks(xs, base, size):
    c = xs[0].numel()
    arrs = [(_np(x), _dtype(x)) for x in xs]
    b = (_np(base), _dtype(base))
    return lambda: [(lo, [(a[lo:lo + size], d) for a, d in arrs], (b[0][lo:lo + size], b[1])) for lo in range(0, c, size)]


def _targets(c, n):
    ranks = [1, 2, c // 100, c // 5, c // 3, c // 2, c - 2, c - 1, int(0.99 * c)]
    return [(i % n, r) for i, r in enumerate(ranks)] + [(0, 0), (1 % n, c)]


@pytest.mark.parametrize("kind", ["gauss", "sparse", "rows", "coarse"])
@pytest.mark.parametrize("c", [1000, 300_001])
def test_bracket_equals_radix_on_every_ops(kind, c, monkeypatch):
    monkeypatch.setattr(stats, "EXACT_MAX", 4096)  # the sampled bracket, not the whole collection
    n = 3
    xs, base = _family(kind, c, n, torch.bfloat16, seed=c + len(kind))
    targets = _targets(c, n)
    size = 65_537 if c > 10_000 else 333
    ref = stats.select_ranks_radix(_chunks(xs, base, size), stats.TorchStats, c, targets)
    assert stats.select_ranks(_chunks(xs, base, size), stats.TorchStats, c, targets) == ref
    assert stats.select_ranks(_chunks(xs, base, size), TorchOps(CpuBackend()), c, targets) == ref
    assert stats.select_ranks(_buffer_chunks(xs, base, size), BufferOps(threads=2), c, targets) == ref


def test_ranks_are_the_sorted_order():
    """Independent of both drivers: the key of rank r is the r-th entry of a sort by
    (magnitude descending, index ascending)."""
    c = 50_000
    xs, base = _family("coarse", c, 2, torch.float16, seed=5)
    m = (xs[1].float() - base.float()).abs().numpy()
    order = np.lexsort((np.arange(c), -m))
    targets = [(1, r) for r in (1, 17, 4999, 25_000, 49_999)]
    for exact_max in (1 << 20, 1024):
        stats.EXACT_MAX, old = exact_max, stats.EXACT_MAX
        try:
            keys = stats.select_ranks(_chunks(xs, base, 7_001), TorchOps(CpuBackend()), c, targets)
        finally:
            stats.EXACT_MAX = old
        assert keys == [(float(m[order[r]]), int(order[r])) for _, r in targets]


def test_a_missed_bracket_falls_back(monkeypatch):
    """A sample that places the bracket wrongly (here: no width at all) is caught by the counts."""
    c = 200_000
    xs, base = _family("coarse", c, 2, torch.bfloat16, seed=9)
    targets = _targets(c, 2)
    ref = stats.select_ranks_radix(_chunks(xs, base, 50_000), stats.TorchStats, c, targets)
    monkeypatch.setattr(stats, "EXACT_MAX", 1024)
    monkeypatch.setattr(stats, "SIGMAS", -50.0)  # an empty-or-inverted bracket
    calls = []
    radix = stats.select_ranks_radix
    monkeypatch.setattr(stats, "select_ranks_radix", lambda *a, **k: calls.append(a[3]) or radix(*a, **k))
    assert stats.select_ranks(_chunks(xs, base, 50_000), TorchOps(CpuBackend()), c, targets) == ref
    assert calls, "the fallback was not taken"


def test_an_overfull_bracket_falls_back(monkeypatch):
    """Ties at the rank (a tensor of zeros but a few) overflow the collection cap: exact anyway."""
    c = 100_000
    base = torch.zeros(c)
    x = torch.zeros(c)
    x[::1000] = 1.0
    targets = [(0, 50), (0, 500), (0, 99_999)]
    monkeypatch.setattr(stats, "EXACT_MAX", 16)
    monkeypatch.setattr(stats, "BRACKET_BUDGET", 64)
    keys = stats.select_ranks(_chunks([x], base, 30_000), TorchOps(CpuBackend()), c, targets)
    assert keys == [(1.0, 50 * 1000), (0.0, 500 - 100 + _nth_zero(500 - 100)), (0.0, 99_999)]


@pytest.mark.parametrize("size", [200_000, 30_001])
def test_a_tied_bracket_is_located_without_the_radix_passes(size, monkeypatch):
    """A rank inside one magnitude that more entries hold than the cap (ties, as in bf16 fine-tunes):
    the sample's bracket is that magnitude, its counts say the rank is inside, and only the index is
    searched (bisected inside the chunk that holds it), no radix passes; one chunk and several."""
    c = 200_000
    g = torch.Generator().manual_seed(4)
    base = torch.zeros(c)
    x = torch.full((c,), 0.5)
    x[torch.randperm(c, generator=g)[:20_000]] = 1.0
    x[::7] = 0.25
    m = x.numpy()
    order = np.lexsort((np.arange(c), -m))
    targets = [(0, r) for r in (20_005, 50_000, 99_999, 150_000)]
    monkeypatch.setattr(stats, "EXACT_MAX", 16)
    monkeypatch.setattr(stats, "BRACKET_BUDGET", 64)
    monkeypatch.setattr(stats, "LOCATE_BLOCK", 64)
    monkeypatch.setattr(stats, "select_ranks_radix", lambda *a, **k: pytest.fail("the radix passes ran"))
    want = [(0.5, int(order[r])) for _, r in targets]
    assert all(m[order[r]] == 0.5 for _, r in targets)
    xs, b = [x.to(torch.bfloat16)], base.to(torch.bfloat16)
    for ops, chunks in [(stats.TorchStats, _chunks(xs, b, size)), (TorchOps(CpuBackend()), _chunks(xs, b, size)),
                        (BufferOps(threads=2), _buffer_chunks(xs, b, size))]:
        assert stats.select_ranks(chunks, ops, c, targets) == want


def _nth_zero(k):
    """Index offset of the k-th zero (0-based) when every 1000th entry (from 0) is one: zeros skip
    one index per thousand."""
    return k // 999 + 1


def test_nonfinite_counts_are_seen():
    c = 10_000
    xs, base = _family("gauss", c, 2, torch.float32, seed=3)
    xs[1][1234] = float("nan")
    seen = {}
    with pytest.raises(stats.NonFinite) as e:
        stats.select_ranks(_chunks(xs, base, 4096), TorchOps(CpuBackend()), c, [(0, 10), (1, 10)], seen)
    assert e.value.ingredients == [1] and seen == {0: 0, 1: 1}


def test_native_bracket_equals_torch():
    c = 70_001
    xs, base = _family("rows", c, 3, torch.bfloat16, seed=1)
    xs[2] = xs[2].float()
    xs[2][5] = float("inf")
    which, lo, hi = [0, 1, 2, 0], [0x3A000000, 0, 0x38000000, 0x3A800000], [0x3A400000, 0x3A000000, 0xFFFFFFFF, 0x3A800000]
    ref_counts, ref, ref_bins = stats.magnitude_bracket_torch(xs, base, which, lo, hi, 10**9)
    assert all(b.shape == (2, 0) for b in ref_bins)  # unbinned: no bins, two tasks of 65536
    for threads in (1, 2):
        counts, got, bins = CpuBackend().magnitude_bracket(xs, base, which, lo, hi, 10**9, threads=threads)
        np.testing.assert_array_equal(counts, ref_counts)
        for (b, i), (rb, ri) in zip(got, ref):
            np.testing.assert_array_equal(b, rb)
            np.testing.assert_array_equal(i, ri)
    counts, got, _ = magnitude_bracket_buffers([_np(x) for x in xs], [_dtype(x) for x in xs], _np(base), "bfloat16",
                                               which, lo, hi, cap=100)
    np.testing.assert_array_equal(counts, ref_counts)
    for q, (b, i) in enumerate(got):  # over the cap: counted, not collected
        assert len(b) == (ref_counts[q, 1] if ref_counts[q, 1] <= 100 else 0) == len(i)
    assert ref_counts[2, 2] == 1 and ref_counts[1, 1] > 100


def _finetunes(c, n, dtype, seed, low_bits=4):
    """Fine-tunes of one base as real ones look in bf16 / fp16: the base's low mantissa bits
    redrawn, so every task-vector entry is a few steps of the base's format (heavy ties)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(c, generator=g) * 0.02).to(dtype)
    xs = []
    for _ in range(n):
        bits = base.view(torch.int16).to(torch.int32)
        noise = torch.randint(0, 1 << low_bits, (c,), generator=g, dtype=torch.int32)
        bits = (bits & ~((1 << low_bits) - 1)) | noise
        xs.append(bits.to(torch.int16).view(dtype))
    return xs, base


@pytest.mark.parametrize("threads", [1, 2])
def test_binned_bracket_equals_torch(threads):
    """Binned targets (shift 16 for bf16 steps, 13 for fp16 steps): the per-task bin counts and
    the listed odd entries (an fp32 ingredient's magnitudes between the steps) equal the torch
    definition, on a tail task and with the odd entries over the cap (counted only)."""
    c = 3 * 65536 + 4321
    xs, base = _finetunes(c, 2, torch.bfloat16, seed=3)
    xs.append(xs[0].float() + torch.randn(c) * 1e-7 * (torch.rand(c) < 0.01))  # 1% odd magnitudes
    m0 = (xs[0].float() - base.float()).abs().view(torch.int32)
    mid = int(m0.sort().values[c // 2]) & ~0xFFFF
    which = [0, 1, 2, 2, 0]
    lo = [mid - (3 << 16), 0, mid - (3 << 16), mid & ~0x1FFF, mid]
    hi = [mid + (5 << 16) - 1 + 0x10000, (8 << 16) - 1, mid + (5 << 16) + 0xFFFF, (mid & ~0x1FFF) + (7 << 13) + 0x1FFF, mid + 7]
    shift = [16, 16, 16, 13, 0]
    ref_counts, ref, ref_bins = stats.magnitude_bracket_torch(xs, base, which, lo, hi, 10**9, shift)
    assert [b.shape for b in ref_bins] == [(4, 9), (4, 8), (4, 9), (4, 8), (4, 0)]
    assert ref_bins[0].sum() == ref_counts[0, 1] > 1000 and len(ref[0][0]) == 0  # all even: none listed
    assert 0 < len(ref[2][0]) < ref_counts[2, 1] and ref_bins[2].sum() + len(ref[2][0]) == ref_counts[2, 1]
    for cap in (10**9, 5):
        counts, got, bins = CpuBackend().magnitude_bracket(xs, base, which, lo, hi, cap, shift, threads=threads)
        np.testing.assert_array_equal(counts, ref_counts)
        for q in range(len(which)):
            np.testing.assert_array_equal(bins[q], ref_bins[q])
            listed = len(ref[q][0]) <= cap
            np.testing.assert_array_equal(got[q][0], ref[q][0] if listed else np.zeros(0, np.uint32))
            np.testing.assert_array_equal(got[q][1], ref[q][1] if listed else np.zeros(0, np.int64))
        if cap == 5:
            assert len(got[2][0]) == 0 and len(ref[2][0]) > 5
    _, _, bins = magnitude_bracket_buffers([_np(x) for x in xs], [_dtype(x) for x in xs], _np(base), "bfloat16",
                                           which, lo, hi, 10**9, shift, threads=threads)
    for q in range(len(which)):
        np.testing.assert_array_equal(bins[q], ref_bins[q])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [1 << 20, 100_003])
def test_binned_ranks_equal_radix(dtype, size, monkeypatch):
    """Fine-tune-like task vectors (every magnitude a few steps of the format): the sampled
    brackets are binned, ranks resolved from the bins (and a located task) equal the radix
    passes' keys on every ops flavour, in one chunk and in several."""
    c = 400_001
    xs, base = _finetunes(c, 3, dtype, seed=11 if dtype == torch.bfloat16 else 12)
    targets = [(i % 3, r) for i, r in enumerate([1, 777, c // 100, c // 5, c // 3, c // 2, c - 2, int(0.99 * c)])]
    used = []
    real = stats._binned_key

    def spy(*args):
        got = real(*args)
        used.append(got)
        return got

    monkeypatch.setattr(stats, "_binned_key", spy)
    monkeypatch.setattr(stats, "BIN_MIN", 1 << 10)  # bin these small tensors' brackets too
    ref = stats.select_ranks_radix(_chunks(xs, base, size), stats.TorchStats, c, targets)
    assert stats.select_ranks(_chunks(xs, base, size), stats.TorchStats, c, targets) == ref
    assert stats.select_ranks(_chunks(xs, base, size), TorchOps(CpuBackend()), c, targets) == ref
    assert stats.select_ranks(_buffer_chunks(xs, base, size), BufferOps(threads=2), c, targets) == ref
    assert sum(w is not None for _, w in used) >= 3 * 5  # most targets resolved through the bins


def test_binned_ranks_with_odd_entries(monkeypatch):
    """Entries between the bins' values that the sample did not see (an fp32 ingredient, a few
    magnitudes just above a bin's): listed by the pass and ranked among the bins' counts."""
    c = 400_001
    xs, base = _finetunes(c, 2, torch.bfloat16, seed=13)
    x0 = xs[0].float()
    m = (x0 - base.float()).abs()
    r = c // 5
    v = float(m.sort(descending=True).values[r])
    unseen = np.setdiff1d(np.arange(0, c, 997), stats.sample_positions(c, stats.SAMPLE))[:40]
    x0[unseen] = base.float()[unseen] + v * (1 + 2.0 ** -12)
    xs[0] = x0
    m = (x0 - base.float()).abs()
    assert int(((m.view(torch.int32) & 0xFFFF) != 0).sum()) == len(unseen)  # the odd ones, just above v
    first = int((m > v).sum()) - len(unseen)  # the rank of the first of them
    used = []
    real = stats._binned_key
    monkeypatch.setattr(stats, "_binned_key", lambda *a: used.append(real(*a)) or used[-1])
    monkeypatch.setattr(stats, "BIN_MIN", 1 << 10)
    targets = [(0, first + k) for k in range(-10, 60, 3)]
    ref = stats.select_ranks_radix(_chunks(xs, base, 1 << 20), stats.TorchStats, c, targets)
    for ops in (stats.TorchStats, TorchOps(CpuBackend())):
        used.clear()
        assert stats.select_ranks(_chunks(xs, base, 1 << 20), ops, c, targets) == ref
        assert sum(k is not None for k, _ in used) >= 5 and sum(w is not None for _, w in used) >= 5


def test_native_bracket_checks_its_arguments():
    x = torch.zeros(10)
    be = CpuBackend()
    with pytest.raises(MergeError, match=r"\[magnitude_bracket\] which\[0\]: must be in \[0, 1\)"):
        be.magnitude_bracket([x], None, [1], [0], [1], 5)
    with pytest.raises(MergeError, match=r"\[magnitude_bracket\] target 0: need 0 <= lo <= hi"):
        be.magnitude_bracket([x], None, [0], [5], [1], 5)
    with pytest.raises(MergeError, match=r"\[magnitude_bracket\] lo, hi: expected one per target"):
        be.magnitude_bracket([x], None, [0, 0], [0], [1], 5)
    with pytest.raises(MergeError, match=r"\[magnitude_bracket\] cap: must be >= 0"):
        be.magnitude_bracket([x], None, [0], [0], [1], -1)
    with pytest.raises(MergeError, match=r"\[magnitude_bracket\] shift: expected one per target"):
        be.magnitude_bracket([x], None, [0], [0], [0xFFFF], 5, [16, 16])
    with pytest.raises(MergeError, match=r"\[magnitude_bracket\] target 0: shift must be in \[0, 32\)"):
        be.magnitude_bracket([x], None, [0], [0], [0xFFFF], 5, [32])
    with pytest.raises(MergeError, match=r"target 0: a binned bracket needs lo's low 16 bits clear and hi's set"):
        be.magnitude_bracket([x], None, [0], [1], [0xFFFF], 5, [16])
    with pytest.raises(MergeError, match=r"target 0: 65 bins, at most 64"):
        be.magnitude_bracket([x], None, [0], [0], [(65 << 16) - 1], 5, [16])


def test_sample_positions_are_stratified():
    pos = stats.sample_positions(1_000_003, 1000)
    assert len(pos) == 1000 and np.all(np.diff(pos) > 0) and pos[0] >= 0 and pos[-1] < 1_000_003
    strata = (np.arange(1000) * 1_000_003) // 1000
    assert np.all(pos >= strata) and np.all(pos[:-1] < strata[1:])
    assert len(set(pos - strata)) > 550  # offsets spread inside the strata (~632 expected of 1000 draws)
    np.testing.assert_array_equal(pos, stats.sample_positions.__wrapped__(1_000_003, 1000))  # deterministic
    assert not pos.flags.writeable  # cached: shared by every tensor of that size
