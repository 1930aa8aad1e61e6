"""The cpu backend's whole-run kernel against the reference backend (torch.optim).

Every optimizer variant x input/output dtype x odd sizes x schedule options, on every
SIMD level this CPU runs (scalar, avx2, avx512), plus the buffer entry point of the
checkpoint engine, non-finite reporting and the binding's argument checks.
"""

import mmap

import numpy as np
import pytest
import torch

from ame_kernels.config import OPTIMIZERS
import ame_kernels
from ame_kernels.backends import available
from ame_kernels.config import AMEConfig
from ame_kernels.errors import MergeError
from ame_kernels.schedule import schedule
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not available()["cpu"][0], reason=f"cpu backend: {available()['cpu'][1]}")

if available()["cpu"][0]:
    from ame_kernels.backends.cpu import CpuBackend, whole_run_buffers
    from ame_kernels.backends.reference import ReferenceBackend

    LEVELS = ame_kernels.build_info()["simd_supported"]
else:  # collected but skipped
    LEVELS = ["scalar"]

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# One entry per rule variant the kernels compile (csrc/common/dispatch.h), with the
# options that change arithmetic: momentum/nesterov/dampening, coupled and decoupled
# weight decay, amsgrad, eps inside the square root, lr_decay, initial accumulator.
VARIANTS = {
    "gd": dict(optimizer="sgd"),
    "sgd_momentum": dict(optimizer="sgd", momentum=0.9, dampening=0.1, lr=0.5),
    "sgd_nesterov_wd": dict(optimizer="sgd", momentum=0.8, nesterov=True, weight_decay=0.05, lr=0.5),
    "adagrad": dict(optimizer="adagrad", lr=0.1),
    "adagrad_inside_decay": dict(optimizer="adagrad", lr=0.1, eps_inside_sqrt=True, lr_decay=0.1,
                                 initial_accumulator_value=0.2, eps=1e-6),
    "adam": dict(optimizer="adam", lr=0.01),
    "adam_amsgrad_wd": dict(optimizer="adam", lr=0.01, amsgrad=True, weight_decay=0.1),
    "adamw": dict(optimizer="adamw", lr=0.01, weight_decay=0.1),
    "adamw_inside_amsgrad": dict(optimizer="adamw", lr=0.01, weight_decay=0.1, eps_inside_sqrt=True, amsgrad=True,
                                 eps=1e-6),
    "adadelta_wd": dict(optimizer="adadelta", weight_decay=0.01),
}


def _inputs(n, c, dtypes, scale=1.0):
    return [(torch.randn(c) * scale + 0.5 * i).to(DT[dtypes[i % len(dtypes)]]) for i in range(n)]


def _run_both(xs, cfg, pivot=None, adaptive=True, out_dtype="float32", simd=None, threads=2):
    plan = schedule(cfg, len(xs))
    c = xs[0].numel()
    ref = torch.empty(c, dtype=DT[out_dtype])
    got = torch.empty(c, dtype=DT[out_dtype])
    ReferenceBackend().whole_run(xs, plan, pivot, adaptive, ref)
    CpuBackend(simd=simd).whole_run(xs, plan, pivot, adaptive, got, threads=threads)
    return got, ref


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("size", [1, 7, 4097, 40009])  # 40009: prime, 3 blocks on 2 threads, ragged tail
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_every_optimizer(variant, size, simd):
    xs = _inputs(5, size, ["float32"])
    cfg = AMEConfig(**VARIANTS[variant], epochs=2, batch_size=2)
    got, ref = _run_both(xs, cfg, simd=simd)
    assert_close(got, ref, what=f"{variant} C={size} {simd}")


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("in_dtypes", [("float32",), ("bfloat16",), ("float16",), ("bfloat16", "float16", "float32")],
                         ids=["f32", "bf16", "f16", "mixed"])
@pytest.mark.parametrize("variant", ["gd", "adam", "adadelta_wd"])
def test_parity_dtypes(variant, in_dtypes, out_dtype, simd):
    xs = _inputs(4, 1031, in_dtypes)
    got, ref = _run_both(xs, AMEConfig(**VARIANTS[variant]), out_dtype=out_dtype, simd=simd)
    # Both round their own fp32 result once: at most one unit in the last place apart.
    assert_close(got, ref, dtype=DT[out_dtype], what=f"{variant} {in_dtypes}->{out_dtype} {simd}")


SCHEDULES = {
    "batches3_epochs3": dict(batch_size=3, epochs=3),
    "shuffle": dict(epochs=3, shuffle=True, seed=7),
    "fixed_pivot": dict(epochs=2, adaptive_pivot=False),
    "pivot_index": dict(pivot=2, epochs=2),
    "pivot_tensor_fixed": dict(pivot="tensor", adaptive_pivot=False),
    "lr_constant": dict(lr_schedule="constant"),
    "lr_power": dict(lr_schedule="power", lr_power=-0.5, epochs=2),
    "lr_sequence": dict(lr_schedule=[0.3, 0.1, 0.2, 0.05, 0.01, 0.02]),
    "amplification": dict(amplification=6.0),
    "amplification_sequence": dict(amplification=[1.0, 2.0, 3.0, 0.5, 6.0, 1.5]),
    "scores_ascending": dict(scores=[0.3, 0.9, 0.1, 0.5, 0.7, 0.2], descending=False, batch_size=4),
}


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("sched", sorted(SCHEDULES))
def test_parity_schedules(sched, optimizer, simd):
    opts = dict(SCHEDULES[sched])
    if optimizer != "sgd" and "lr_schedule" in opts and not isinstance(opts["lr_schedule"], str):
        opts["lr_schedule"] = [v / 10 for v in opts["lr_schedule"]]
    xs = _inputs(6, 1543, ["bfloat16", "float32"])
    adaptive = opts.pop("adaptive_pivot", True)
    pivot = opts.pop("pivot", None)
    if pivot == "tensor":
        pivot = torch.randn(1543).to(torch.bfloat16)
    lr = {"sgd": None, "adadelta": None}.get(optimizer, 0.01)
    cfg = AMEConfig(optimizer=optimizer, lr=lr, **opts)
    got, ref = _run_both(xs, cfg, pivot=pivot, adaptive=adaptive, simd=simd)
    assert_close(got, ref, what=f"{sched} {optimizer} {simd}")


def test_soup_identity_gd():
    """GD, lr 1 constant, fixed pivot, zeta 1, B 1, E 1 -> the uniform soup (eq. 3/4)."""
    xs = _inputs(7, 999, ["float32"])
    cfg = AMEConfig(optimizer="sgd", lr=1.0, lr_schedule="constant")
    plan = schedule(cfg, 7)
    out = torch.empty(999)
    CpuBackend().whole_run(xs, plan, 3, False, out)
    assert_close(out, torch.stack(xs).mean(0), what="soup identity")


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_do_not_change_result(threads):
    xs = _inputs(5, 40009, ["bfloat16"])
    plan = schedule(AMEConfig(optimizer="adam", lr=0.01, epochs=2), 5)
    a, b = torch.empty(40009), torch.empty(40009)
    CpuBackend().whole_run(xs, plan, None, True, a, threads=2)
    CpuBackend().whole_run(xs, plan, None, True, b, threads=threads)
    assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", ["adagrad", "adam", "adamw", "adadelta"])
def test_vector_levels_agree_bitwise_when_exact(optimizer):
    """exact=True: avx2 and avx512 run the same fp32 operations (FMA, exact sqrt/div) lane
    by lane. The default estimates differ between the levels, within the tolerances."""
    vec = [lvl for lvl in LEVELS if lvl != "scalar"]
    if len(vec) < 2:
        pytest.skip("needs two vector levels on this CPU")
    xs = _inputs(4, 4097, ["bfloat16", "float16"])
    plan = schedule(AMEConfig(optimizer=optimizer, lr=0.01, weight_decay=0.1, epochs=2, batch_size=2), 4)
    outs, fast = [], []
    for lvl in vec:
        o, f = torch.empty(4097), torch.empty(4097)
        CpuBackend(simd=lvl, exact=True).whole_run(xs, plan, None, True, o)
        CpuBackend(simd=lvl, exact=False).whole_run(xs, plan, None, True, f)
        outs.append(o)
        fast.append(f)
    assert torch.equal(outs[0], outs[1])
    assert_close(fast[0], fast[1], what=f"{optimizer}: fast avx2 vs avx512")
    assert_close(fast[1], outs[1], what=f"{optimizer}: fast vs exact")


def test_bf16_rounding_is_nearest_even():
    """Output rounding of fp32 values exactly between two bf16/fp16 neighbours (ties to even),
    overflow to Inf (fp16), subnormals and NaN, against torch's own conversion."""
    vals = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-11), 1.0 + 3 * 2**-11, 3.0e38, 70000.0, float("nan"),
                         1e-40, 3e-6, 0.0])
    for dt in ("bfloat16", "float16"):
        for lvl in LEVELS:
            out = torch.empty(len(vals), dtype=DT[dt])
            # GD with lr 1, fixed pivot, B 1, E 1 from pivot w0 = x: the output is the soup of one input.
            plan = schedule(AMEConfig(optimizer="sgd", lr=1.0, lr_schedule="constant"), 1)
            CpuBackend(simd=lvl).whole_run([vals], plan, 0, False, out)
            assert torch.equal(out.float().isnan(), vals.to(DT[dt]).float().isnan())
            ok = ~vals.isnan()
            assert torch.equal(out.float()[ok], vals.to(DT[dt]).float()[ok]), (dt, lvl, out, vals.to(DT[dt]))


@pytest.mark.parametrize("simd", LEVELS)
def test_check_finite_names_inputs(simd):
    xs = _inputs(4, 4097, ["bfloat16", "float32"])
    xs[1][4096] = float("nan")
    xs[3][17] = float("inf")
    plan = schedule(AMEConfig(), 4)
    out = torch.empty(4097)
    be = CpuBackend(simd=simd)
    assert be.whole_run(xs, plan, None, True, out, check_finite=True) == [1, 3]
    assert be.whole_run(xs, plan, None, True, out, check_finite=False) == []
    xs[1][4096] = 0.0
    xs[3][17] = 0.0
    assert be.whole_run(xs, plan, None, True, out, check_finite=True) == []


def test_buffers_entry_matches_tensors_and_reads_mmap(tmp_path):
    n, c = 3, 5003
    xs = _inputs(n, c, ["bfloat16", "float16", "float32"])
    plan = schedule(AMEConfig(optimizer="adam", lr=0.01, epochs=2), n)
    expect = torch.empty(c, dtype=torch.bfloat16)
    CpuBackend().whole_run(xs, plan, None, True, expect)

    path = tmp_path / "inputs.bin"
    raw = [x.view(torch.int16).numpy().tobytes() if x.dtype == torch.bfloat16 else x.numpy().tobytes() for x in xs]
    path.write_bytes(b"".join(raw))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        bufs, pos = [], 0
        for r in raw:
            bufs.append(view[pos : pos + len(r)])
            pos += len(r)
        out = np.empty(c, dtype=np.uint16)
        bad = whole_run_buffers(bufs, ["bfloat16", "float16", "float32"], plan, None, True, out, "bfloat16")
        del bufs, view
    assert bad == []
    assert np.array_equal(out, expect.view(torch.int16).numpy().view(np.uint16))

    # numpy arrays and an explicit fp32 pivot array
    arrays = [x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy() for x in xs]
    pivot = np.linspace(-1, 1, c, dtype=np.float32)
    out32 = np.empty(c, dtype=np.float32)
    whole_run_buffers(arrays, ["bfloat16", "float16", "float32"], plan, pivot, False, out32, "float32")
    ref = torch.empty(c)
    ReferenceBackend().whole_run(xs, plan, torch.from_numpy(pivot), False, ref)
    assert_close(torch.from_numpy(out32), ref, what="buffers with pivot array")


def test_buffers_errors():
    plan = schedule(AMEConfig(), 2)
    a = np.zeros(10, dtype=np.float32)
    with pytest.raises(MergeError, match=r"\[whole_run_buffers\] inputs\[1\]: expected 10 float32"):
        whole_run_buffers([a, np.zeros(9, np.float32)], ["float32", "float32"], plan, None, True, np.empty(10, np.float32), "float32")
    with pytest.raises(MergeError, match=r"input_dtypes\[0\]: unsupported dtype 'int8'"):
        whole_run_buffers([a, a], ["int8", "float32"], plan, None, True, np.empty(10, np.float32), "float32")
    ro = np.empty(10, np.float32)
    ro.flags.writeable = False
    with pytest.raises(MergeError, match=r"out: must be writable"):
        whole_run_buffers([a, a], ["float32", "float32"], plan, None, True, ro, "float32")
    with pytest.raises(MergeError, match=r"inputs\[0\]: array of float32 does not hold bfloat16"):
        whole_run_buffers([a, a], ["bfloat16", "float32"], plan, None, True, np.empty(10, np.float32), "float32")
    with pytest.raises(MergeError, match=r"the plan is for 2 ingredients, got 1"):
        whole_run_buffers([a], ["float32"], plan, None, True, np.empty(10, np.float32), "float32")
    with pytest.raises(MergeError, match=r"pivot: index 5 is not in \[0, 2\)"):
        whole_run_buffers([a, a], ["float32", "float32"], plan, 5, True, np.empty(10, np.float32), "float32")


def test_backend_errors():
    be = CpuBackend()
    plan = schedule(AMEConfig(), 2)
    x = torch.zeros(10)
    with pytest.raises(MergeError, match=r"\[whole_run\] inputs\[1\]: expected 10 elements, got 9"):
        be.whole_run([x, torch.zeros(9)], plan, None, True, torch.empty(10))
    with pytest.raises(MergeError, match=r"inputs\[0\]: must be contiguous"):
        be.whole_run([torch.zeros(20)[::2], x], plan, None, True, torch.empty(10))
    with pytest.raises(MergeError, match=r"out: dtype torch.float64 is not supported"):
        be.whole_run([x, x], plan, None, True, torch.empty(10, dtype=torch.float64))
    with pytest.raises(MergeError, match=r"unknown SIMD level 'avx9'"):
        CpuBackend(simd="avx9").whole_run([x, x], plan, None, True, torch.empty(10))
    assert not be.supports_device("cuda") and be.supports_device("cpu")


def test_simd_env_override(monkeypatch):
    from ame_kernels.backends.cpu import resolve_simd

    monkeypatch.setenv("AME_SIMD", "scalar")
    assert resolve_simd(None) == "scalar"
    assert resolve_simd("avx2") == "avx2"  # an explicit argument wins
    monkeypatch.setenv("AME_SIMD", "sse9")
    with pytest.raises(MergeError, match="unknown SIMD level 'sse9'"):
        resolve_simd(None)


# what the binding needs besides pointers, dtypes and the schedule arrays (it has no defaults)
LAUNCH_KWARGS = dict(pivot_mode="soup", pivot_index=0, pivot=0, pivot_dtype="float32", adaptive=True, threads=1,
                     simd="auto", check_finite=False, block=0, linear=None, exact=False)


def _binding_kwargs(**over):
    from ame_kernels._native import load
    from ame_kernels.backends.base import hyper_kwargs

    x, out = torch.zeros(8), torch.empty(8)  # returned with the kwargs: the pointers must outlive the call
    kw = dict(
        inputs=[x.data_ptr(), x.data_ptr()], input_dtypes=["float32", "float32"], numel=8, out=out.data_ptr(),
        out_dtype="float32", batch_ptr=np.array([0, 1, 2], np.int32), batch_idx=np.array([0, 1], np.int32),
        coeffs=np.ones((2, 4), np.float32), **hyper_kwargs(schedule(AMEConfig(optimizer="sgd"), 2).hyper),
        **LAUNCH_KWARGS,
    )
    kw.update(over)
    return load("_C").whole_run, kw, (x, out)


def test_binding_has_no_defaults():
    """STYLE: the binding keeps no defaults of its own; the Python side passes every argument."""
    fn, kw, (x, out) = _binding_kwargs()
    assert fn(**kw) == [] and torch.equal(out, x)
    for name in kw:
        with pytest.raises(TypeError):
            fn(**{k: v for k, v in kw.items() if k != name})


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(inputs=[]), r"\[whole_run\] inputs: need at least 1 ingredient"),
        (dict(input_dtypes=["float32"]), r"\[whole_run\] input_dtypes: expected one dtype per input"),
        (dict(input_dtypes=["float32", "int8"]), r"\[whole_run\] input_dtypes\[1\]: unsupported dtype 'int8'"),
        (dict(out_dtype="float64"), r"\[whole_run\] out_dtype: unsupported dtype"),
        (dict(numel=-1), r"\[whole_run\] numel: must be >= 0"),
        (dict(out=0), r"\[whole_run\] out: null pointer"),
        (dict(batch_ptr=np.array([0, 1, 2], np.int64)), r"\[whole_run\] batch_ptr: expected a int32 array"),
        (dict(batch_ptr=np.array([0, 1, 1], np.int32)), r"\[whole_run\] batch_ptr: step 2 has an empty batch"),
        (dict(batch_idx=np.array([0, 2], np.int32)), r"\[whole_run\] batch_idx: entry 1 = 2 is not in \[0, N\)"),
        (dict(batch_idx=np.array([0], np.int32)), r"\[whole_run\] batch_idx: expected 2 entries"),
        (dict(coeffs=np.ones((3, 4), np.float32)), r"\[whole_run\] coeffs: expected shape \[2, 4\]"),
        (dict(coeffs=np.full((2, 4), np.inf, np.float32)), r"\[whole_run\] coeffs: every value must be finite"),
        (dict(coeffs=np.ones((2, 4), np.float64)), r"\[whole_run\] coeffs: expected a float32 array"),
        (dict(optimizer="lion"), r"\[whole_run\] optimizer: unknown optimizer 'lion'"),
        (dict(beta2=1.0), r"\[whole_run\] beta2: must be in \[0, 1\)"),
        (dict(eps=-1.0), r"\[whole_run\] eps: must be a finite number >= 0"),
        (dict(nesterov=True), r"\[whole_run\] nesterov: requires momentum > 0"),
        (dict(threads=0), r"\[whole_run\] threads: must be >= 1"),
        (dict(simd="neon"), r"\[whole_run\] simd: unknown level 'neon'"),
        (dict(pivot_mode="median"), r"\[whole_run\] pivot_mode: unknown mode 'median'"),
        (dict(pivot_mode="index", pivot_index=2), r"\[whole_run\] pivot_index: 2 is not in \[0, 2\)"),
        (dict(pivot_mode="pointer", pivot=0), r"\[whole_run\] pivot: null pointer"),
    ],
)
def test_binding_rejects_bad_arguments(over, message):
    fn, kw, _ = _binding_kwargs(**over)
    with pytest.raises(ValueError, match=message):
        fn(**kw)


def test_binding_unsupported_level_is_an_error():
    fn, kw, _ = _binding_kwargs()
    missing = [lvl for lvl in ("avx2", "avx512") if lvl not in LEVELS]
    if not missing:
        pytest.skip("every level runs on this CPU")
    with pytest.raises(ValueError, match=r"\[whole_run\] simd: level"):
        fn(**{**kw, "simd": missing[0]})


@pytest.mark.parametrize("block", [64, 640, 4096])
def test_block_size_does_not_change_result(block):
    """Many small blocks (runs of consecutive blocks, prefetch of the next one, ragged tail)
    give the same bits as the automatic block size."""
    from ame_kernels._native import load
    from ame_kernels.backends.base import plan_kwargs

    n, c = 4, 50021
    xs = _inputs(n, c, ["bfloat16", "float16", "float32"])
    plan = schedule(AMEConfig(optimizer="adamw", lr=0.01, weight_decay=0.1, epochs=2, batch_size=3), n)
    outs = []
    for blk in (0, block):
        o = torch.empty(c, dtype=torch.bfloat16)
        bad = load("_C").whole_run(
            inputs=[x.data_ptr() for x in xs], input_dtypes=[str(x.dtype)[6:] for x in xs], numel=c, out=o.data_ptr(),
            out_dtype="bfloat16", **{**LAUNCH_KWARGS, "threads": 2, "block": blk, "check_finite": True},
            **plan_kwargs(plan))
        assert bad == []
        outs.append(o)
    assert torch.equal(outs[0], outs[1])


def test_concurrent_callers_share_the_pool():
    """Python threads calling the kernel at once (the GIL is released) queue on the pool
    and each gets the single-caller result."""
    import threading

    xs = _inputs(3, 20011, ["bfloat16"])
    plan = schedule(AMEConfig(optimizer="adam", lr=0.01), 3)
    expect = torch.empty(20011)
    CpuBackend().whole_run(xs, plan, None, True, expect, threads=2)
    same = []

    def work():
        for _ in range(5):
            o = torch.empty(20011)
            CpuBackend().whole_run(xs, plan, None, True, o, threads=2)
            same.append(torch.equal(o, expect))

    workers = [threading.Thread(target=work) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert len(same) == 15 and all(same)


def test_merge_names_non_finite_ingredients_from_the_kernel_flags(monkeypatch):
    """ak.merge on the cpu backend takes the kernel's NaN/Inf flags (no torch pass over the
    ingredients first) and raises the same MergeError, naming the tensor and the ingredient."""
    from ame_kernels import api

    def no_torch_pass(*a, **k):
        raise AssertionError("the cpu backend's merge must not run the torch finite check")

    monkeypatch.setattr(api, "check_all_finite", no_torch_pass)
    a = {"w": torch.randn(40), "v": torch.randn(4099).to(torch.bfloat16)}
    b = {"w": torch.randn(40), "v": torch.randn(4099).to(torch.bfloat16)}
    c = {"w": torch.randn(40), "v": torch.randn(4099).to(torch.bfloat16)}
    c["v"][4098] = float("inf")
    for opt in ("sgd", "adam"):  # the folded weighted sum and the stepped kernel
        with pytest.raises(MergeError, match=r"merge: tensor 'v' of ingredient 2 contains NaN or Inf"):
            ame_kernels.merge([a, b, c], optimizer=opt, backend="cpu")
        out = ame_kernels.merge([a, b, c], optimizer=opt, backend="cpu", check_finite=False)
        assert not torch.isfinite(out["v"].float()).all() and torch.isfinite(out["w"]).all()
    xs = [torch.randn(100) for _ in range(3)]
    xs[1][7] = float("nan")
    with pytest.raises(MergeError, match=r"merge: the tensor of ingredient 1 contains NaN or Inf"):
        ame_kernels.merge(xs, optimizer="adagrad", backend="cpu")
    xs[1][7] = 0.0
    assert torch.isfinite(ame_kernels.merge(xs, optimizer="adagrad", backend="cpu")).all()


@pytest.mark.parametrize("method, kw", [("linear", {}), ("ties", dict(density=0.3)), ("ties", dict(density=1.0)),
                                        ("dare_ties", dict(density=0.5)), ("model_stock", {}),
                                        ("della", dict(density=0.5, epsilon=0.1))])
def test_merge_methods_take_the_kernel_flags(monkeypatch, method, kw):
    """ak.merge with a merge method on the cpu backend: no torch pass over every ingredient first;
    the statistics passes' counts, the combine pass's count of Inf/NaN written and a check of the
    ingredients a mask or election could drop unseen name the tensor and ingredient (or the base)."""
    from ame_kernels import api

    def no_torch_pass(*a, **k):
        raise AssertionError("the cpu backend's merge must not run the torch finite check")

    monkeypatch.setattr(api, "check_all_finite", no_torch_pass)
    monkeypatch.setattr(api, "check_reference_finite", no_torch_pass)
    gen = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(30, 20, generator=gen), "v": torch.randn(4099, generator=gen).to(torch.bfloat16)}
    sds = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in base.items()}
           for _ in range(3)]
    if method == "linear":  # no base: it is not a task-vector method
        kw = dict(kw, base=None)
    else:
        kw = dict(kw, base=base)
    ak_ok = ame_kernels.merge(sds, method=method, backend="cpu", **kw)
    assert all(torch.isfinite(t.float()).all() for t in ak_ok.values())
    for where, value in (("w", float("nan")), ("v", float("inf"))):
        bad = [dict(sd) for sd in sds]
        bad[2][where] = bad[2][where].clone()
        bad[2][where].view(-1)[7] = value
        with pytest.raises(MergeError, match=rf"merge: tensor '{where}' of ingredient 2 contains NaN or Inf"):
            ame_kernels.merge(bad, method=method, backend="cpu", **kw)
    if kw["base"] is None:
        return
    bbase = dict(base)
    bbase["w"] = base["w"].clone()
    bbase["w"][3, 4] = float("nan")
    with pytest.raises(MergeError, match=r"merge: base tensor 'w' contains NaN or Inf"):
        ame_kernels.merge(sds, method=method, backend="cpu", **dict(kw, base=bbase))


@pytest.mark.parametrize("simd", ame_kernels.build_info().get("simd_supported", ["scalar"]) if available()["cpu"][0] else ["scalar"])
def test_nonfinite_probe_sees_every_position(simd):
    """The whole-run kernel's NaN/Inf probe (four interleaved accumulators per input slice) flags a
    non-finite value wherever it sits: each lane of each of the four vectors, the ragged end, and
    with and without the soup pass."""
    from ame_kernels.backends.cpu import CpuBackend

    c = 16 * 4 * 3 + 5
    be = CpuBackend(simd=simd)
    for opt in ("sgd", "adam"):
        for pivot in (None, 0):
            plan = schedule(AMEConfig(optimizer=opt, pivot="soup" if pivot is None else pivot), 3)
            for j in list(range(0, 16 * 4 + 1)) + [c - 5, c - 1]:
                xs = [torch.randn(c), torch.randn(c).bfloat16(), torch.randn(c).half()]
                xs[1][j] = float("inf") if j % 2 else float("nan")
                bad = be.whole_run(xs, plan, pivot, True, torch.empty(c), check_finite=True)
                assert list(bad) == [1], (opt, pivot, j, bad)
