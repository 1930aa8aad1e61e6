"""CUDA C++ backend (csrc/cuda, ame_kernels._C_cuda, backends/cuda.py).

Without a GPU (CI has nvcc but no GPU): ``make test`` builds the package first, so a
CUDA compile error in csrc/cuda fails the build and CI; here we check that the module
was built when nvcc is present, that it imports without a GPU (static cudart), and
that the binding rejects bad arguments with a ValueError naming function and argument.
On a GPU: parity with the reference backend (torch.optim on fp32 CPU copies) for every
optimizer x dtype x odd sizes x schedule options, the scalar (unaligned) path against
the vector path, mixed input dtypes, check_finite, the step kernel, host tensors through
the chunked driver, and agreement with the Triton backend.
"""

import importlib
import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch

import ame_kernels as ak
from ame_kernels import _native
from ame_kernels.backends.reference import ReferenceBackend
from ame_kernels.config import AMEConfig
from ame_kernels.errors import MergeError
from ame_kernels.schedule import schedule, step_coeffs
from backends import OPTIMIZER_VARIANTS
from tolerances import TOL, assert_close, oracle64

NVCC = shutil.which("nvcc")
CUDA_BUILD_WANTED = os.environ.get("AME_BUILD_CUDA", "auto").lower() not in ("0", "off")
C_CUDA = _native.load("_C_cuda")
GPU = torch.cuda.is_available()

needs_module = pytest.mark.skipif(C_CUDA is None, reason=f"_C_cuda is not built: {_native.why_missing('_C_cuda')}")
needs_gpu = pytest.mark.skipif(
    not (GPU and C_CUDA is not None),
    reason="needs a CUDA GPU and the _C_cuda module (torch.cuda.is_available() is False or _C_cuda is missing)",
)
no_gpu = pytest.mark.skipif(GPU, reason="checks the no-GPU behaviour")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]
REF = ReferenceBackend()

OPTIMIZERS = OPTIMIZER_VARIANTS  # tests/backends.py: every optimizer and option
# The kernel's thread-group is 8 elements (16-byte loads): sizes around it, a prime in
# the thousands, and one that leaves a ragged last group across many blocks.
SIZES = [1, 7, 8, 9, 4099, (1 << 16) + 3]
SCHEDULES = {
    "default": dict(),
    "epochs_batches_shuffle": dict(epochs=3, batch_size=2, shuffle=True, seed=7),
    "fixed_pivot_index": dict(pivot=2, adaptive_pivot=False),
    "adaptive_pivot_index": dict(pivot=1),
    "amplified_constant": dict(amplification=5.0, lr_schedule="constant"),
    "power_lr_sorted": dict(lr_schedule="power", lr_power=-0.5, scores=(0.1, 0.9, 0.5, 0.3, 0.7)),
}
N = 5


# ---- without a GPU: the build and the binding's gate ---------------------------------------


@pytest.mark.skipif(not (NVCC and CUDA_BUILD_WANTED), reason="nvcc is not on PATH (or AME_BUILD_CUDA=0): no CUDA build expected")
def test_cuda_module_built_when_nvcc_present():
    info = ak.build_info()
    assert info["native"], info.get("reason")
    assert info["cuda_compiled"] is True, (
        "nvcc is on PATH but _C_cuda was not built: run `make build` (the CMake output says why); "
        "if it was built with AME_BUILD_CUDA=0 on purpose, set AME_BUILD_CUDA=0 for pytest too"
    )
    mod = importlib.import_module("ame_kernels._C_cuda")  # static cudart: importable without a GPU
    archs = os.environ.get("AME_CUDA_ARCHS", "80;90").replace(";", ",")
    assert mod.compiled_archs == archs
    assert {"80", "90"} <= set(mod.compiled_archs.split(",")) or "AME_CUDA_ARCHS" in os.environ


@needs_module
def test_module_loads_and_reports_device():
    assert isinstance(C_CUDA.device_count(), int) and C_CUDA.device_count() >= 0
    info = C_CUDA.device_info(0)
    assert set(info) >= {"name", "capability", "sm_count", "kernels_loadable", "load_error", "compiled_archs"}
    if C_CUDA.device_count() == 0:
        assert not info["kernels_loadable"]
        assert "no CUDA device 0" in info["load_error"]
    else:
        assert info["sm_count"] > 0 and info["name"]


@needs_module
@no_gpu
def test_backend_unavailable_without_gpu_gives_reason():
    from ame_kernels.backends.cuda import CudaBackend

    ok, why = CudaBackend().available()
    assert not ok and "no CUDA device" in why
    usable, reason = ak.available_backends()["cuda"]
    assert not usable and reason
    with pytest.raises(MergeError, match="cuda"):
        ak.get_backend("cuda", "cuda")


def _whole_run_kwargs(**over):
    """Arguments that pass every host-side check (device addresses are fakes)."""
    kw = dict(
        inputs=[4096, 8192], input_dtypes=["float32", "bfloat16"], c=10, input_table=4096, dtype_table=4096,
        batch_ptr=np.array([0, 1, 2], dtype=np.int32), batch_idx=np.array([0, 1], dtype=np.int32),
        coeffs=np.ones((2, 4), dtype=np.float32), batch_ptr_dev=4096, batch_idx_dev=4096, coeffs_dev=4096,
        pivot_mode="soup", pivot_index=0, pivot=0, pivot_dtype="float32", adaptive_pivot=True, out=4096,
        out_dtype="float16", optimizer="adam", momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
        beta1=0.9, beta2=0.999, eps=1e-8, rho=0.9, amsgrad=False, eps_inside_sqrt=False,
        initial_accumulator_value=0.0, nonfinite=0, device=0, stream=0, linear=None, linear_dev=0,
    )
    kw.update(over)
    return kw


WHOLE_RUN_BAD = {
    "no_inputs": (dict(inputs=[], input_dtypes=[]), r"\[whole_run\] inputs: need at least 1"),
    "dtype_count": (dict(input_dtypes=["float32"]), r"\[whole_run\] input_dtypes: expected one dtype per input"),
    "bad_dtype": (dict(input_dtypes=["float32", "int8"]), r"\[whole_run\] input_dtypes\[1\]: unsupported dtype 'int8'"),
    "bad_out_dtype": (dict(out_dtype="float64"), r"\[whole_run\] out_dtype: unsupported dtype"),
    "negative_c": (dict(c=-1), r"\[whole_run\] c: must be >= 0"),
    "batch_ptr_dtype": (dict(batch_ptr=np.array([0, 1, 2], dtype=np.int64)), r"\[whole_run\] batch_ptr: expected dtype int32"),
    "batch_ptr_start": (dict(batch_ptr=np.array([1, 1, 2], dtype=np.int32)), r"\[whole_run\] batch_ptr: must start at 0"),
    "empty_step": (dict(batch_ptr=np.array([0, 0, 2], dtype=np.int32)), r"\[whole_run\] batch_ptr: step 1 has no ingredient"),
    "batch_idx_range": (dict(batch_idx=np.array([0, 2], dtype=np.int32)), r"\[whole_run\] batch_idx: entry 1 = 2 is not in \[0, 2\)"),
    "coeffs_shape": (dict(coeffs=np.ones((2, 3), dtype=np.float32)), r"\[whole_run\] coeffs: expected shape \[2, 4\]"),
    "coeffs_nan": (dict(coeffs=np.array([[1, 1, 1, 1], [1, np.nan, 1, 1]], dtype=np.float32)), r"\[whole_run\] coeffs: row 1 is not finite"),
    "coeffs_not_contiguous": (dict(coeffs=np.ones((4, 4), dtype=np.float32)[::2]), r"\[whole_run\] coeffs: must be C-contiguous"),
    "optimizer": (dict(optimizer="lion"), r"\[whole_run\] optimizer: unknown 'lion'"),
    "beta1": (dict(beta1=1.0), r"\[whole_run\] beta1: must be in \[0, 1\)"),
    "eps": (dict(eps=-1.0), r"\[whole_run\] eps: must be finite and >= 0"),
    "nesterov": (dict(optimizer="sgd", nesterov=True), r"\[whole_run\] nesterov: needs momentum > 0"),
    "pivot_mode": (dict(pivot_mode="median"), r"\[whole_run\] pivot_mode: unknown 'median'"),
    "pivot_index": (dict(pivot_mode="index", pivot_index=2), r"\[whole_run\] pivot_index: 2 is not in \[0, 2\)"),
    "device": (dict(device=99), r"\[whole_run\] device: cuda:99 does not exist"),
}


@needs_module
@pytest.mark.parametrize("case", list(WHOLE_RUN_BAD))
def test_whole_run_binding_rejects_bad_arguments(case):
    over, msg = WHOLE_RUN_BAD[case]
    with pytest.raises(ValueError, match=msg):
        C_CUDA.whole_run(**_whole_run_kwargs(**over))


@needs_module
def test_whole_run_binding_checks_addresses():
    """Past the host checks: no device (CI) or a host address where device memory is required (GPU)."""
    host = np.zeros(16, dtype=np.float32)
    kw = _whole_run_kwargs(inputs=[host.ctypes.data, host.ctypes.data])
    msg = r"\[whole_run\] device: cuda:0 does not exist" if C_CUDA.device_count() == 0 else r"\[whole_run\] inputs\[0\]: "
    with pytest.raises(ValueError, match=msg):
        C_CUDA.whole_run(**kw)


def _step_kwargs(**over):
    kw = dict(
        w=4096, state=4096, c=10, batch=[4096], batch_dtypes=["float16"], batch_table=4096, dtype_table=4096, pivot=0,
        coeffs=[1.0, 0.1, 1.0, 1.0], t=1, optimizer="adagrad", momentum=0.0, dampening=0.0, nesterov=False,
        weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-10, rho=0.9, amsgrad=False, eps_inside_sqrt=False,
        initial_accumulator_value=0.0, device=0, stream=0,
    )
    kw.update(over)
    return kw


STEP_BAD = {
    "no_batch": (dict(batch=[], batch_dtypes=[]), r"\[step\] batch: need at least 1 tensor"),
    "dtype_count": (dict(batch_dtypes=["float16", "float16"]), r"\[step\] batch_dtypes: expected one dtype per batch tensor"),
    "coeffs_len": (dict(coeffs=[1.0, 0.1, 1.0]), r"\[step\] coeffs: expected 4 values"),
    "coeffs_inf": (dict(coeffs=[1.0, float("inf"), 1.0, 1.0]), r"\[step\] coeffs: value 1 is not finite"),
    "t": (dict(t=0), r"\[step\] t: steps count from 1"),
    "rho": (dict(optimizer="adadelta", rho=1.5), r"\[step\] rho: must be in \[0, 1\]"),
    "device": (dict(device=-1), r"\[step\] device: cuda:-1 does not exist"),
}


@needs_module
@pytest.mark.parametrize("case", list(STEP_BAD))
def test_step_binding_rejects_bad_arguments(case):
    over, msg = STEP_BAD[case]
    with pytest.raises(ValueError, match=msg):
        C_CUDA.step(**_step_kwargs(**over))


# ---- without a GPU: the kernels' own per-group code, run on the host -------------------------
#
# _C_cuda.whole_run_emulated / step_emulated run whole_run_group / step_group (the code each
# GPU thread runs: same templates, csrc/rules, vector and scalar paths, rounding) on the host.
# This checks the kernels' arithmetic in CI; launch geometry and device intrinsics need a GPU.


def _names(xs):
    return [str(x.dtype).replace("torch.", "") for x in xs]


def _emulated_whole_run(xs, plan, pivot, adaptive, out, check_finite=False, vec=True):
    from ame_kernels.backends.base import hyper_kwargs

    mode, index, ptr, pdtype = "soup", 0, 0, "float32"
    if isinstance(pivot, torch.Tensor):
        mode, ptr, pdtype = "tensor", pivot.data_ptr(), _names([pivot])[0]
    elif pivot is not None:
        mode, index = "index", int(pivot)
    return C_CUDA.whole_run_emulated(
        inputs=[x.data_ptr() for x in xs], input_dtypes=_names(xs), c=out.numel(),
        batch_ptr=np.ascontiguousarray(plan.batch_ptr, dtype=np.int32),
        batch_idx=plan.summation_idx(),  # each batch ascending, as CudaBackend passes it
        coeffs=np.ascontiguousarray(plan.coeffs, dtype=np.float32), pivot_mode=mode, pivot_index=index, pivot=ptr,
        pivot_dtype=pdtype, adaptive_pivot=bool(adaptive), out=out.data_ptr(), out_dtype=_names([out])[0],
        check_finite=check_finite, vec=vec, linear=None, **hyper_kwargs(plan.hyper),
    )


def _emulated_step(w, state, batch, pivot, coeffs, t, hyper, vec=True):
    from ame_kernels.backends.base import hyper_kwargs

    C_CUDA.step_emulated(
        w=w.data_ptr(), state=state.data_ptr() if hyper.state_slots else 0, c=w.numel(),
        batch=[x.data_ptr() for x in batch], batch_dtypes=_names(batch),
        pivot=pivot.data_ptr() if pivot is not None else 0, coeffs=[float(v) for v in coeffs], t=int(t), vec=vec,
        **hyper_kwargs(hyper),
    )


def _check_emulated(xs, cfg, out_dtype, pivot=None, what=""):
    plan = schedule(cfg, len(xs))
    pivot = _pivot_of(cfg) if pivot is None else pivot
    out = torch.empty(xs[0].numel(), dtype=out_dtype)
    bad = _emulated_whole_run(xs, plan, pivot, cfg.adaptive_pivot, out, check_finite=True)
    expected, expected_bad = _reference(xs, plan, pivot, cfg.adaptive_pivot, out_dtype)
    assert bad == expected_bad
    _assert_parity(out, expected, oracle64(xs, plan, pivot, cfg.adaptive_pivot), out_dtype, what=what)


@needs_module
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_emulated_whole_run_matches_reference(opt, dtype, size):
    cfg = AMEConfig(**OPTIMIZERS[opt])
    _check_emulated(_inputs(N, size, dtype, device="cpu"), cfg, dtype, what=f"emulated {opt} {dtype} C={size}")


@needs_module
@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_emulated_whole_run_schedule_options(opt, sched):
    cfg = AMEConfig(**OPTIMIZERS[opt], **SCHEDULES[sched])
    _check_emulated(_inputs(N, 4099, F32, device="cpu"), cfg, F32, what=f"emulated {opt} {sched}")


@needs_module
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", ["sgd", "adam_amsgrad_wd", "adadelta_wd"])
def test_emulated_mixed_inputs_and_pivot_tensor(opt, out_dtype):
    xs = _inputs(N, 4099, [F32, BF16, F16, BF16, F32], device="cpu")
    _check_emulated(xs, AMEConfig(**OPTIMIZERS[opt], epochs=2), out_dtype, what=f"emulated mixed {opt}")
    pivot = torch.randn(4099).to(F16)
    _check_emulated(xs, AMEConfig(**OPTIMIZERS[opt], adaptive_pivot=False), out_dtype, pivot=pivot,
                    what=f"emulated pivot tensor {opt}")


@needs_module
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_emulated_vector_path_equals_scalar_path(opt, dtype):
    """16-byte vector loads/stores and the scalar fallback (tails, unaligned views) give the same bits."""
    size = 4099
    plan = schedule(AMEConfig(**OPTIMIZERS[opt], epochs=2, batch_size=2), N)
    bases = [torch.randn(size + 1).to(dtype) for _ in range(N)]
    aligned = [b[1:].clone() for b in bases]
    outs = [torch.empty(size, dtype=dtype) for _ in range(3)]
    _emulated_whole_run(aligned, plan, None, True, outs[0], vec=True)
    _emulated_whole_run(aligned, plan, None, True, outs[1], vec=False)
    _emulated_whole_run([b[1:] for b in bases], plan, None, True, outs[2], vec=True)  # unaligned: scalar path
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_module
def test_emulated_check_finite():
    xs = _inputs(N, 4099, BF16, device="cpu")
    xs[2][17] = float("nan")
    xs[4][4098] = float("inf")  # in the ragged last group
    plan = schedule(AMEConfig(optimizer="adam", lr=0.01), N)
    out = torch.empty(4099, dtype=BF16)
    assert _emulated_whole_run(xs, plan, None, True, out, check_finite=True) == [2, 4]
    assert _emulated_whole_run(xs, plan, 1, False, out, check_finite=True) == [2, 4]
    assert _emulated_whole_run(xs, plan, None, True, out, check_finite=False) == []


@needs_module
@pytest.mark.parametrize("fixed_pivot", [False, True], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_emulated_step_matches_reference_and_whole_run(opt, fixed_pivot):
    """Steps with the state in buffers: parity with the reference's step, and bit for bit the whole run."""
    size = 4099
    xs = _inputs(N, size, [BF16, F32, F16, BF16, F32], device="cpu")
    plan = schedule(AMEConfig(**OPTIMIZERS[opt], epochs=2, batch_size=2, shuffle=True), N)
    hyper = plan.hyper
    pivot = torch.randn(size)
    w, w_ref = pivot.clone(), pivot.clone()
    state = torch.tensor(hyper.initial_state(), dtype=F32).reshape(-1, 1).repeat(1, size)
    state = state.reshape(hyper.state_slots, size).contiguous()
    state_ref = state.clone()
    w64, state64 = pivot.double(), state.double()  # the reference's step in float64: the exact answer
    for t in range(1, plan.steps + 1):
        batch = [xs[i] for i in sorted(plan.batch(t))]
        piv = pivot if fixed_pivot else None
        _emulated_step(w, state, batch, piv, plan.coeffs[t - 1], t, hyper)
        REF.step(w_ref, state_ref, batch, piv, plan.coeffs[t - 1], t, hyper)
        REF.step(w64, state64, batch, piv.double() if piv is not None else None, plan.coeffs[t - 1], t, hyper)
    _assert_parity(w, w_ref, w64, F32, what=f"emulated step w {opt}")
    if hyper.state_slots:
        _assert_parity(state, state_ref, state64, F32, what=f"emulated step state {opt}")
    whole = torch.empty(size)
    _emulated_whole_run(xs, plan, pivot, not fixed_pivot, whole)
    assert torch.equal(w, whole), f"{opt}: max |diff| {(w - whole).abs().max().item():g}"


@needs_module
def test_emulated_step_scalar_path_for_unaligned_state():
    """c % 4 != 0 puts state slot 1 off 16-byte alignment: the step must fall back and agree bit for bit."""
    size = 4099
    cfg = AMEConfig(**OPTIMIZERS["adam_amsgrad_wd"])
    hyper = schedule(cfg, N).hyper
    xs = _inputs(N, size, BF16, device="cpu")
    w0 = torch.randn(size)
    results = []
    for vec in (True, False):
        w, state = w0.clone(), torch.zeros(hyper.state_slots, size)
        for t in range(1, 4):
            _emulated_step(w, state, [xs[t]], None, step_coeffs(cfg, t, gscale=1.0 / N), t, hyper, vec=vec)
        results.append((w, state))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ---- on a GPU: parity ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_backend():
    from ame_kernels.backends.cuda import CudaBackend

    backend = CudaBackend()
    ok, why = backend.available()
    if not ok:
        pytest.skip(f"cuda backend unavailable: {why}")
    return backend


def _inputs(n, size, dtypes, device="cuda"):
    """Ingredients offset from each other (+0.5 i, as tests/test_cpu_whole_run.py): pseudogradients
    then stay away from 0, where Adam's m / (sqrt(v) + eps) turns fp32 operation-order differences
    (the kernels' gscale * sum vs torch's per-term scaling) into differences beyond any fp32 rtol."""
    if not isinstance(dtypes, (list, tuple)):
        dtypes = [dtypes] * n
    return [(torch.randn(size, device=device) + 0.5 * i).to(d) for i, d in enumerate(dtypes)]


def _pivot_of(cfg):
    return None if cfg.pivot == "soup" else cfg.pivot


def _reference(xs, plan, pivot, adaptive, out_dtype):
    """The oracle: torch.optim on CPU copies, written in out_dtype (round to nearest even)."""
    out = torch.empty(xs[0].numel(), dtype=out_dtype)
    piv = pivot.cpu() if isinstance(pivot, torch.Tensor) else pivot
    bad = REF.whole_run([x.cpu() for x in xs], plan, piv, adaptive, out, check_finite=True)
    return out, bad


def _assert_parity(got, ref, exact, dtype, what=""):
    """Elementwise: within TOL[dtype] of the fp32 reference, or, where the fp32 reference is itself
    off the float64 answer (ill-conditioned elements: Adam near g = 0), within twice its error of it."""
    tol = TOL[dtype]
    g, r, e = got.detach().cpu().double(), ref.detach().cpu().double(), exact.detach().cpu().double()
    ok = (g - r).abs() <= tol["atol"] + tol["rtol"] * r.abs()
    ok |= (g - e).abs() <= 2 * (r - e).abs() + tol["atol"] + tol["rtol"] * e.abs()
    ok |= torch.isnan(g) & torch.isnan(r)
    if not ok.all():
        idx = torch.nonzero(~ok).reshape(-1)[:5].tolist()
        pairs = ", ".join(f"[{i}] {g[i].item():.8g} vs ref {r[i].item():.8g} (float64 {e[i].item():.8g})" for i in idx)
        raise AssertionError(f"{what}: {int((~ok).sum())}/{g.numel()} elements off; first: {pairs}")


def _check_whole_run(backend, xs, cfg, out_dtype, pivot=None, what=""):
    plan = schedule(cfg, len(xs))
    pivot = _pivot_of(cfg) if pivot is None else pivot
    out = torch.empty(xs[0].numel(), dtype=out_dtype, device="cuda")
    bad = backend.whole_run(xs, plan, pivot, cfg.adaptive_pivot, out, check_finite=True)
    expected, expected_bad = _reference(xs, plan, pivot, cfg.adaptive_pivot, out_dtype)
    assert bad == expected_bad
    _assert_parity(out, expected, oracle64(xs, plan, pivot, cfg.adaptive_pivot), out_dtype, what=what)
    return out


@needs_gpu
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_whole_run_matches_reference(cuda_backend, opt, dtype, size):
    cfg = AMEConfig(**OPTIMIZERS[opt])
    _check_whole_run(cuda_backend, _inputs(N, size, dtype), cfg, dtype, what=f"{opt} {dtype} C={size}")


@needs_gpu
@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_whole_run_schedule_options(cuda_backend, opt, sched):
    cfg = AMEConfig(**OPTIMIZERS[opt], **SCHEDULES[sched])
    _check_whole_run(cuda_backend, _inputs(N, 4099, BF16), cfg, BF16, what=f"{opt} {sched}")


@needs_gpu
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", ["sgd", "adam_amsgrad_wd", "adadelta_wd"])
def test_whole_run_mixed_inputs_and_pivot_tensor(cuda_backend, opt, out_dtype):
    xs = _inputs(N, 4099, [F32, BF16, F16, BF16, F32])
    cfg = AMEConfig(**OPTIMIZERS[opt], epochs=2)
    _check_whole_run(cuda_backend, xs, cfg, out_dtype, what=f"mixed {opt}")
    pivot = torch.randn(4099, device="cuda").to(F16)
    _check_whole_run(cuda_backend, xs, AMEConfig(**OPTIMIZERS[opt], adaptive_pivot=False), out_dtype, pivot=pivot,
                     what=f"pivot tensor {opt}")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", ["sgd_momentum_nesterov_wd", "adamw_amsgrad_eps_inside", "adagrad_decay_init_wd"])
def test_unaligned_scalar_path_equals_vector_path(cuda_backend, opt, dtype):
    """Views at a 1-element offset are not 16-byte aligned: the scalar path must give the same bits."""
    size = 4099
    cfg = AMEConfig(**OPTIMIZERS[opt], epochs=2, batch_size=2)
    plan = schedule(cfg, N)
    bases = [torch.randn(size + 1, device="cuda").to(dtype) for _ in range(N)]
    shifted = [b[1:] for b in bases]
    aligned = [s.clone() for s in shifted]
    out_a = torch.empty(size, dtype=dtype, device="cuda")
    out_u = torch.empty(size + 1, dtype=dtype, device="cuda")[1:]
    cuda_backend.whole_run(aligned, plan, None, True, out_a)
    cuda_backend.whole_run(shifted, plan, None, True, out_u)
    assert torch.equal(out_a, out_u)


@needs_gpu
def test_check_finite_reports_bad_inputs(cuda_backend):
    xs = _inputs(N, 4099, BF16)
    xs[2][17] = float("nan")
    xs[4][4098] = float("inf")  # in the ragged last group
    plan = schedule(AMEConfig(optimizer="adam", lr=0.01), N)
    out = torch.empty(4099, dtype=BF16, device="cuda")
    assert cuda_backend.whole_run(xs, plan, None, True, out, check_finite=True) == [2, 4]
    assert cuda_backend.whole_run(xs, plan, None, True, out, check_finite=False) == []


@needs_gpu
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("fixed_pivot", [False, True])
def test_step_matches_reference(cuda_backend, opt, fixed_pivot):
    """Five steps with the state in buffers, against the reference backend's step on CPU copies."""
    size = 4099
    cfg = AMEConfig(**OPTIMIZERS[opt])
    hyper = schedule(cfg, N).hyper
    xs = _inputs(N, size, [BF16, F32, F16, BF16, F32])
    w = torch.randn(size, device="cuda")
    state = torch.tensor(hyper.initial_state(), dtype=F32).reshape(-1, 1).repeat(1, size).to("cuda")
    state = state.reshape(hyper.state_slots, size).contiguous()
    pivot = torch.randn(size, device="cuda") if fixed_pivot else None
    w_ref, state_ref = w.cpu(), state.cpu()
    w64, state64 = w.cpu().double(), state.cpu().double()  # the reference's step in float64: the exact answer
    for t in range(1, 6):
        batch = [xs[(t - 1) % N], xs[t % N]]
        coeffs = step_coeffs(cfg, t, gscale=1.0 / (N * len(batch)))
        cuda_backend.step(w, state, batch, pivot, coeffs, t, hyper)
        piv = pivot.cpu() if pivot is not None else None
        REF.step(w_ref, state_ref, [x.cpu() for x in batch], piv, coeffs, t, hyper)
        REF.step(w64, state64, [x.cpu() for x in batch], piv.double() if piv is not None else None, coeffs, t, hyper)
    _assert_parity(w, w_ref, w64, F32, what=f"step w {opt}")
    if hyper.state_slots:
        _assert_parity(state, state_ref, state64, F32, what=f"step state {opt}")


@needs_gpu
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_step_by_step_equals_whole_run(cuda_backend, opt, adaptive):
    """The same rules (csrc/rules), the same fp32 operations in both kernels: bit for bit.
    The whole run steps (fold=False): the default backend folds sgd into one weighted sum
    (weighted_sum_kernel), a different fp32 computation, ulps away from stepping."""
    from ame_kernels.backends.cuda import CudaBackend

    stepping = CudaBackend(fold=False)
    size = 4099
    xs = _inputs(N, size, [BF16, F32, F16, BF16, F32])
    plan = schedule(AMEConfig(**OPTIMIZERS[opt], epochs=2, batch_size=2, shuffle=True), N)
    pivot = torch.randn(size, device="cuda")
    whole = torch.empty(size, device="cuda")
    stepping.whole_run(xs, plan, pivot, adaptive, whole)
    w = pivot.clone()
    hyper = plan.hyper
    state = torch.tensor(hyper.initial_state(), dtype=F32).reshape(-1, 1).repeat(1, size).to("cuda")
    state = state.reshape(hyper.state_slots, size).contiguous()
    for t in range(1, plan.steps + 1):
        batch = [xs[i] for i in sorted(plan.batch(t))]
        cuda_backend.step(w, state, batch, None if adaptive else pivot, plan.coeffs[t - 1], t, hyper)
    assert torch.equal(w, whole), f"{opt}: max |diff| {(w - whole).abs().max().item():g}"


@needs_gpu
@pytest.mark.parametrize("opt", ["adam", "sgd_momentum_dampening"])
def test_host_tensors_stream_through_the_gpu(cuda_backend, opt):
    """CPU inputs and out go through the chunked driver; chunks are elementwise-independent, so the bits match."""
    size = 10007
    cfg = AMEConfig(**OPTIMIZERS[opt], epochs=2)
    plan = schedule(cfg, N)
    xs = _inputs(N, size, BF16, device="cpu")
    out_host = torch.empty(size, dtype=BF16)
    cuda_backend.whole_run_chunked(xs, plan, None, True, out_host, chunk_elems=1000)
    out_dev = torch.empty(size, dtype=BF16, device="cuda")
    cuda_backend.whole_run([x.cuda() for x in xs], plan, None, True, out_dev)
    assert torch.equal(out_host, out_dev.cpu())
    out_default = torch.empty(size, dtype=BF16)
    cuda_backend.whole_run(xs, plan, None, True, out_default)
    assert torch.equal(out_default, out_host)


@needs_gpu
def test_runs_on_the_callers_stream(cuda_backend):
    size = (1 << 20) + 1
    cfg = AMEConfig(optimizer="adam", lr=0.01)
    plan = schedule(cfg, N)
    side = torch.cuda.Stream()
    expected = torch.empty(size, dtype=F16, device="cuda")
    with torch.cuda.stream(side):
        xs = _inputs(N, size, F16)  # produced on the side stream: the kernel must run after it there
        out = torch.empty(size, dtype=F16, device="cuda")
        cuda_backend.whole_run(xs, plan, None, True, out)
    side.synchronize()
    cuda_backend.whole_run(xs, plan, None, True, expected)
    assert torch.equal(out, expected)


@needs_gpu
def test_merge_api_with_cuda_backend():
    xs = [{"a": torch.randn(33, 7, device="cuda"), "b": torch.randn(5, device="cuda").half()} for _ in range(4)]
    got = ak.merge(xs, optimizer="adamw", lr=0.01, weight_decay=0.1, epochs=2, backend="cuda")
    want = ak.merge([{k: v.cpu() for k, v in x.items()} for x in xs], optimizer="adamw", lr=0.01, weight_decay=0.1,
                    epochs=2, backend="reference")
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].device.type == "cuda"
        assert_close(got[k], want[k], what=k)


@needs_gpu
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_agrees_with_triton(cuda_backend, opt, dtype):
    """Same inputs, same plan: the two GPU kernels agree to the output dtype's tolerance."""
    from ame_kernels.backends.triton import TritonBackend

    triton_backend = TritonBackend()
    cfg = AMEConfig(**OPTIMIZERS[opt], epochs=2, batch_size=2)
    plan = schedule(cfg, N)
    xs = _inputs(N, 65543, dtype)
    a = torch.empty(65543, dtype=dtype, device="cuda")
    b = torch.empty(65543, dtype=dtype, device="cuda")
    cuda_backend.whole_run(xs, plan, None, True, a)
    triton_backend.whole_run(xs, plan, None, True, b)
    assert_close(a, b, dtype=dtype, what=f"cuda vs triton {opt} {dtype}")
