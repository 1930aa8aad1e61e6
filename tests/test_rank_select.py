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
    ref_counts, ref = stats.magnitude_bracket_torch(xs, base, which, lo, hi, 10**9)
    for threads in (1, 2):
        counts, got = CpuBackend().magnitude_bracket(xs, base, which, lo, hi, 10**9, threads=threads)
        np.testing.assert_array_equal(counts, ref_counts)
        for (b, i), (rb, ri) in zip(got, ref):
            np.testing.assert_array_equal(b, rb)
            np.testing.assert_array_equal(i, ri)
    counts, got = magnitude_bracket_buffers([_np(x) for x in xs], [_dtype(x) for x in xs], _np(base), "bfloat16",
                                            which, lo, hi, cap=100)
    np.testing.assert_array_equal(counts, ref_counts)
    for q, (b, i) in enumerate(got):  # over the cap: counted, not collected
        assert len(b) == (ref_counts[q, 1] if ref_counts[q, 1] <= 100 else 0) == len(i)
    assert ref_counts[2, 2] == 1 and ref_counts[1, 1] > 100


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


def test_sample_positions_are_stratified():
    pos = stats.sample_positions(1_000_003, 1000)
    assert len(pos) == 1000 and np.all(np.diff(pos) > 0) and pos[0] >= 0 and pos[-1] < 1_000_003
    strata = (np.arange(1000) * 1_000_003) // 1000
    assert np.all(pos >= strata) and np.all(pos[:-1] < strata[1:])
    assert len(set(pos - strata)) > 550  # offsets spread inside the strata (~632 expected of 1000 draws)
    np.testing.assert_array_equal(pos, stats.sample_positions(1_000_003, 1000))  # deterministic
