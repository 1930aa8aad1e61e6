"""The cpu backend's transform pass (a task-vector transform under AME) against its torch definition.

``CpuBackend.transform`` / ``transform_buffers`` write each ingredient's sparsified version
x_i' = b + t_i (kept, rescaled, and with an election only the entries that agree with the
elected sign) to its own float32 buffer; they are compared BITWISE with
``methods.transforms.transform_torch`` on every SIMD level this CPU runs, odd sizes, every
input / base dtype, N = 1..8, every elect mode, rank windows from real ranks with ties,
densities with rescaling, zero task vectors, chunk offsets and thread counts. The engine
and ``ak.merge`` then give the same bits on the cpu and reference backends.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import ame_kernels as ak
from ame_kernels.backends import available
from ame_kernels.errors import MergeError
from ame_kernels.methods.combine import CombinePlan, name_key
from ame_kernels.methods.transforms import transform_torch

from test_cpu_combine import DTYPES, LEVELS, PLANS, _tied, assert_bitwise, make_inputs, window_keys

pytestmark = pytest.mark.skipif(not available()["cpu"][0], reason=f"cpu backend: {available()['cpu'][1]}")

if available()["cpu"][0]:
    from ame_kernels.backends.cpu import CpuBackend, transform_buffers


def run_both(xs, base, plan, offset=0, simd=None, threads=2, what=""):
    c = xs[0].numel()
    ref = [torch.empty(c) for _ in xs]
    got = [torch.full((c,), 7.0) for _ in xs]
    transform_torch(xs, base, ref, plan, offset)
    bad = CpuBackend(simd=simd).transform(xs, base, got, plan, offset, threads=threads)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_bitwise(g, r, f"{what} ingredient {i}")
    assert bad == sum(int((~torch.isfinite(r)).sum()) for r in ref)
    return got


TRANSFORM_PLANS = {k: PLANS[k] for k in ("ties_sum", "ties_count", "dare", "dare_ties", "drop_no_rescale")}
TRANSFORM_PLANS["unit"] = lambda n: dict(weight=np.ones(n))


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("c", [1, 7, 33, 4097])
@pytest.mark.parametrize("kind", list(TRANSFORM_PLANS))
def test_transform_plans_sizes_levels(simd, c, kind):
    gen = torch.Generator().manual_seed(c * 17 + len(kind))
    n = 1 + (c + len(kind)) % 8
    xs, base = make_inputs(n, c, ["bfloat16", "float32", "float16"], "bfloat16", gen, zero_tv=(n - 1,))
    plan = CombinePlan(n=n, **TRANSFORM_PLANS[kind](n))
    run_both(xs, base, plan, offset=c % 5, simd=simd, what=f"{kind} c={c} n={n} {simd}")


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("base_dtype", DTYPES + [None])
def test_transform_every_dtype(in_dtype, base_dtype):
    gen = torch.Generator().manual_seed(9)
    for k, n in enumerate((1, 4, 8)):
        xs, base = make_inputs(n, 133, [in_dtype, "float32"] if n > 1 else [in_dtype], base_dtype, gen)
        kind = ["ties_sum", "dare", "ties_count"][k]
        for simd in LEVELS:
            run_both(xs, base, CombinePlan(n=n, **TRANSFORM_PLANS[kind](n)), offset=3, simd=simd,
                     what=f"{kind} n={n} {simd}")


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("elect", [0, 1, 2])
def test_transform_n_elect(n, elect):
    gen = torch.Generator().manual_seed(10 * n + elect)
    xs, base = make_inputs(n, 257, ["float32", "bfloat16"], "float32", gen)
    plan = CombinePlan(n=n, weight=np.ones(n), scale=np.linspace(0.5, 1.5, n), elect=elect,
                       density=np.where(np.arange(n) % 2 == 0, 0.6, 1.0), inv_prob=True, seed=n)
    for simd in LEVELS:
        got = run_both(xs, base, plan, offset=11, simd=simd, what=f"n={n} elect={elect} {simd}")
    if elect:  # every surviving task-vector entry agrees with the others' surviving signs
        tv = torch.stack([g - base.float() for g in got])
        assert not ((tv > 0).any(0) & (tv < 0).any(0)).any()


def test_transform_windows_from_real_ranks_with_ties():
    c, n = 1000, 5
    gen = torch.Generator().manual_seed(3)
    base = torch.zeros(c).to(torch.bfloat16)
    xs = [_tied(c, gen, torch.bfloat16) for _ in range(n)]
    lo_hi = [(0, c), (0, int(0.3 * c)), (c // 10, c // 2), (c // 3, c // 3), (c - 1, c)]
    plan = CombinePlan(n=n, weight=np.ones(n), elect=1, **window_keys(xs, base, lo_hi))
    for simd in LEVELS:
        got = run_both(xs, base, plan, simd=simd, what=f"windows {simd}")
        # the window keeps exactly its rank range (before the election zeroes more)
        noelect = CombinePlan(n=n, weight=np.ones(n), **window_keys(xs, base, lo_hi))
        kept = run_both(xs, base, noelect, simd=simd, what=f"windows, no election {simd}")
        assert [int((k != 0).sum()) <= hi - lo for k, (lo, hi) in zip(kept, lo_hi)] == [True] * n
        assert all(int(((g != 0) & (k == 0)).sum()) == 0 for g, k in zip(got, kept))


def test_transform_chunks_offsets_threads():
    """A chunk equals the same slice of a whole-tensor call (Philox counters and windows use global
    indices), for any thread count."""
    gen = torch.Generator().manual_seed(4)
    c, n = 70001, 3
    xs, base = make_inputs(n, c, ["bfloat16"], "bfloat16", gen)
    plan = CombinePlan(n=n, **PLANS["dare_ties"](n))
    whole = run_both(xs, base, plan, threads=1)
    lo, hi = 12345, 12345 + 40000
    for threads in (1, 2, 5):
        part = run_both([x[lo:hi] for x in xs], base[lo:hi], plan, offset=lo, threads=threads)
        for w, p in zip(whole, part):
            assert torch.equal(w[lo:hi], p)


def test_transform_buffers_and_errors():
    gen = torch.Generator().manual_seed(6)
    n, c = 3, 301
    xs, base = make_inputs(n, c, ["bfloat16", "float16", "float32"], "float32", gen)
    plan = CombinePlan(n=n, **PLANS["ties_sum"](n))
    ref = [torch.empty(c) for _ in xs]
    transform_torch(xs, base, ref, plan, 7)
    arrays = [x.view(torch.int16).numpy() if x.dtype != torch.float32 else x.numpy() for x in xs]
    outs = [np.full(c, 3.0, dtype=np.float32) for _ in xs]
    transform_buffers(arrays, [str(x.dtype).split(".")[1] for x in xs], base.numpy(), "float32", outs, plan, 7)
    for o, r in zip(outs, ref):
        assert_bitwise(torch.from_numpy(o), r, "buffers")
    with pytest.raises(MergeError, match=r"\[transform\] outs: expected one float32 tensor per ingredient \(3\), got 2"):
        CpuBackend().transform(xs, base, ref[:2], plan)
    with pytest.raises(MergeError, match=r"\[transform\] outs\[1\]: must be float32"):
        CpuBackend().transform(xs, base, [ref[0], torch.empty(c, dtype=torch.bfloat16), ref[2]], plan)
    with pytest.raises(MergeError, match=r"\[transform_buffers\] outs\[0\]"):
        transform_buffers(arrays, ["bfloat16", "float16", "float32"], base.numpy(), "float32",
                          [np.empty(c - 1, np.float32)] + outs[1:], plan)


def test_transform_nonfinite_counted():
    xs = [torch.tensor([1.0, float("inf"), 2.0]), torch.tensor([1.0, 2.0, float("nan")])]
    plan = CombinePlan(n=2, weight=np.ones(2))
    run_both(xs, torch.zeros(3), plan)


def _family(tmp_path, n=4):
    torch.manual_seed(0)
    base = {"w": torch.randn(64, 48).to(torch.bfloat16), "b": torch.randn(48).to(torch.bfloat16)}
    paths = []
    for i in range(n):
        sd = {k: (v.float() + 0.05 * torch.randn(v.shape)).to(torch.bfloat16) for k, v in base.items()}
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file(sd, str(d / "model.safetensors"))
        paths.append(str(d))
    d = tmp_path / "base"
    d.mkdir()
    save_file(base, str(d / "model.safetensors"))
    return paths, str(d)


@pytest.mark.parametrize("transform, kw", [("dare", dict(density=0.4)), ("ties", dict(density=0.3)),
                                            ("breadcrumbs", dict(density=0.5, gamma=0.1))])
def test_engine_and_api_native_transform_equal_reference(tmp_path, transform, kw):
    """The engine's native transform pass (cpu, small chunks) gives the reference backend's bits,
    and ak.merge on the cpu backend equals ak.merge on the reference."""
    from ame_kernels.engine import merge_checkpoints

    paths, bpath = _family(tmp_path)
    opts = dict(optimizer="adagrad", lr=1e-2, epochs=2, transform=transform, seed=5, **kw)
    outs = {}
    for backend in ("cpu", "reference"):
        merge_checkpoints(paths, str(tmp_path / backend), base=bpath, chunk_mb=0.003, backend=backend, **opts)
        outs[backend] = load_file(str(tmp_path / backend / "model.safetensors"))
    assert all(torch.equal(outs["cpu"][k], outs["reference"][k]) for k in outs["cpu"])
    sds = [load_file(p + "/model.safetensors") for p in paths]
    base = load_file(bpath + "/model.safetensors")
    a = ak.merge(sds, base=base, backend="cpu", **opts)
    r = ak.merge(sds, base=base, backend="reference", **opts)
    for k in a:
        torch.testing.assert_close(a[k], r[k], rtol=0, atol=0)
