"""The cpu backend's combine pass and statistics primitives against the torch oracles.

combine is compared BITWISE with ``methods.combine.combine_torch`` (NaN outputs: NaN on
both sides, payloads aside) on every SIMD level this CPU runs, odd sizes, every dtype of
inputs / base / out, N = 1..8, every elect mode, normalize on and off, rank windows from
real ranks (ties, empty and full windows), densities, per-element probabilities,
inv_prob, zero task vectors, chunk offsets (also across a 2^32 boundary of the Philox
counter) and thread counts; magnitude_histogram must give exact counts, gram and kept_l1
float64 sums within 1e-12 (relative to the norms). Plus the torch-free buffer entry
points, select_ranks driven by the native histogram, argument checks and a hypothesis
property test.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ame_kernels
from ame_kernels.backends import available
from ame_kernels.errors import MergeError
from ame_kernels.methods import stats
from ame_kernels.methods.combine import CombinePlan, combine_torch, name_key

pytestmark = pytest.mark.skipif(not available()["cpu"][0], reason=f"cpu backend: {available()['cpu'][1]}")

if available()["cpu"][0]:
    from ame_kernels.backends.cpu import (
        CpuBackend,
        combine_buffers,
        gram_buffers,
        kept_l1_buffers,
        magnitude_histogram_buffers,
    )

    LEVELS = ame_kernels.build_info()["simd_supported"]
else:  # collected but skipped
    LEVELS = ["scalar"]

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = list(DT)
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}




@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    """The oracles in one torch thread: its int64 Philox is pathologically slow with two
    threads on a loaded machine. The native kernels get their threads explicitly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- helpers


def assert_bitwise(got, ref, what=""):
    """Same bits everywhere, except that a NaN only has to be a NaN on both sides."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    gn, rn = torch.isnan(got.float()), torch.isnan(ref.float())
    assert torch.equal(gn, rn), f"{what}: NaN positions differ"
    gi, ri = got.view(INT_VIEW[got.dtype])[~gn], ref.view(INT_VIEW[ref.dtype])[~rn]
    bad = (gi != ri).nonzero()
    if len(bad):
        k = int(bad[0])
        raise AssertionError(
            f"{what}: {len(bad)} of {got.numel()} elements differ; first at {k}: "
            f"got {got[~gn][k].item()!r} ref {ref[~rn][k].item()!r}"
        )


def make_inputs(n, c, dtypes, base_dtype, gen, zero_tv=()):
    """N inputs near a base (task vectors of a few scales), some exactly equal to it."""
    b = torch.randn(c, generator=gen)
    xs = []
    for i in range(n):
        x = b + torch.randn(c, generator=gen) * (0.05 * (i + 1))
        if i in zero_tv:
            x = b.clone()
        xs.append(x.to(DT[dtypes[i % len(dtypes)]]))
    base = None if base_dtype is None else b.to(DT[base_dtype])
    if base is not None:
        for i in zero_tv:  # x == base exactly in both dtypes
            xs[i] = base.to(xs[i].dtype)
            base = xs[i].to(base.dtype)
    return xs, base


def window_keys(xs, base, lo_hi):
    """(top_mag, top_idx, end_mag, end_idx) from real ranks, via methods.stats.select_ranks."""
    c = xs[0].numel()
    targets = []
    for i, (r_lo, r_hi) in enumerate(lo_hi):
        targets += [(i, r_lo), (i, r_hi)]
    keys = stats.select_ranks(lambda: [(0, xs, base)], stats.TorchStats, c, targets)
    tm = [keys[2 * i][0] for i in range(len(xs))]
    ti = [keys[2 * i][1] for i in range(len(xs))]
    em = [keys[2 * i + 1][0] for i in range(len(xs))]
    ei = [keys[2 * i + 1][1] for i in range(len(xs))]
    return dict(top_mag=tm, top_idx=ti, end_mag=em, end_idx=ei)


def run_both(xs, base, plan, out_dtype="float32", offset=0, probs=None, simd=None, threads=2, what=""):
    c = xs[0].numel()
    ref = torch.empty(c, dtype=DT[out_dtype])
    got = torch.full((c,), 7.0, dtype=DT[out_dtype])
    combine_torch(xs, base, ref, plan, offset, probs)
    CpuBackend(simd=simd).combine(xs, base, got, plan, offset, probs, threads=threads)
    assert_bitwise(got, ref, what)
    return got


PLANS = {
    "linear": lambda n: dict(weight=np.linspace(0.2, 1.0, n), normalize=True),
    "task_arith": lambda n: dict(weight=np.linspace(-0.5, 1.5, n), lam=0.7),
    "ties_sum": lambda n: dict(weight=np.linspace(0.3, 1.0, n), elect=1, normalize=True),
    "ties_count": lambda n: dict(weight=np.linspace(0.3, 1.0, n), elect=2, normalize=True, lam=1.3),
    "ties_no_norm": lambda n: dict(weight=np.linspace(-1.0, 1.0, n), elect=1, normalize=False),
    "dare": lambda n: dict(weight=np.full(n, 1.0 / n), density=np.linspace(0.1, 0.9, n), inv_prob=True,
                           seed=12345, name_key=name_key("model.layers.0.mlp.up_proj.weight")),
    "dare_ties": lambda n: dict(weight=np.linspace(0.5, 1.0, n), density=np.full(n, 0.3), inv_prob=True, elect=1,
                                normalize=True, seed=2**40 + 7, name_key=99),
    "drop_no_rescale": lambda n: dict(weight=np.ones(n), density=np.linspace(0.0, 1.0, n), seed=3,
                                      scale=np.linspace(0.5, 2.0, n)),
    "zero_weights": lambda n: dict(weight=np.zeros(n), normalize=True),
}


# --------------------------------------------------------------------------- combine


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("c", [1, 7, 33, 4097])
@pytest.mark.parametrize("kind", list(PLANS))
def test_combine_plans_sizes_levels(simd, c, kind):
    gen = torch.Generator().manual_seed(c * 31 + len(kind))
    n = 1 + (c + len(kind)) % 8
    xs, base = make_inputs(n, c, ["bfloat16", "float32", "float16"], "bfloat16", gen)
    plan = CombinePlan(n=n, **PLANS[kind](n))
    run_both(xs, base, plan, out_dtype="bfloat16", offset=c % 5, simd=simd, what=f"{kind} c={c} n={n}")


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("base_dtype", DTYPES + [None])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_combine_every_dtype(in_dtype, base_dtype, out_dtype):
    gen = torch.Generator().manual_seed(5)
    for k, n in enumerate((1, 4, 8)):
        xs, base = make_inputs(n, 133, [in_dtype, "float32"] if n > 1 else [in_dtype], base_dtype, gen)
        kind = ["ties_sum", "dare", "task_arith"][k]
        for simd in LEVELS:
            run_both(xs, base, CombinePlan(n=n, **PLANS[kind](n)), out_dtype, offset=3, simd=simd,
                     what=f"{kind} n={n} {simd}")


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("elect", [0, 1, 2])
@pytest.mark.parametrize("normalize", [False, True])
def test_combine_n_elect_normalize(n, elect, normalize):
    gen = torch.Generator().manual_seed(100 * n + 10 * elect + normalize)
    xs, base = make_inputs(n, 257, ["float32", "bfloat16"], "float32", gen)
    w = torch.randn(n, generator=gen).numpy()
    plan = CombinePlan(n=n, weight=w, scale=np.linspace(0.5, 1.5, n), elect=elect, normalize=normalize, lam=0.9,
                       density=np.where(np.arange(n) % 2 == 0, 0.6, 1.0), inv_prob=True, seed=n)
    for simd in LEVELS:
        run_both(xs, base, plan, "float32", offset=11, simd=simd, what=f"n={n} elect={elect} norm={normalize} {simd}")


def _tied(c, gen, dtype):
    """Entries on a coarse grid: many equal magnitudes, so ranks break ties by index."""
    return (torch.randint(-6, 7, (c,), generator=gen).float() * 0.25).to(dtype)


@pytest.mark.parametrize("c", [33, 1000])
def test_combine_windows_from_real_ranks(c):
    gen = torch.Generator().manual_seed(c)
    n = 5
    base = torch.zeros(c).to(torch.bfloat16)
    xs = [_tied(c, gen, torch.bfloat16) for _ in range(n)]
    # (r_lo, r_hi): full, top 30%, middle band (breadcrumbs), empty, the very last entry
    lo_hi = [(0, c), (0, int(0.3 * c)), (c // 10, c // 2), (c // 3, c // 3), (c - 1, c)]
    keys = window_keys(xs, base, lo_hi)
    plan = CombinePlan(n=n, weight=np.ones(n), elect=1, normalize=True, **keys)
    # sanity of the oracle: each window keeps exactly r_hi - r_lo entries
    _, parts = __import__("ame_kernels.methods.combine", fromlist=["keep_masks"]).keep_masks(xs, base, plan, 0)
    assert [int(k.sum()) for _, k, _ in parts] == [hi - lo for lo, hi in lo_hi]
    for simd in LEVELS:
        run_both(xs, base, plan, "bfloat16", simd=simd, what=f"windows {simd}")
        got = torch.empty(c)
        np.testing.assert_allclose(CpuBackend(simd=simd).kept_l1(xs, base, plan), stats.kept_l1_torch(xs, base, plan, 0),
                                   rtol=1e-12)
        # a chunk in the middle of the tensor equals the same slice of the whole call
        whole = torch.empty(c)
        CpuBackend(simd=simd).combine(xs, base, whole, plan, 0)
        lo, hi = c // 4, c // 4 + c // 3
        CpuBackend(simd=simd).combine([x[lo:hi] for x in xs], base[lo:hi], got[: hi - lo], plan, lo)
        assert_bitwise(got[: hi - lo], whole[lo:hi], f"window chunk {simd}")


def test_combine_windows_with_drop_and_ties_at_edges():
    c, n = 4097, 3
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(c).to(torch.float16)
    xs = [(base.float() + _tied(c, gen, torch.float32)).to(torch.float16) for _ in range(n)]
    lo_hi = [(1, c - 1), (0, 1), (c - 17, c)]
    keys = window_keys(xs, base, lo_hi)
    plan = CombinePlan(n=n, weight=[0.5, 1.0, -2.0], density=[0.5, 1.0, 0.25], inv_prob=True, seed=77, **keys)
    for simd in LEVELS:
        run_both(xs, base, plan, "float16", simd=simd, what=f"windows+drop {simd}")


def test_combine_per_element_probs_and_inv_prob():
    c, n = 4097, 4
    gen = torch.Generator().manual_seed(3)
    xs, base = make_inputs(n, c, ["bfloat16"], "bfloat16", gen)
    probs = [torch.rand(c, generator=gen) * 0.9 + 0.05, None, torch.ones(c), torch.rand(c, generator=gen)]
    for inv_prob in (False, True):
        plan = CombinePlan(n=n, weight=[0.4, 0.3, 0.2, 0.1], density=[1.0, 0.5, 1.0, 0.7], inv_prob=inv_prob,
                           seed=2**63 + 5, name_key=name_key("x"))
        for simd in LEVELS:
            for offset in (0, 12345):
                run_both(xs, base, plan, "float32", offset=offset, probs=probs, simd=simd,
                         what=f"probs inv={inv_prob} {simd}")


def test_combine_zero_task_vectors_and_no_base():
    c, n = 1000, 4
    gen = torch.Generator().manual_seed(4)
    xs, base = make_inputs(n, c, ["float32", "bfloat16"], "bfloat16", gen, zero_tv=(0, 2))
    assert torch.equal(xs[0].float(), base.float())
    for kind in ("ties_sum", "ties_count", "dare", "linear"):
        for simd in LEVELS:
            run_both(xs, base, CombinePlan(n=n, **PLANS[kind](n)), "bfloat16", simd=simd, what=f"{kind} zero tv")
            run_both(xs, None, CombinePlan(n=n, **PLANS[kind](n)), "float32", simd=simd, what=f"{kind} no base")
    # every task vector zero: the merge is the base, bit for bit
    same = [base.clone() for _ in range(3)]
    got = run_both(same, base, CombinePlan(n=3, **PLANS["ties_sum"](3)), "bfloat16", what="all zero")
    assert torch.equal(got, base)


def test_combine_nonfinite_inputs():
    c, n = 67, 3
    xs = [torch.randn(c) for _ in range(n)]
    xs[0][[1, 20, 40]] = float("nan")
    xs[1][[2, 20, 41]] = float("inf")
    xs[2][[3, 42]] = -float("inf")
    base = torch.randn(c)
    base[50] = float("inf")
    for kind in ("linear", "ties_sum", "ties_count", "dare"):
        for simd in LEVELS:
            run_both(xs, base, CombinePlan(n=n, **PLANS[kind](n)), "float32", simd=simd, what=f"{kind} nonfinite")


def test_combine_offsets_chunks_and_threads():
    c, n = 100003, 8
    gen = torch.Generator().manual_seed(8)
    xs, base = make_inputs(n, c, ["bfloat16"], "bfloat16", gen)
    for kind in ("dare_ties", "ties_count"):
        plan = CombinePlan(n=n, **PLANS[kind](n))
        ref = run_both(xs, base, plan, "bfloat16", offset=1000, threads=2, what=f"{kind} 100003")
        for simd in LEVELS:
            got = torch.empty(c, dtype=torch.bfloat16)
            CpuBackend(simd=simd).combine(xs, base, got, plan, 1000, threads=1)
            assert_bitwise(got, ref, f"{kind} threads=1 {simd}")
            # chunks at odd boundaries, each with its global offset, rebuild the whole call
            got.fill_(0)
            for lo, hi in ((0, 1), (1, 4096 + 3), (4099, 40000), (40000, c)):
                CpuBackend(simd=simd).combine([x[lo:hi] for x in xs], base[lo:hi], got[lo:hi], plan, 1000 + lo)
            assert_bitwise(got, ref, f"{kind} chunked {simd}")


def test_combine_philox_counter_across_2_32():
    """Global indices across 2^32 and counters (g >> 2) across 2^32 (word 1 of the counter changes
    between two of the generator's blocks), at offsets on and off the blocks' alignment."""
    c, n = 301, 3
    gen = torch.Generator().manual_seed(1)
    xs, base = make_inputs(n, c, ["float32"], "float32", gen)
    plan = CombinePlan(n=n, **PLANS["dare"](n))
    for simd in LEVELS:
        for offset in (2**32 - 5, 2**32 - 40, 2**33 + 3, 2**34 - 131, 2**34 - 64, 2**34 + 1, 2**40 - 16):
            run_both(xs, base, plan, "float32", offset=offset, simd=simd, what=f"offset {offset} {simd}")


def test_combine_avoids_fma_contraction():
    """Values where fused multiply-adds would round differently from torch's separate ops."""
    c, n = 4096, 2
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(c, generator=gen) * 1e3 + 1 / 3 for _ in range(n)]
    base = torch.randn(c, generator=gen) * 1e3
    plan = CombinePlan(n=n, weight=[1 / 3, 2 / 7], scale=[1.1, 0.9], lam=0.3)
    for simd in LEVELS:
        run_both(xs, base, plan, "float32", simd=simd, what=f"fma {simd}")


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("simd", LEVELS)
def test_magnitude_histogram_exact(simd):
    gen = torch.Generator().manual_seed(6)
    be = CpuBackend(simd=simd)
    for c, dt, bdt in ((1, "float32", None), (33, "bfloat16", "float32"), (100003, "float16", "bfloat16")):
        xs, base = make_inputs(1, c, [dt], bdt, gen)
        x = xs[0]
        hi = be.magnitude_histogram(x, base, 0, 0, 16, 65536, threads=2)
        assert hi.dtype == np.int64 and hi.shape == (65536,)
        np.testing.assert_array_equal(hi, stats.magnitude_histogram_torch(x, base, 0, 0, 16, 65536))
        top = int(np.flatnonzero(hi)[-1]) << 16  # a real prefix
        for pm, pre, shift, nb in ((0xFFFF0000, top, 0, 65536), (0xFFFFFFFF, 0, 0, 1), (0, 0, 23, 256),
                                   (0xFF000000, top & 0xFF000000, 8, 1024)):
            np.testing.assert_array_equal(be.magnitude_histogram(x, base, pm, pre, shift, nb, threads=1),
                                          stats.magnitude_histogram_torch(x, base, pm, pre, shift, nb))


def _assert_gram_close(got, ref):
    scale = np.sqrt(np.outer(np.diag(ref), np.diag(ref))) + 1e-300
    assert np.all(np.abs(got - ref) <= 1e-12 * scale), np.max(np.abs(got - ref) / scale)


@pytest.mark.parametrize("simd", LEVELS)
def test_gram_and_kept_l1(simd):
    gen = torch.Generator().manual_seed(7)
    be = CpuBackend(simd=simd)
    for c, n in ((1, 1), (7, 3), (4097, 8), (100003, 5)):
        xs, base = make_inputs(n, c, DTYPES, "bfloat16" if n % 2 else None, gen, zero_tv=(1,) if n > 2 else ())
        g = be.gram(xs, base, threads=2)
        assert g.shape == (n, n) and np.array_equal(g, g.T)
        _assert_gram_close(g, stats.gram_torch(xs, base))
        np.testing.assert_array_equal(be.gram(xs, base, threads=1), g)  # thread count does not change the sum
        plan = CombinePlan(n=n, weight=np.ones(n), density=np.linspace(0.2, 1.0, n), seed=c)
        probs = [None] * n
        probs[0] = torch.rand(c, generator=gen)
        for pr in (None, probs):
            k = be.kept_l1(xs, base, plan, 17, pr, threads=2)
            assert k.shape == (n, 2)
            np.testing.assert_allclose(k, stats.kept_l1_torch(xs, base, plan, 17, pr), rtol=1e-12, atol=1e-300)
            np.testing.assert_array_equal(be.kept_l1(xs, base, plan, 17, pr, threads=1), k)


def test_stats_same_on_every_level():
    gen = torch.Generator().manual_seed(8)
    xs, base = make_inputs(6, 70001, ["bfloat16", "float32"], "float16", gen)
    plan = CombinePlan(n=6, weight=np.ones(6), density=np.full(6, 0.4), seed=1)
    gs = [CpuBackend(simd=s).gram(xs, base) for s in LEVELS]
    ks = [CpuBackend(simd=s).kept_l1(xs, base, plan, 5) for s in LEVELS]
    for g, k in zip(gs[1:], ks[1:]):
        np.testing.assert_array_equal(g, gs[0])
        np.testing.assert_array_equal(k, ks[0])


def test_kept_l1_windows():
    c, n = 1000, 3
    gen = torch.Generator().manual_seed(10)
    base = torch.zeros(c)
    xs = [_tied(c, gen, torch.float32) for _ in range(n)]
    keys = window_keys(xs, base, [(0, 300), (100, 900), (500, 500)])
    plan = CombinePlan(n=n, weight=np.ones(n), density=[1.0, 0.5, 1.0], seed=4, **keys)
    for simd in LEVELS:
        np.testing.assert_allclose(CpuBackend(simd=simd).kept_l1(xs, base, plan, 0),
                                   stats.kept_l1_torch(xs, base, plan, 0), rtol=1e-12)


class _CpuOps:
    """The select_ranks ops with the native histogram."""

    def __init__(self, simd):
        self.be = CpuBackend(simd=simd)

    def hist(self, x, b, pm, p, shift, nbins):
        return self.be.magnitude_histogram(x, b, pm, p, shift, nbins)

    magnitudes = staticmethod(stats.magnitudes_torch)
    length = staticmethod(stats.TorchStats.length)
    slice = staticmethod(stats.TorchStats.slice)


def test_select_ranks_with_native_histogram():
    c = 5000
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(c).to(torch.bfloat16)
    xs = [(base.float() + _tied(c, gen, torch.float32)).to(torch.bfloat16) for _ in range(2)]
    chunks = lambda: [(lo, [x[lo:lo + 1024] for x in xs], base[lo:lo + 1024]) for lo in range(0, c, 1024)]  # noqa: E731
    targets = [(0, 1), (0, 2500), (1, 4999), (1, 0), (1, c), (0, 777)]
    ref = stats.select_ranks(chunks, stats.TorchStats, c, targets)
    for simd in LEVELS:
        assert stats.select_ranks_radix(chunks, _CpuOps(simd), c, targets) == ref


# --------------------------------------------------------------------------- buffers


def _np(t):
    """A torch CPU tensor as a numpy array sharing memory (bf16 as uint16)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def test_buffers_match_torch_entry_points():
    c, n = 4097, 4
    gen = torch.Generator().manual_seed(12)
    xs, base = make_inputs(n, c, ["bfloat16", "float16", "float32"], "bfloat16", gen)
    dts = [str(x.dtype).replace("torch.", "") for x in xs]
    plan = CombinePlan(n=n, **PLANS["dare_ties"](n))
    probs = [None, torch.rand(c, generator=gen), None, None]
    for out_dtype in DTYPES:
        ref = torch.empty(c, dtype=DT[out_dtype])
        combine_torch(xs, base, ref, plan, 9, probs)
        got = torch.empty(c, dtype=DT[out_dtype])
        combine_buffers([_np(x) for x in xs], dts, _np(base), "bfloat16", _np(got), out_dtype, plan, offset=9,
                        probs=[None if p is None else p.numpy() for p in probs], threads=2)
        assert_bitwise(got, ref, f"combine_buffers {out_dtype}")
    # raw bytes (a memoryview, as from an mmap) work too
    got = torch.empty(c, dtype=torch.bfloat16)
    combine_buffers([memoryview(_np(x).tobytes()) for x in xs], dts, memoryview(_np(base).tobytes()), "bf16",
                    _np(got), "bfloat16", plan, offset=9, probs=[None if p is None else p.numpy() for p in probs])
    ref = torch.empty(c, dtype=torch.bfloat16)
    combine_torch(xs, base, ref, plan, 9, probs)
    assert_bitwise(got, ref, "combine_buffers memoryview")
    np.testing.assert_array_equal(
        magnitude_histogram_buffers(_np(xs[0]), "bfloat16", _np(base), "bfloat16", 0, 0, 16, 65536),
        stats.magnitude_histogram_torch(xs[0], base, 0, 0, 16, 65536))
    np.testing.assert_array_equal(magnitude_histogram_buffers(_np(xs[2]), "float32", None, None, 0, 0, 20, 4096),
                                  stats.magnitude_histogram_torch(xs[2], None, 0, 0, 20, 4096))
    _assert_gram_close(gram_buffers([_np(x) for x in xs], dts, _np(base), "bfloat16"), stats.gram_torch(xs, base))
    _assert_gram_close(gram_buffers([_np(x) for x in xs], dts, None, None), stats.gram_torch(xs, None))
    np.testing.assert_allclose(kept_l1_buffers([_np(x) for x in xs], dts, _np(base), "bfloat16", plan, 3),
                               stats.kept_l1_torch(xs, base, plan, 3), rtol=1e-12)


# --------------------------------------------------------------------------- argument checks


def test_argument_errors_name_function_and_argument():
    be = CpuBackend()
    c = 16
    xs = [torch.randn(c), torch.randn(c).bfloat16()]
    out = torch.empty(c)
    plan = CombinePlan(n=2, weight=[1, 1])
    with pytest.raises(MergeError, match=r"\[combine\] plan"):
        be.combine(xs, None, out, "ties")
    with pytest.raises(MergeError, match=r"\[combine\] inputs: the plan is for 3"):
        be.combine(xs, None, out, CombinePlan(n=3, weight=None))
    with pytest.raises(MergeError, match=r"\[combine\] inputs\[1\]: expected 16 elements"):
        be.combine([xs[0], torch.randn(15)], None, out, plan)
    with pytest.raises(MergeError, match=r"\[combine\] base: .*float64"):
        be.combine(xs, torch.randn(c, dtype=torch.float64), out, plan)
    with pytest.raises(MergeError, match=r"\[combine\] out: must be contiguous"):
        be.combine(xs, None, torch.empty(2 * c)[::2], plan)
    with pytest.raises(MergeError, match=r"\[combine\] offset"):
        be.combine(xs, None, out, plan, offset=-1)
    with pytest.raises(MergeError, match=r"\[combine\] probs: expected None or 2"):
        be.combine(xs, None, out, plan, probs=[None])
    with pytest.raises(MergeError, match=r"\[combine\] probs\[1\]: must be float32"):
        be.combine(xs, None, out, plan, probs=[None, torch.rand(c).half()])
    bad = CombinePlan(n=2, weight=[1, 1])
    bad.elect = 5
    with pytest.raises(MergeError, match=r"\[combine\] elect"):
        be.combine(xs, None, out, bad)
    bad = CombinePlan(n=2, weight=[1, 1])
    bad.weight = np.ones(3, dtype=np.float32)
    with pytest.raises(MergeError, match=r"\[combine\] weight: expected shape \[N\]"):
        be.combine(xs, None, out, bad)
    bad = CombinePlan(n=2, weight=[1, 1])
    bad.top_idx = np.zeros(2, dtype=np.int32)
    with pytest.raises(MergeError, match=r"\[combine\] top_idx: expected a int64 array"):
        be.combine(xs, None, out, bad)
    with pytest.raises(MergeError, match=r"\[magnitude_histogram\] nbins: must be a power of two"):
        be.magnitude_histogram(xs[0], None, 0, 0, 0, 1000)
    with pytest.raises(MergeError, match=r"\[magnitude_histogram\] shift"):
        be.magnitude_histogram(xs[0], None, 0, 0, 32, 16)
    with pytest.raises(MergeError, match=r"\[magnitude_histogram\] prefix_mask"):
        be.magnitude_histogram(xs[0], None, 2**40, 0, 0, 16)
    with pytest.raises(MergeError, match=r"\[gram\] inputs\[1\]"):
        be.gram([xs[0], torch.randn(c, dtype=torch.float64)], None)
    with pytest.raises(MergeError, match=r"\[kept_l1\] inputs: the plan is for 2"):
        be.kept_l1(xs[:1], None, plan)
    with pytest.raises(MergeError, match=r"\[combine_buffers\] input_dtypes\[0\]"):
        combine_buffers([np.zeros(c, np.float32)] * 2, ["int8", "float32"], None, None, np.zeros(c, np.float32),
                        "float32", plan)
    with pytest.raises(MergeError, match=r"\[combine_buffers\] inputs\[1\]: expected 16 float32"):
        combine_buffers([np.zeros(c, np.float32), np.zeros(c + 1, np.float32)], ["float32"] * 2, None, None,
                        np.zeros(c, np.float32), "float32", plan)
    with pytest.raises(MergeError, match=r"\[combine_buffers\] out: must be writable"):
        ro = np.zeros(c, np.float32)
        ro.flags.writeable = False
        combine_buffers([np.zeros(c, np.float32)] * 2, ["float32"] * 2, None, None, ro, "float32", plan)
    with pytest.raises(MergeError, match=r"\[gram_buffers\] base"):
        gram_buffers([np.zeros(c, np.float32)], ["float32"], np.zeros(3, np.float32), "float32")
    with pytest.raises(MergeError, match=r"\[kept_l1_buffers\] probs\[0\]: must hold float32"):
        kept_l1_buffers([np.zeros(c, np.float32)] * 2, ["float32"] * 2, None, None, plan,
                        probs=[np.zeros(c, np.float64), None])
    with pytest.raises(MergeError, match=r"\[magnitude_histogram_buffers\] nbins"):
        magnitude_histogram_buffers(np.zeros(c, np.float32), "float32", None, None, 0, 0, 0, 3)


def test_empty_chunk():
    be = CpuBackend()
    xs = [torch.empty(0), torch.empty(0)]
    plan = CombinePlan(n=2, weight=None, density=[0.5, 0.5])
    be.combine(xs, None, torch.empty(0), plan)
    assert be.magnitude_histogram(xs[0], None, 0, 0, 16, 8).sum() == 0
    assert np.array_equal(be.gram(xs, None), np.zeros((2, 2)))
    assert np.array_equal(be.kept_l1(xs, None, plan), np.zeros((2, 2)))


# --------------------------------------------------------------------------- property


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=st.integers(1, 300),
    n=st.integers(1, 8),
    dts=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=3),
    base_dtype=st.sampled_from(DTYPES + [None]),
    out_dtype=st.sampled_from(DTYPES),
    elect=st.sampled_from([0, 1, 2]),
    normalize=st.booleans(),
    inv_prob=st.booleans(),
    density=st.sampled_from([1.0, 0.5, 0.01, 0.0]),
    lam=st.floats(-3, 3, width=32),
    offset=st.integers(0, 2**34),
    seed=st.integers(0, 2**64 - 1),
    window=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    simd=st.sampled_from(LEVELS),
    data_seed=st.integers(0, 2**31),
)
def test_combine_property(c, n, dts, base_dtype, out_dtype, elect, normalize, inv_prob, density, lam, offset, seed,
                          window, simd, data_seed):
    gen = torch.Generator().manual_seed(data_seed)
    xs, base = make_inputs(n, c, dts, base_dtype, gen)
    lo, hi = sorted(int(w * c) for w in window)
    keys = window_keys(xs, base, [(lo, hi)] * n)
    w = torch.randn(n, generator=gen).numpy()
    plan = CombinePlan(n=n, weight=w, scale=torch.rand(n, generator=gen).numpy() + 0.5, elect=elect,
                       normalize=normalize, lam=lam, inv_prob=inv_prob, density=np.full(n, density), seed=seed,
                       name_key=data_seed, **keys)
    run_both(xs, base, plan, out_dtype, offset=offset, simd=simd, threads=1 + data_seed % 2, what="property")


def test_combine_counts_nonfinite_written():
    """combine returns the count of Inf/NaN it wrote, in out's dtype (fp16 overflow included):
    the engine's output check without a second pass."""
    c = 1000
    base = torch.zeros(c)
    x = torch.ones(c)
    x[3] = float("nan")
    x[10] = 1e5  # finite in fp32, Inf once written as fp16
    plan = CombinePlan(n=1, weight=np.ones(1))
    for dtype, want in ((torch.float32, 1), (torch.bfloat16, 1), (torch.float16, 2)):
        out = torch.empty(c, dtype=dtype)
        assert CpuBackend().combine([x], base, out, plan, 0) == want
        assert int((~torch.isfinite(out.float())).sum()) == want
    out = np.empty(c, np.float32)
    assert combine_buffers([x.numpy()], ["float32"], base.numpy(), "float32", out, "float32", plan) == 1


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("base_dtype", DTYPES + [None])
def test_magnitude_sample_buffers_match_torch(x_dtype, base_dtype):
    """The rank selection's sample gathered natively on threads: the bits magnitude_sample_torch gives."""
    from ame_kernels.backends.cpu import magnitude_sample_buffers

    gen = torch.Generator().manual_seed(11)
    c = 50021
    xs, base = make_inputs(1, c, [x_dtype], base_dtype, gen)
    pos = np.sort(torch.randint(0, c, (7001,), generator=gen).numpy()).astype(np.int64)
    want = stats.magnitude_sample_torch(xs[0], base, pos)

    def buf(t):
        return None if t is None else (t.view(torch.int16).numpy() if t.dtype != torch.float32 else t.numpy())

    for threads in (1, 3):
        got = magnitude_sample_buffers(buf(xs[0]), x_dtype, buf(base), base_dtype, pos, threads=threads)
        assert got.dtype == np.uint32 and np.array_equal(got, want)
    with pytest.raises(MergeError, match=r"\[magnitude_sample_buffers\] positions\[1\]: 50021 is outside \[0, 50021\)"):
        magnitude_sample_buffers(buf(xs[0]), x_dtype, buf(base), base_dtype, np.array([0, c], dtype=np.int64))


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("c", [1, 9, 4097, 70001])
def test_keep_masks_from_kept_l1_feed_combine(simd, c):
    """kept_l1_buffers(masks=...) writes each drawing ingredient's keep mask (bit j % 8 of byte j / 8,
    the very keep of combine_torch), and combine_buffers / transform_buffers(masks=...) read them
    instead of drawing again: the same bits as without; masks that differ change the result (read)."""
    from ame_kernels.backends.cpu import transform_buffers
    from ame_kernels.methods.combine import keep_masks
    from ame_kernels.methods.transforms import transform_torch

    gen = torch.Generator().manual_seed(c)
    n = 4
    xs, base = make_inputs(n, c, ["bfloat16", "float16", "float32"], "bfloat16", gen, zero_tv=(3,))
    dts = [str(x.dtype).replace("torch.", "") for x in xs]
    plan = CombinePlan(n=n, weight=np.linspace(0.5, 1.0, n), density=np.array([0.3, 1.0, 0.6, 0.5]), inv_prob=True,
                       elect=1, normalize=True, seed=2**33 + 5, name_key=77)
    probs = [None, None, torch.rand(c, generator=gen), None]
    np_probs = [None if p is None else p.numpy() for p in probs]
    masks = [np.full(-(-c // 8), 0xA5, np.uint8) if i != 1 else None for i in range(n)]
    l1 = kept_l1_buffers([_np(x) for x in xs], dts, _np(base), "bfloat16", plan, 21, np_probs, threads=2, simd=simd,
                         masks=masks)
    np.testing.assert_allclose(l1, stats.kept_l1_torch(xs, base, plan, 21, probs), rtol=1e-12)
    _, parts = keep_masks(xs, base, plan, 21, probs)
    for i, m in enumerate(masks):
        if m is not None:
            bits = np.unpackbits(m, bitorder="little")[:c].astype(bool)
            assert np.array_equal(bits, parts[i][1].numpy()), f"ingredient {i}"
    ref = torch.empty(c, dtype=torch.bfloat16)
    combine_torch(xs, base, ref, plan, 21, probs)
    got = torch.empty(c, dtype=torch.bfloat16)
    combine_buffers([_np(x) for x in xs], dts, _np(base), "bfloat16", _np(got), "bfloat16", plan, offset=21,
                    probs=np_probs, threads=2, simd=simd, masks=masks)
    assert_bitwise(got, ref, "combine with kept_l1's masks")
    touts = [np.empty(c, np.float32) for _ in range(n)]
    tref = [torch.empty(c) for _ in range(n)]
    tplan = CombinePlan(n=n, weight=np.ones(n), density=plan.density, inv_prob=True, seed=plan.seed,
                        name_key=plan.name_key)
    tmasks = [np.empty(-(-c // 8), np.uint8) if i != 1 else None for i in range(n)]
    kept_l1_buffers([_np(x) for x in xs], dts, _np(base), "bfloat16", tplan, 21, None, simd=simd, masks=tmasks)
    transform_torch(xs, base, tref, tplan, 21)
    transform_buffers([_np(x) for x in xs], dts, _np(base), "bfloat16", touts, tplan, 21, simd=simd, masks=tmasks)
    for o, r in zip(touts, tref):
        assert_bitwise(torch.from_numpy(o), r, "transform with kept_l1's masks")
    if c > 8:  # inverted masks are read: the result changes
        flipped = [None if m is None else ~m for m in masks]
        combine_buffers([_np(x) for x in xs], dts, _np(base), "bfloat16", _np(got), "bfloat16", plan, offset=21,
                        probs=np_probs, threads=2, simd=simd, masks=flipped)
        assert not torch.equal(got, ref)
    with pytest.raises(MergeError, match=r"\[combine_buffers\] masks\[0\]: expected a contiguous uint8 array"):
        combine_buffers([_np(x) for x in xs], dts, _np(base), "bfloat16", _np(got), "bfloat16", plan,
                        masks=[np.zeros(c + 8, np.uint8)] + masks[1:])
    with pytest.raises(MergeError, match=r"\[kept_l1_buffers\] masks: expected one per ingredient \(4\), got 1"):
        kept_l1_buffers([_np(x) for x in xs], dts, _np(base), "bfloat16", plan, masks=[None])
