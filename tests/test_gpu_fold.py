"""GD folded into one weighted sum on the GPU backends (schedule.folded_weights + a weighted-sum kernel).

SGD is linear in (w_0, x_1..x_N): the host folds the whole schedule into N+1 fp32 weights
(``schedule.folded_weights``, shared with the cpu backend) and the Triton kernel
(``_weighted_sum_kernel``) or the CUDA C++ one (``weighted_sum_kernel``, csrc/cuda/whole_run.cuh)
reads each input once. Checked here against the reference (torch.optim) and against the same
backend stepping (``fold=False``), for every SGD option, pivot and schedule, every dtype.

Without a GPU: the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors, and the CUDA
kernel's per-group code runs on the host (``_C_cuda.whole_run_emulated``, driven by
``backends.cuda.whole_run_emulated`` with the backend's own pivot and fold handling).
TRITON_INTERPRET is only set while this module's Triton tests run (the ``tw`` fixture imports
the kernel modules then), never at collection: other modules collected later must not see it.
If the kernel modules were already imported without the interpreter (too late to switch),
the Triton tests skip and ``test_triton_in_subprocess`` reruns them in a child process.
On a GPU the same tests run on CUDA tensors, plus a few GPU-only ones.
"""

import importlib
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ame_kernels as ak
from ame_kernels import _native
from ame_kernels.backends.reference import ReferenceBackend
from ame_kernels.errors import MergeError
from ame_kernels.schedule import folded_weights, linear_coefficients, schedule
from tolerances import assert_close
from triton_interpreter import CUDA, INTERPRET, interpreted, rerun_in_child

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if CUDA else "cpu"
C_CUDA = _native.load("_C_cuda")
REF = ReferenceBackend()
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
N = 5

needs_emulation = pytest.mark.skipif(C_CUDA is None, reason=f"_C_cuda is not built: {_native.why_missing('_C_cuda')}")
needs_gpu = pytest.mark.skipif(not (CUDA and C_CUDA is not None), reason="needs a CUDA GPU and the _C_cuda module")

# name -> (AMEConfig kwargs, pivot: "soup" | an index | "tensor"); all foldable (checked).
CASES = {
    "gd_harmonic_soup": (dict(), "soup"),
    "gd_constant_fixed_soup_e2": (dict(lr=0.5, lr_schedule="constant", adaptive_pivot=False, epochs=2), "soup"),
    "momentum_dampening_index_b2_shuffle": (
        dict(momentum=0.9, dampening=0.1, lr=0.5, epochs=3, batch_size=2, shuffle=True, seed=3), 2),
    "nesterov_wd_tensor_fixed_b3": (
        dict(momentum=0.8, nesterov=True, weight_decay=0.05, lr=0.5, adaptive_pivot=False, epochs=2, batch_size=3),
        "tensor"),
    "momentum_tensor_adaptive_b_all_e4": (dict(momentum=0.5, lr=0.5, batch_size=5, epochs=4), "tensor"),
    "wd_index_fixed_power": (dict(weight_decay=0.1, lr_schedule="power", lr_power=-0.5, adaptive_pivot=False,
                                  epochs=2), 0),
    "amplified_harmonic_identity": (dict(lr=1.0, lr_schedule="harmonic", amplification=5.0), "soup"),
}
DTYPES = {"f32": [F32] * N, "bf16": [BF16] * N, "f16": [F16] * N, "mixed": [F32, BF16, F16, BF16, F32]}
OUT_DTYPE = {"f32": F32, "bf16": BF16, "f16": F16, "mixed": BF16}
# lr 10, constant, amplified: |1 - lr g| > 1, the fold is ill-conditioned and refused (None).
UNFOLDABLE = dict(optimizer="sgd", lr=10.0, lr_schedule="constant", amplification=4.0, epochs=3)


def _case(name, size, dtypes, device=DEVICE, seed=0):
    kw, piv = CASES[name]
    cfg = ak.AMEConfig(optimizer="sgd", **kw)
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(size, generator=g) + 0.3 * i).to(d).to(device) for i, d in enumerate(dtypes)]
    if piv == "tensor":
        pivot = torch.randn(size, generator=g).to(F16).to(device)
    else:
        pivot = None if piv == "soup" else piv
    plan = schedule(cfg, N)
    mode = "tensor" if piv == "tensor" else ("soup" if piv == "soup" else "index")
    assert folded_weights(plan, cfg.adaptive_pivot, mode, 0 if pivot is None or mode != "index" else pivot) is not None
    return cfg, plan, xs, pivot


def _run(backend, xs, plan, pivot, adaptive, out_dtype, check_finite=False):
    out = torch.empty(xs[0].numel(), dtype=out_dtype, device=xs[0].device)
    bad = backend.whole_run(xs, plan, pivot, adaptive, out, check_finite=check_finite)
    return out, bad


def _reference(xs, plan, pivot, adaptive, out_dtype, check_finite=False):
    xs_h = [x.cpu() for x in xs]
    piv = pivot.cpu() if isinstance(pivot, torch.Tensor) else pivot
    return _run(REF, xs_h, plan, piv, adaptive, out_dtype, check_finite)


def _assert_close_where_finite(out, ref, xs, what):
    """Elements whose inputs are all finite match the reference; the others are non-finite in both
    (not necessarily the same: stepping an Inf gives inf - inf = NaN, the weighted sum +-inf)."""
    ok = torch.stack([torch.isfinite(x.float().cpu()) for x in xs]).all(0)
    assert_close(out.cpu()[ok], ref[ok], what=what)
    assert not torch.isfinite(out.float().cpu()[~ok]).any() and not torch.isfinite(ref.float()[~ok]).any(), what


# ---- the shared fold ---------------------------------------------------------------------------


def test_folded_weights_folds_the_pivot_and_is_shared():
    plan = schedule(ak.AMEConfig(optimizer="sgd", momentum=0.5, lr=0.5, epochs=2), 4)
    c = linear_coefficients(plan, True)
    soup = folded_weights(plan, True, "soup")
    np.testing.assert_allclose(soup[:4], (c[:4] + c[4] / 4).astype(np.float32))
    assert soup[4] == 0 and soup.dtype == np.float32
    idx = folded_weights(plan, True, "index", 2)
    assert idx[2] == np.float32(c[2] + c[4]) and idx[4] == 0
    for mode in ("tensor", "pointer"):
        np.testing.assert_array_equal(folded_weights(plan, True, mode), c.astype(np.float32))
    soup[:] = 7  # a fresh copy each call: the memo is not affected
    np.testing.assert_array_equal(folded_weights(plan, True, "soup"), np.append(c[:4] + c[4] / 4, 0).astype(np.float32))
    assert folded_weights(schedule(ak.AMEConfig(optimizer="adam"), 4), True, "soup") is None
    assert folded_weights(schedule(ak.AMEConfig(**UNFOLDABLE), 4), True, "soup") is None
    with pytest.raises(MergeError, match="folded_weights: unknown pivot mode 'median'"):
        folded_weights(plan, True, "median")
    with pytest.raises(MergeError, match=r"folded_weights: pivot index 4 is not in \[0, 4\)"):
        folded_weights(plan, True, "index", 4)
    from ame_kernels.backends import cpu

    np.testing.assert_array_equal(cpu._linear(plan, True, "soup", 0, True), folded_weights(plan, True, "soup"))
    assert cpu._linear(plan, True, "soup", 0, False) is None


# ---- Triton ------------------------------------------------------------------------------------


def _interpreted(mod) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(mod._weighted_sum_kernel.fn, InterpretedFunction)


def _triton_usable_here() -> bool:
    """The kernel modules run here: on a GPU, or interpreted (not yet imported, or imported interpreted)."""
    if not HAS_TRITON or CUDA:
        return HAS_TRITON
    mod = sys.modules.get("ame_kernels.backends.triton.whole_run")
    if mod is not None:
        return _interpreted(mod)
    if "triton" in sys.modules:  # imported without the interpreter: its tl helpers are compiled-only
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(sys.modules["triton"].language.standard.zeros, InterpretedFunction)
    return True


@pytest.fixture(scope="module")
def tw():
    """ame_kernels.backends.triton.whole_run, with TRITON_INTERPRET=1 (no CUDA) while the module's tests run."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not _triton_usable_here():
        pytest.skip("the Triton kernels were imported without TRITON_INTERPRET; test_triton_in_subprocess runs them")
    with interpreted(INTERPRET):
        yield importlib.import_module("ame_kernels.backends.triton.whole_run")


@pytest.fixture
def launches(tw, monkeypatch):
    """Counts launches of each whole-run kernel: {'sum': n, 'steps': n}."""
    counts = {"sum": 0, "steps": 0}

    class Spy:
        def __init__(self, kernel, key):
            self.kernel, self.key = kernel, key

        def __getitem__(self, grid):
            counts[self.key] += 1
            return self.kernel[grid]

    monkeypatch.setattr(tw, "_weighted_sum_kernel", Spy(tw._weighted_sum_kernel, "sum"))
    monkeypatch.setattr(tw, "_whole_run_kernel", Spy(tw._whole_run_kernel, "steps"))
    return counts


def _triton(fold=True):
    from ame_kernels.backends.triton import TritonBackend

    return TritonBackend(fold=fold)


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_triton_fold_matches_reference_and_stepping(tw, launches, case, dtypes):
    cfg, plan, xs, pivot = _case(case, 129, DTYPES[dtypes])
    out_dtype = OUT_DTYPE[dtypes]
    fold, _ = _run(_triton(), xs, plan, pivot, cfg.adaptive_pivot, out_dtype)
    assert launches == {"sum": 1, "steps": 0}
    step, _ = _run(_triton(fold=False), xs, plan, pivot, cfg.adaptive_pivot, out_dtype)
    assert launches == {"sum": 1, "steps": 1}
    ref, _ = _reference(xs, plan, pivot, cfg.adaptive_pivot, out_dtype)
    assert_close(fold, ref, what=f"triton fold vs reference ({case}, {dtypes})")
    assert_close(fold, step, what=f"triton fold vs stepped ({case}, {dtypes})")


@pytest.mark.parametrize("size", [1, 7, 128, 300])
def test_triton_fold_odd_sizes(tw, size):
    for case in ("momentum_dampening_index_b2_shuffle", "nesterov_wd_tensor_fixed_b3"):
        cfg, plan, xs, pivot = _case(case, size, DTYPES["mixed"], seed=size)
        fold, _ = _run(_triton(), xs, plan, pivot, cfg.adaptive_pivot, F16)
        ref, _ = _reference(xs, plan, pivot, cfg.adaptive_pivot, F16)
        assert_close(fold, ref, what=f"triton fold C={size} ({case})")


@pytest.mark.parametrize("case", ["gd_harmonic_soup", "momentum_dampening_index_b2_shuffle",
                                  "nesterov_wd_tensor_fixed_b3"])
def test_triton_fold_equals_cpu_fold(tw, case):
    """Same weights, same order (inputs, then the pivot), fp32 FMAs: bit for bit the cpu kernel's sum."""
    from ame_kernels.backends.cpu import CpuBackend

    if not ak.available_backends()["cpu"][0] or "avx2" not in ak.build_info().get("simd_supported", []):
        pytest.skip("needs the cpu backend's FMA (avx2) path")
    import triton

    if INTERPRET and tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"triton {triton.__version__}'s interpreter rounds tl.fma twice (compiled kernels fuse it)")
    cfg, plan, xs, pivot = _case(case, 300, DTYPES["mixed"])
    fold, _ = _run(_triton(), xs, plan, pivot, cfg.adaptive_pivot, F32)
    cpu, _ = _run(CpuBackend(simd="avx2"), [x.cpu() for x in xs], plan,
                  pivot.cpu() if isinstance(pivot, torch.Tensor) else pivot, cfg.adaptive_pivot, F32)
    assert torch.equal(fold.cpu(), cpu)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("pivot", ["soup", 1, "tensor"])
def test_triton_fold_check_finite(tw, launches, pivot):
    xs = [torch.randn(200, device=DEVICE).to(d) for d in [F32, BF16, F16, BF16, F32]]
    xs[2][5] = float("nan")
    xs[4][199] = -float("inf")  # in the last, partial block
    p = torch.randn(200, device=DEVICE) if pivot == "tensor" else (None if pivot == "soup" else pivot)
    plan = schedule(ak.AMEConfig(optimizer="sgd", momentum=0.5, lr=0.5), N)
    out, bad = _run(_triton(), xs, plan, p, True, BF16, check_finite=True)
    ref, ref_bad = _reference(xs, plan, p, True, BF16, check_finite=True)
    assert bad == ref_bad == [2, 4]
    _assert_close_where_finite(out, ref, xs, what=f"triton fold with NaN/Inf inputs ({pivot})")
    assert _run(_triton(), xs, plan, p, True, BF16, check_finite=False)[1] == []
    assert launches == {"sum": 2, "steps": 0}


def test_triton_unfoldable_and_fold_false_step(tw, launches):
    """An ill-conditioned fold (None) and a non-sgd optimizer step, bit for bit as fold=False does."""
    xs = [torch.randn(70, device=DEVICE) for _ in range(N)]
    plan = schedule(ak.AMEConfig(**UNFOLDABLE), N)
    assert linear_coefficients(plan, True) is None
    a, _ = _run(_triton(), xs, plan, None, True, F32)
    b, _ = _run(_triton(fold=False), xs, plan, None, True, F32)
    assert torch.equal(a, b)
    plan = schedule(ak.AMEConfig(optimizer="adam", lr=0.01), N)
    _run(_triton(), xs, plan, 0, True, F32)
    assert launches == {"sum": 0, "steps": 3}
    assert not _triton(fold=False).fold and _triton().fold


def test_triton_fold_weights_uploaded_once_per_plan(tw):
    xs = [torch.randn(50, device=DEVICE) for _ in range(N)]
    plan = schedule(ak.AMEConfig(optimizer="sgd", momentum=0.5, lr=0.5), N)
    tw._weights_cache.clear()
    for _ in range(3):
        _run(_triton(), xs, plan, None, True, F32)
    _run(_triton(), xs, plan, 3, True, F32)
    assert len(tw._weights_cache) == 2  # (plan, soup) and (plan, index 3)
    w = tw._fold_weights(plan, True, "index", 3, xs[0].device)
    assert w.dtype == torch.float32 and w.device == xs[0].device
    np.testing.assert_array_equal(w.cpu().numpy(), folded_weights(plan, True, "index", 3))


def test_triton_fold_through_the_chunked_driver(tw):
    """The driver calls the backend's whole_run per chunk; the folded result equals one call."""
    driver = importlib.import_module("ame_kernels.backends.triton.driver")
    cfg, plan, xs, pivot = _case("nesterov_wd_tensor_fixed_b3", 300, DTYPES["mixed"], device="cpu")
    be = _triton()
    whole, _ = _run(be, xs, plan, pivot, cfg.adaptive_pivot, BF16)
    out = torch.empty(300, dtype=BF16)
    driver.run_chunked(be.whole_run, xs, plan, pivot, cfg.adaptive_pivot, out, chunk_elems=128, device="cpu")
    assert torch.equal(out.view(torch.int16), whole.cpu().view(torch.int16))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_triton_gpu_fold_no_recompilation_per_lr(tw):
    """The folded weights are runtime data: new lr, epochs or momentum reuse the compiled kernel."""
    caches = getattr(tw._weighted_sum_kernel.fn, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton version exposes no per-device kernel cache to inspect")
    xs = [torch.randn(10_000, device="cuda", dtype=BF16) for _ in range(4)]
    out = torch.empty(10_000, dtype=BF16, device="cuda")
    _triton().whole_run(xs, schedule(ak.AMEConfig(optimizer="sgd"), 4), None, True, out)
    before = sum(len(v[0]) for v in caches.values())
    for lr, epochs, momentum in [(0.3, 1, 0.0), (0.1, 3, 0.9), (0.5, 5, 0.5)]:
        cfg = ak.AMEConfig(optimizer="sgd", lr=lr, epochs=epochs, momentum=momentum)
        _triton().whole_run(xs, schedule(cfg, 4), None, True, out)
    assert sum(len(v[0]) for v in caches.values()) == before


_AOT_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ame_kernels.backends.triton import whole_run as W

fn = W._weighted_sum_kernel.fn
types = dict(table="*i64", codes="*i32", pivot_ptr="*fp16", out_ptr="*bf16", weights_ptr="*fp32", flags_ptr="*i32",
             C="i64", N="i32", C_LOG2="i32")
for in_kind, pivot, check, aligned in ((1, True, True, True), (3, False, False, False), (0, True, False, True)):
    consts = dict(IN_KIND=in_kind, PIVOT=pivot, CHECK_FINITE=check, ALIGNED=aligned, BLOCK=1024)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert "fma.rn.f32" in ptx, "the weighted sum should be fp32 FMAs"
print("compiled")
'''


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_weighted_sum_kernel_compiles_for_sm90():
    """Compiled-mode code generation of the fold kernel (no GPU needed), in a child process without
    TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, cwd=root)
    if proc.returncode != 0 and "ImportError" in proc.stderr and "triton" in proc.stderr:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


# ---- CUDA C++: the kernel's per-group code on the host (emulation), and the GPU ------------------


def _emulated(xs, plan, pivot, adaptive, out_dtype, check_finite=False, fold=True, vec=True, out=None):
    from ame_kernels.backends.cuda import whole_run_emulated

    out = torch.empty(xs[0].numel(), dtype=out_dtype) if out is None else out
    bad = whole_run_emulated(xs, plan, pivot, adaptive, out, check_finite=check_finite, fold=fold, vec=vec)
    return out, bad


@needs_emulation
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_emulated_fold_matches_reference_and_stepping(case, dtypes):
    cfg, plan, xs, pivot = _case(case, 4099, DTYPES[dtypes], device="cpu")
    out_dtype = OUT_DTYPE[dtypes]
    fold, _ = _emulated(xs, plan, pivot, cfg.adaptive_pivot, out_dtype)
    step, _ = _emulated(xs, plan, pivot, cfg.adaptive_pivot, out_dtype, fold=False)
    ref, _ = _reference(xs, plan, pivot, cfg.adaptive_pivot, out_dtype)
    assert_close(fold, ref, what=f"cuda fold vs reference ({case}, {dtypes})")
    assert_close(fold, step, what=f"cuda fold vs stepped ({case}, {dtypes})")


@needs_emulation
@pytest.mark.parametrize("size", [1, 7, 8, 9, 17])
@pytest.mark.parametrize("out_dtype", [F32, BF16, F16], ids=str)
def test_cuda_emulated_fold_odd_sizes(size, out_dtype):
    for case in ("momentum_dampening_index_b2_shuffle", "nesterov_wd_tensor_fixed_b3", "gd_harmonic_soup"):
        cfg, plan, xs, pivot = _case(case, size, DTYPES["mixed"], device="cpu", seed=size)
        fold, _ = _emulated(xs, plan, pivot, cfg.adaptive_pivot, out_dtype)
        ref, _ = _reference(xs, plan, pivot, cfg.adaptive_pivot, out_dtype)
        assert_close(fold, ref, what=f"cuda fold C={size} {out_dtype} ({case})")


@needs_emulation
@pytest.mark.parametrize("out_dtype", [F32, BF16, F16], ids=str)
def test_cuda_emulated_fold_vector_path_equals_scalar_path(out_dtype):
    """16-byte vector loads/stores (aligned, full groups) and scalar ones (vec=False, unaligned views) agree."""
    _, plan, _, _ = _case("nesterov_wd_tensor_fixed_b3", 4099, DTYPES["mixed"], device="cpu")
    bases = [torch.randn(4100).to(d) for d in DTYPES["mixed"]]
    pbase = torch.randn(4100).to(F16)
    aligned, piv = [b[:4099] for b in bases], pbase[:4099]
    vec, _ = _emulated(aligned, plan, piv, False, out_dtype)
    scalar, _ = _emulated(aligned, plan, piv, False, out_dtype, vec=False)
    assert torch.equal(vec.float(), scalar.float())
    unaligned, _ = _emulated([b[1:] for b in bases], plan, pbase[1:], False, out_dtype)  # scalar path
    ref, _ = _reference([b[1:] for b in bases], plan, pbase[1:], False, out_dtype)
    assert_close(unaligned, ref, what="cuda fold on unaligned views")


@needs_emulation
def test_cuda_emulated_weighted_sum_is_the_given_weights():
    """The binding's ``linear`` path: out = sum_i w_i x_i (+ w_N * pivot for a tensor pivot only)."""
    from ame_kernels.backends.base import hyper_kwargs

    xs = [torch.randn(37).to(d) for d in DTYPES["mixed"]]
    pivot = torch.randn(37).to(BF16)
    w = np.array([0.5, -0.25, 1.5, 0.125, -2.0, 0.75], dtype=np.float32)
    plan = schedule(ak.AMEConfig(optimizer="adam"), N)  # any optimizer: the schedule is not stepped
    x64 = torch.stack([x.double() for x in xs]).numpy()
    for mode, p, expected in [("soup", 0, w[:N] @ x64), ("index", 0, w[:N] @ x64),
                              ("tensor", pivot.data_ptr(), w[:N] @ x64 + w[N] * pivot.double().numpy())]:
        out = torch.empty(37)
        C_CUDA.whole_run_emulated(
            inputs=[x.data_ptr() for x in xs], input_dtypes=["float32", "bfloat16", "float16", "bfloat16", "float32"],
            c=37, batch_ptr=np.asarray(plan.batch_ptr, dtype=np.int32), batch_idx=np.asarray(plan.batch_idx, dtype=np.int32),
            coeffs=np.asarray(plan.coeffs, dtype=np.float32), pivot_mode=mode, pivot_index=0, pivot=p,
            pivot_dtype="bfloat16", adaptive_pivot=True, out=out.data_ptr(), out_dtype="float32", check_finite=False,
            vec=True, linear=w, **hyper_kwargs(plan.hyper))
        np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=mode)


@needs_emulation
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("pivot", ["soup", 1, "tensor"])
def test_cuda_emulated_fold_check_finite(pivot):
    xs = [torch.randn(203).to(d) for d in DTYPES["mixed"]]
    xs[2][5] = float("nan")
    xs[4][202] = float("inf")  # in the ragged last group
    p = torch.randn(203) if pivot == "tensor" else (None if pivot == "soup" else pivot)
    plan = schedule(ak.AMEConfig(optimizer="sgd", momentum=0.5, lr=0.5), N)
    out, bad = _emulated(xs, plan, p, True, BF16, check_finite=True)
    ref, ref_bad = _reference(xs, plan, p, True, BF16, check_finite=True)
    assert bad == ref_bad == [2, 4]
    _assert_close_where_finite(out, ref, xs, what=f"cuda fold with NaN/Inf inputs ({pivot})")
    assert _emulated(xs, plan, p, True, BF16, check_finite=False)[1] == []


@needs_emulation
def test_cuda_emulated_unfoldable_steps():
    xs = [torch.randn(70) for _ in range(N)]
    plan = schedule(ak.AMEConfig(**UNFOLDABLE), N)
    a, _ = _emulated(xs, plan, None, True, F32)
    b, _ = _emulated(xs, plan, None, True, F32, fold=False)
    assert torch.equal(a, b)


@needs_emulation
def test_cuda_binding_checks_linear():
    from ame_kernels.backends.base import hyper_kwargs

    plan = schedule(ak.AMEConfig(optimizer="sgd"), 2)
    x = torch.randn(10)
    kw = dict(inputs=[x.data_ptr()] * 2, input_dtypes=["float32"] * 2, c=10,
              batch_ptr=np.asarray(plan.batch_ptr, dtype=np.int32), batch_idx=np.asarray(plan.batch_idx, dtype=np.int32),
              coeffs=np.asarray(plan.coeffs, dtype=np.float32), pivot_mode="soup", pivot_index=0, pivot=0,
              pivot_dtype="float32", adaptive_pivot=True, out=torch.empty(10).data_ptr(), out_dtype="float32",
              **hyper_kwargs(plan.hyper))
    bad = {
        "shape": (np.ones(2, dtype=np.float32), r"linear: expected shape \[N \+ 1\] = \[3\]"),
        "dtype": (np.ones(3), r"linear: expected dtype float32"),
        "nan": (np.array([1, np.nan, 0], dtype=np.float32), r"linear: weight 1 is not finite"),
        "ndim": (np.ones((3, 1), dtype=np.float32), r"linear: expected 1 dimension"),
    }
    dev = dict(input_table=4096, dtype_table=4096, batch_ptr_dev=4096, batch_idx_dev=4096, coeffs_dev=4096,
               nonfinite=0, device=0, stream=0)
    for what, (linear, msg) in bad.items():
        with pytest.raises(ValueError, match=r"\[whole_run_emulated\] " + msg):
            C_CUDA.whole_run_emulated(check_finite=False, vec=True, linear=linear, **kw)
        with pytest.raises(ValueError, match=r"\[whole_run\] " + msg):  # host checks come before device ones
            C_CUDA.whole_run(linear=linear, linear_dev=4096, **kw, **dev)
    with pytest.raises(ValueError, match=r"\[whole_run\] linear_dev: given without linear"):
        C_CUDA.whole_run(linear=None, linear_dev=4096, **kw, **dev)


@needs_gpu
@pytest.mark.parametrize("dtypes", ["bf16", "mixed"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_gpu_fold_matches_reference_and_stepping(case, dtypes):
    from ame_kernels.backends.cuda import CudaBackend

    cfg, plan, xs, pivot = _case(case, 100_003, DTYPES[dtypes], device="cuda")
    out_dtype = OUT_DTYPE[dtypes]
    fold, _ = _run(CudaBackend(), xs, plan, pivot, cfg.adaptive_pivot, out_dtype)
    step, _ = _run(CudaBackend(fold=False), xs, plan, pivot, cfg.adaptive_pivot, out_dtype)
    emu, _ = _emulated([x.cpu() for x in xs], plan, pivot.cpu() if isinstance(pivot, torch.Tensor) else pivot,
                       cfg.adaptive_pivot, out_dtype)
    ref, _ = _reference(xs, plan, pivot, cfg.adaptive_pivot, out_dtype)
    assert_close(fold, ref, what=f"cuda gpu fold vs reference ({case}, {dtypes})")
    assert_close(fold, step, what=f"cuda gpu fold vs stepped ({case}, {dtypes})")
    assert_close(fold, emu, what=f"cuda gpu fold vs emulation ({case}, {dtypes})")


@needs_gpu
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_cuda_gpu_fold_check_finite_and_host_tensors():
    from ame_kernels.backends.cuda import CudaBackend

    xs = [torch.randn(100_001).to(d) for d in DTYPES["mixed"]]
    xs[3][100_000] = float("nan")
    plan = schedule(ak.AMEConfig(optimizer="sgd", momentum=0.9, lr=0.5, epochs=3), N)
    dev, _ = _run(CudaBackend(), [x.cuda() for x in xs], plan, 1, True, BF16, check_finite=True)
    host, bad = _run(CudaBackend(), xs, plan, 1, True, BF16, check_finite=True)  # the chunked driver
    assert bad == [3]
    assert torch.equal(dev.cpu().view(torch.int16), host.view(torch.int16))


# ---- fallback when the Triton kernels were imported without the interpreter ---------------------


def test_triton_in_subprocess():
    """Runs this file's Triton tests in a child process with TRITON_INTERPRET=1 when they cannot run here."""
    if not HAS_TRITON or _triton_usable_here():
        pytest.skip("the Triton tests run in this process")
    rerun_in_child(__file__, "-k", "triton and not in_subprocess")
