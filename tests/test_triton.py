"""Triton backend (whole-run kernel, step kernel, chunked driver) against the reference backend.

Without a CUDA device the kernels run under the Triton interpreter on CPU tensors.
Triton reads TRITON_INTERPRET when it is imported and when a kernel is decorated, and
a few helpers check it again while running. So, on a machine without CUDA:
- at import (collection), this module sets the variable, imports triton and the kernel
  modules, and restores the environment, so that test modules collected after this one
  do not see it (tests/backends.py leaves triton to this file);
- the module-scoped ``_interpreter`` fixture sets it again while these tests run.
If triton was already imported in this process without the interpreter (too late to
switch), every test here skips and ``test_interpreter_in_subprocess`` reruns this file
in a child process with TRITON_INTERPRET=1 instead.
GPU-only tests (large sizes, the streamed driver, a merge larger than free GPU memory,
no recompilation per lr) carry the ``gpu`` marker and skip without CUDA.
"""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from ame_kernels.backends.reference import ReferenceBackend
from ame_kernels.config import AMEConfig
from ame_kernels.errors import MergeError
from ame_kernels.schedule import schedule, step_coeffs
from backends import OPTIMIZER_VARIANTS
from tolerances import assert_close
from triton_interpreter import CUDA, DEVICE, import_kernels, module_fixtures, rerun_in_child, too_late

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

_TOO_LATE = too_late()
KERNELS = import_kernels(("rules", "whole_run", "step", "driver"), _TOO_LATE)
_interpreter, _in_process = module_fixtures(_TOO_LATE)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CI runs the kernels under TRITON_INTERPRET=1)")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]


@pytest.fixture(scope="module")
def _kernels():
    return KERNELS


@pytest.fixture(scope="module")
def triton_backend():
    from ame_kernels.backends.triton import TritonBackend

    return TritonBackend()


@pytest.mark.skipif(not _TOO_LATE, reason="the kernels run in this process")
def test_interpreter_in_subprocess():
    """Fallback when triton was imported too early here: this file in a fresh interpreter process."""
    rerun_in_child(__file__)


REF = ReferenceBackend()

OPTIMIZERS = OPTIMIZER_VARIANTS  # tests/backends.py: every optimizer and option
SIZES = [1, 7, 129]  # one element, under a block, one past the interpreter's BLOCK of 128


def _inputs(n, size, dtypes, device=DEVICE):
    if not isinstance(dtypes, (list, tuple)):
        dtypes = [dtypes] * n
    return [torch.randn(size, device=device).to(d) for d in dtypes]


def _both(triton_backend, xs, plan, pivot, adaptive, out_dtype, check_finite=False):
    """(triton out, reference out, triton bad list, reference bad list)."""
    out = torch.empty(xs[0].numel(), dtype=out_dtype, device=xs[0].device)
    ref = torch.empty_like(out)
    bad = triton_backend.whole_run(xs, plan, pivot, adaptive, out, check_finite=check_finite)
    ref_bad = REF.whole_run(xs, plan, pivot, adaptive, ref, check_finite=check_finite)
    return out, ref, bad, ref_bad


# --- whole-run parity ----------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_whole_run_matches_reference(triton_backend, opt, dtype, size):
    """Every optimizer x input dtype x odd size; 2 shuffled epochs of batches of 2, adaptive pivot."""
    cfg = AMEConfig(epochs=2, batch_size=2, shuffle=True, seed=3, **OPTIMIZERS[opt])
    xs = _inputs(5, size, dtype)
    out, ref, _, _ = _both(triton_backend, xs, schedule(cfg, 5), None, True, dtype)
    assert_close(out, ref, what=f"whole_run {opt} {dtype} C={size}")


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", DTYPES, ids=str)
def test_whole_run_in_out_dtypes(triton_backend, in_dtype, out_dtype):
    """Inputs read in their own dtype, output written in another (rounded once, to nearest even)."""
    cfg = AMEConfig(optimizer="adam", lr=0.01, epochs=2, batch_size=3)
    xs = _inputs(4, 131, in_dtype)
    out, ref, _, _ = _both(triton_backend, xs, schedule(cfg, 4), None, True, out_dtype)
    assert out.dtype == out_dtype
    assert_close(out, ref, what=f"whole_run {in_dtype} -> {out_dtype}")


@pytest.mark.parametrize("opt", ["sgd_momentum_nesterov_wd", "adagrad_decay_init_wd", "adamw_wd", "adadelta_wd"])
def test_whole_run_mixed_input_dtypes(triton_backend, opt):
    """fp32, bf16 and fp16 ingredients in one merge: each read through its own pointer type."""
    cfg = AMEConfig(epochs=2, batch_size=2, **OPTIMIZERS[opt])
    xs = _inputs(5, 130, [F32, BF16, F16, BF16, F32])
    out, ref, _, _ = _both(triton_backend, xs, schedule(cfg, 5), 2, False, F32)
    assert_close(out, ref, what=f"mixed dtypes {opt}")


MODES = {
    "soup_adaptive_b1": dict(pivot="soup", adaptive=True, epochs=1, batch_size=1, shuffle=False),
    "soup_fixed_b2_e3": dict(pivot="soup", adaptive=False, epochs=3, batch_size=2, shuffle=False),
    "index_adaptive_shuffle": dict(pivot=3, adaptive=True, epochs=2, batch_size=2, shuffle=True),
    "index_fixed_b_all": dict(pivot=0, adaptive=False, epochs=2, batch_size=5, shuffle=False),
    "tensor_adaptive_b3_shuffle": dict(pivot="tensor", adaptive=True, epochs=3, batch_size=3, shuffle=True),
    "tensor_fixed_b1": dict(pivot="tensor", adaptive=False, epochs=1, batch_size=1, shuffle=False),
}


@pytest.mark.parametrize("opt", ["sgd_momentum_dampening", "adam_amsgrad_wd", "adadelta_wd"])
@pytest.mark.parametrize("mode", list(MODES))
def test_whole_run_schedule_and_pivot_modes(triton_backend, mode, opt):
    """Batches (uneven last batch), epochs, shuffle, soup / index / tensor pivot, fixed / adaptive."""
    m = MODES[mode]
    cfg = AMEConfig(epochs=m["epochs"], batch_size=m["batch_size"], shuffle=m["shuffle"], seed=7,
                    adaptive_pivot=m["adaptive"], pivot=m["pivot"] if isinstance(m["pivot"], int) else "soup",
                    **OPTIMIZERS[opt])
    xs = _inputs(5, 67, BF16)
    pivot = None if m["pivot"] == "soup" else m["pivot"]
    if m["pivot"] == "tensor":
        pivot = torch.randn(67, device=DEVICE)
    out, ref, _, _ = _both(triton_backend, xs, schedule(cfg, 5), pivot, m["adaptive"], F32)
    assert_close(out, ref, what=f"{mode} {opt}")


@pytest.mark.parametrize("lr_schedule,amplification", [
    ("constant", 1.0), ("harmonic", 5.0), ("power", 2.0), ([0.3, 0.1, 0.2, 0.05], [1.0, 2.0, 0.5, 4.0]),
], ids=["constant", "harmonic", "power", "sequences"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_whole_run_lr_and_zeta_schedules(triton_backend, opt, lr_schedule, amplification):
    """lr_t and zeta_t arrive as per-step device data, whatever their shape."""
    cfg = AMEConfig(optimizer=opt, lr=0.1, lr_schedule=lr_schedule, lr_power=-0.5, amplification=amplification)
    xs = _inputs(4, 33, F32)
    out, ref, _, _ = _both(triton_backend, xs, schedule(cfg, 4), None, True, F32)
    assert_close(out, ref, what=f"{opt} lr={lr_schedule} zeta={amplification}")


def test_whole_run_harmonic_gd_identity_is_the_soup(triton_backend):
    """Paper Section 3.1: GD, lr_t = 1/t, adaptive pivot, zeta = N, B = 1 -> uniform soup."""
    cfg = AMEConfig(optimizer="sgd", lr=1.0, lr_schedule="harmonic", amplification=6.0)
    xs = _inputs(6, 45, F32)
    out = torch.empty(45, device=DEVICE)
    triton_backend.whole_run(xs, schedule(cfg, 6), torch.full((45,), 10.0, device=DEVICE), True, out)
    assert_close(out, torch.stack(xs).mean(0), what="harmonic GD soup identity")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 3.39e38 -> fp16 inf, on purpose
def test_bf16_output_rounds_to_nearest_even(triton_backend):
    """N = 1 with a fixed pivot on it gives g = 0, so out is the input, rounded to bf16 exactly as torch does
    (ties to even, overflow to inf, NaN kept): the interpreter's own cast truncates. (An inf input cannot
    pass through unchanged: p - x is then inf - inf.)"""
    vals = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.3895e38, -3.3895e38, float("nan"),
            1e-40, -0.0, 2.0 - 2**-9, 0.1, 123.456]
    x = torch.tensor(vals + torch.randn(200).tolist(), dtype=F32, device=DEVICE)
    cfg = AMEConfig(optimizer="sgd", lr=1.0, adaptive_pivot=False)
    for out_dtype in (BF16, F16):
        out = torch.empty(x.numel(), dtype=out_dtype, device=DEVICE)
        triton_backend.whole_run([x], schedule(cfg, 1), 0, False, out)
        expected = x.to(out_dtype)
        same = (out == expected) | (torch.isnan(out) & torch.isnan(expected))
        assert bool(same.all()), f"{out_dtype}: {(~same).sum().item()} values rounded differently, " \
                                 f"first at {torch.nonzero(~same)[:3].reshape(-1).tolist()}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_check_finite_reports_bad_inputs(triton_backend):
    xs = _inputs(5, 40, BF16)
    xs[1][3] = float("nan")
    xs[4][39] = -float("inf")
    cfg = AMEConfig(optimizer="adam", lr=0.01)
    for pivot in (None, 0):
        _, _, bad, ref_bad = _both(triton_backend, xs, schedule(cfg, 5), pivot, True, BF16, check_finite=True)
        assert bad == ref_bad == [1, 4]
        _, _, bad, _ = _both(triton_backend, xs, schedule(cfg, 5), pivot, True, BF16, check_finite=False)
        assert bad == []


def test_whole_run_empty_buffer(triton_backend):
    cfg = AMEConfig()
    out = torch.empty(0, device=DEVICE)
    assert triton_backend.whole_run(_inputs(2, 0, F32), schedule(cfg, 2), None, True, out, check_finite=True) == []


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_alignment_choice_and_unaligned_views(triton_backend, _kernels, dtype):
    """Inputs at an odd element offset (views into a packed buffer, as a state dict's tensors
    can be) are not 16-byte aligned: the host must not promise alignment (ALIGNED picks
    16-byte vector loads on a GPU; kernel_report checks the widths) and results still match."""
    aligned16 = _kernels["whole_run"].aligned16
    base = [torch.randn(300, device=DEVICE).to(dtype) for _ in range(3)]
    assert aligned16(base)
    views = [b[1:] for b in base]
    assert not aligned16(views)
    assert not aligned16(base[:1] + views[1:])  # one misaligned input is enough
    for opt in ("adam", "sgd"):
        cfg = AMEConfig(epochs=2, batch_size=2, **OPTIMIZERS[opt])
        out, ref, _, _ = _both(triton_backend, views, schedule(cfg, 3), None, True, dtype)
        assert_close(out, ref, what=f"whole_run {opt} {dtype} on unaligned views")
    cfg = AMEConfig(**OPTIMIZERS["adam"])
    hyper = schedule(cfg, 3).hyper
    w = torch.randn(299, device=DEVICE)
    state = torch.zeros(hyper.state_slots, 299, device=DEVICE)
    w_ref, state_ref = w.clone(), state.clone()
    coeffs = step_coeffs(cfg, 1, gscale=1.0 / 6)
    triton_backend.step(w, state, views[:2], None, coeffs, 1, hyper)
    REF.step(w_ref, state_ref, views[:2], None, coeffs, 1, hyper)
    assert_close(w, w_ref, what=f"step adam {dtype} on unaligned views")
    assert_close(state, state_ref, what=f"step adam {dtype} state on unaligned views")


# --- step kernel -----------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_step_matches_reference_step(triton_backend, opt, adaptive):
    """Four steps carrying fp32 state, batches of 1 or 2 mixed-dtype members, vs ReferenceBackend.step."""
    cfg = AMEConfig(lr_schedule="harmonic", **OPTIMIZERS[opt])
    hyper = schedule(cfg, 4).hyper
    c = 131
    xs = _inputs(4, c, [BF16, F32, F16, BF16])
    w = torch.randn(c, device=DEVICE)
    state = torch.tensor(hyper.initial_state(), dtype=F32, device=DEVICE).reshape(-1, 1).repeat(1, c).contiguous()
    state = state.reshape(hyper.state_slots, c)
    w_ref, state_ref = w.clone(), state.clone()
    pivot = None if adaptive else torch.randn(c, device=DEVICE)
    for t, members in enumerate([[0], [1, 2], [3], [2, 0]], start=1):
        coeffs = step_coeffs(cfg, t, gscale=1.0 / (4 * len(members)))
        batch = [xs[i] for i in members]
        triton_backend.step(w, state, batch, pivot, coeffs, t, hyper)
        REF.step(w_ref, state_ref, batch, pivot, coeffs, t, hyper)
        assert_close(w, w_ref, what=f"step {opt} t={t} w")
        assert_close(state, state_ref, what=f"step {opt} t={t} state")


def test_step_kernels_replay_the_whole_run(triton_backend):
    """Stepping the plan row by row gives the whole-run kernel's result (same rules, same arithmetic)."""
    cfg = AMEConfig(optimizer="adamw", lr=0.01, weight_decay=0.1, amsgrad=True, epochs=2, batch_size=2, shuffle=True)
    plan = schedule(cfg, 3)
    xs = _inputs(3, 77, F32)
    out = torch.empty(77, device=DEVICE)
    triton_backend.whole_run(xs, plan, 1, True, out)
    w = xs[1].clone()
    state = torch.zeros(plan.hyper.state_slots, 77, device=DEVICE)
    for t in range(1, plan.steps + 1):
        triton_backend.step(w, state, [xs[i] for i in sorted(plan.batch(t))], None, plan.coeffs[t - 1], t, plan.hyper)
    assert_close(w, out, what="step replay vs whole_run")


# --- chunked driver --------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("pivot_kind", ["soup", "index", "tensor"])
@pytest.mark.parametrize("chunk", [1, 50, 129, 1000])
def test_chunked_driver_equals_unchunked(_kernels, triton_backend, chunk, pivot_kind):
    """Chunk bookkeeping of the staging loop (slots, uneven last chunk, pivot slices, finite flags):
    bit-identical to one unchunked call. Runs on the CPU path of the same loop (no streams)."""
    cfg = AMEConfig(optimizer="adam", lr=0.01, epochs=2, batch_size=2)
    plan = schedule(cfg, 4)
    c = 129
    xs = _inputs(4, c, [BF16, F32, F16, BF16], device="cpu")
    xs[2][100] = float("inf")
    pivot = {"soup": None, "index": 1, "tensor": torch.randn(c)}[pivot_kind]
    ref = torch.empty(c, dtype=BF16)
    expected_bad = triton_backend.whole_run(xs, plan, pivot, False, ref, check_finite=True)
    out = torch.empty(c, dtype=BF16)
    bad = _kernels["driver"].run_chunked(triton_backend.whole_run, xs, plan, pivot, False, out,
                                         chunk_elems=chunk, device="cpu", check_finite=True)
    assert bad == expected_bad == [2]
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


def test_chunked_driver_is_generic_over_the_kernel(_kernels):
    """Any callable with the whole_run signature works (the CUDA C++ backend reuses the driver)."""
    cfg = AMEConfig(optimizer="sgd", lr=1.0, lr_schedule="constant", adaptive_pivot=False)
    plan = schedule(cfg, 3)
    xs = _inputs(3, 100, F32, device="cpu")
    seen = []

    def kernel_fn(inputs, plan, pivot, adaptive_pivot, out, check_finite=False):
        seen.append(out.numel())
        return REF.whole_run(inputs, plan, pivot, adaptive_pivot, out, check_finite=check_finite)

    out = torch.empty(100)
    _kernels["driver"].run_chunked(kernel_fn, xs, plan, None, False, out, chunk_elems=30, device="cpu")
    assert seen == [30, 30, 30, 10]
    assert_close(out, torch.stack(xs).mean(0), what="chunked soup")


def test_chunked_runner_recovers_from_a_failed_run(_kernels):
    """A kernel error mid-merge leaves the runner (kept for reuse) clean: the next run's out
    receives only its own chunks, not the failed run's pending one."""
    cfg = AMEConfig(optimizer="sgd", lr=1.0, lr_schedule="constant", adaptive_pivot=False)
    runner = _kernels["driver"].ChunkedRunner("cpu", chunk_elems=40)
    calls = []

    def failing(inputs, plan, pivot, adaptive_pivot, out, check_finite=False):
        calls.append(out.numel())
        if len(calls) == 3:
            raise MergeError("injected kernel failure")
        return REF.whole_run(inputs, plan, pivot, adaptive_pivot, out, check_finite=check_finite)

    xs = _inputs(3, 150, F32, device="cpu")
    with pytest.raises(MergeError, match="injected"):
        runner.run(failing, xs, schedule(cfg, 3), None, False, torch.empty(150))
    small = _inputs(3, 30, F32, device="cpu")
    out = torch.empty(30)
    runner.run(REF.whole_run, small, schedule(cfg, 3), None, False, out)
    assert_close(out, torch.stack(small).mean(0), what="run after a failed one")


# --- errors ----------------------------------------------------------------------------


def test_bad_input_raises_naming_function_and_argument(triton_backend, _kernels):
    cfg = AMEConfig(optimizer="adam")
    plan = schedule(cfg, 3)
    xs = _inputs(3, 10, F32)
    out = torch.empty(10, device=DEVICE)
    with pytest.raises(MergeError, match=r"triton.whole_run: inputs has 2 tensors but the plan is for N=3"):
        triton_backend.whole_run(xs[:2], plan, None, True, out)
    with pytest.raises(MergeError, match=r"triton.whole_run: inputs\[1\] has 9 elements"):
        triton_backend.whole_run([xs[0], xs[1][:9], xs[2]], plan, None, True, out)
    with pytest.raises(MergeError, match=r"triton.whole_run: inputs\[2\] has dtype torch.int32"):
        triton_backend.whole_run([xs[0], xs[1], xs[2].int()], plan, None, True, out)
    with pytest.raises(MergeError, match=r"triton.whole_run: pivot index 3 out of range"):
        triton_backend.whole_run(xs, plan, 3, True, out)
    with pytest.raises(MergeError, match=r"triton.whole_run: inputs\[0\] must be contiguous"):
        triton_backend.whole_run([torch.randn(20, device=DEVICE)[::2], xs[1], xs[2]], plan, None, True, out)
    hyper = plan.hyper
    with pytest.raises(MergeError, match=r"triton.step: state must be a contiguous float32 tensor of shape \(2, 10\)"):
        triton_backend.step(out, torch.zeros(3, 10, device=DEVICE), xs[:1], None, plan.coeffs[0], 1, hyper)
    with pytest.raises(MergeError, match=r"triton.step: batch must hold at least one tensor"):
        triton_backend.step(out, torch.zeros(2, 10, device=DEVICE), [], None, plan.coeffs[0], 1, hyper)
    with pytest.raises(MergeError, match=r"run_chunked: chunk_elems must be >= 1"):
        _kernels["driver"].run_chunked(triton_backend.whole_run, xs, plan, None, True, out, chunk_elems=0, device="cpu")


@pytest.mark.parametrize("fraction,cached,expect_gib", [(1.0, 0, 40.0), (1.0, 8, 48.0), (1 / 80, 0, 0.75)])
def test_device_budget_sees_cached_blocks_and_the_memory_fraction(_kernels, monkeypatch, fraction, cached, expect_gib):
    """The chunk size follows what this process may allocate: free device memory plus the caching
    allocator's unused blocks, capped by set_per_process_memory_fraction (which cudaMemGetInfo does
    not see; a 1 GiB cap on an 80 GiB card must not get chunks sized for 40 GiB free). The torch.cuda
    queries are stubbed: 80 GiB card, 40 GiB free, 0.25 GiB allocated."""
    gib = 1 << 30
    driver = _kernels["driver"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: gib // 4)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: gib // 4 + cached * gib)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: fraction, raising=False)
    cuda0 = torch.device("cuda", 0)
    assert driver.device_budget(cuda0) == int(expect_gib * gib)
    chunk = driver.default_chunk_elems(10, 1 << 40, cuda0)  # 10 bytes per element over both slots
    assert chunk == min(driver.DEFAULT_MAX_CHUNK, int(expect_gib * gib) // 4 // 20)


@pytest.mark.parametrize("kernel", ["_whole_run_kernel", "_weighted_sum_kernel"])
def test_autotune_key_names_every_constexpr_but_block(_kernels, kernel):
    """Triton's autotune cache key holds only the listed names and the tensors' dtypes: a constexpr
    left out would make, say, an Adam run reuse the config tuned for an SGD run of the same size."""
    import inspect

    tuner = getattr(_kernels["whole_run"], kernel)
    params = inspect.signature(tuner.fn.fn).parameters.values()
    constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
    assert "OPT" in constexprs or kernel == "_weighted_sum_kernel", constexprs  # the annotation was read
    assert set(tuner.keys) >= constexprs - {"BLOCK"}, sorted(constexprs - {"BLOCK"} - set(tuner.keys))
    assert "BLOCK" not in tuner.keys and {"C_LOG2", "N"} <= set(tuner.keys)


def test_backend_reports_where_it_runs(triton_backend):
    ok, why = triton_backend.available()
    assert ok, why
    assert triton_backend.supports_device("cuda") == (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
    assert not triton_backend.supports_device("mps")


# --- GPU only --------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("opt", ["sgd_momentum_nesterov_wd", "adagrad_decay_init_wd", "adam", "adamw_wd", "adadelta_wd"])
def test_gpu_large_parity(triton_backend, opt):
    """Many blocks (autotuned BLOCK), an odd size, bf16 in and out."""
    cfg = AMEConfig(epochs=2, batch_size=3, shuffle=True, **OPTIMIZERS[opt])
    xs = _inputs(8, 3_000_017, BF16, device="cuda")
    out, ref, _, _ = _both(triton_backend, xs, schedule(cfg, 8), None, True, BF16)
    assert_close(out, ref, what=f"gpu {opt}")


@gpu
@needs_cuda
@pytest.mark.parametrize("pinned", [False, True], ids=["pageable", "pinned"])
def test_gpu_chunked_driver_equals_unchunked(_kernels, triton_backend, pinned):
    """Host inputs streamed through the GPU in chunks smaller than the model equal the unchunked run."""
    cfg = AMEConfig(optimizer="adam", lr=0.01, epochs=2, batch_size=2)
    plan = schedule(cfg, 6)
    c = 5_000_003
    xs = [x.pin_memory() if pinned else x for x in _inputs(6, c, BF16, device="cpu")]
    ref = torch.empty(c, dtype=BF16, device="cuda")
    triton_backend.whole_run([x.cuda() for x in xs], plan, None, True, ref)
    out = torch.empty(c, dtype=BF16, pin_memory=pinned)
    _kernels["driver"].run_chunked(triton_backend.whole_run, xs, plan, None, True, out, chunk_elems=1_000_000)
    assert torch.equal(out.view(torch.int16), ref.cpu().view(torch.int16))


@gpu
@needs_cuda
def test_gpu_merge_larger_than_free_gpu_memory(_kernels, triton_backend):
    """A flattened state dict whose inputs exceed the memory this process may use on the GPU
    (capped with set_per_process_memory_fraction) merges through the chunked driver."""
    total = torch.cuda.get_device_properties(0).total_memory
    budget = 1 << 30  # this process may allocate 1 GiB on the GPU
    cfg = AMEConfig(optimizer="adam", lr=0.01)
    n, c = 4, (3 << 30) // (4 * 2)  # 4 bf16 inputs of 3/4 GiB each: 3 GiB > budget
    state_dicts = [{"a.weight": torch.randn(c // 2, dtype=BF16), "b.weight": torch.randn(c - c // 2, dtype=BF16)}
                   for _ in range(n)]
    xs = [torch.cat([sd["a.weight"], sd["b.weight"]]) for sd in state_dicts]
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(budget / total)
    try:
        out = torch.empty(c, dtype=BF16)
        _kernels["driver"].run_chunked(triton_backend.whole_run, xs, schedule(cfg, n), None, True, out)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    probe = slice(0, 1_000_003)
    ref = torch.empty(1_000_003, dtype=BF16)
    REF.whole_run([x[probe] for x in xs], schedule(cfg, n), None, True, ref)
    assert_close(out[probe], ref, what="larger-than-memory merge, first 1M elements")
    tail = slice(c - 1_000_003, c)
    REF.whole_run([x[tail] for x in xs], schedule(cfg, n), None, True, ref)
    assert_close(out[tail], ref, what="larger-than-memory merge, last 1M elements")


@gpu
@needs_cuda
def test_gpu_no_recompilation_per_lr_or_step_count(_kernels, triton_backend):
    """lr, zeta and T are runtime data: new values reuse the compiled kernel."""
    jit_fn = _kernels["whole_run"]._whole_run_kernel.fn
    caches = getattr(jit_fn, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton version exposes no per-device kernel cache to inspect")

    def compiled():
        return sum(len(v[0]) for v in caches.values())

    xs = _inputs(4, 10_000, BF16, device="cuda")
    out = torch.empty(10_000, dtype=BF16, device="cuda")
    triton_backend.whole_run(xs, schedule(AMEConfig(optimizer="adam", lr=1e-3), 4), None, True, out)
    before = compiled()
    for lr, epochs in [(3e-3, 1), (0.1, 3), (1e-5, 5)]:
        triton_backend.whole_run(xs, schedule(AMEConfig(optimizer="adam", lr=lr, epochs=epochs), 4), None, True, out)
    assert compiled() == before


@pytest.mark.skipif(CUDA, reason="checks the no-GPU exit of the benchmark")
def test_bench_gpu_skips_cleanly_without_cuda(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        bench_gpu = importlib.import_module("bench_gpu")
    finally:
        sys.path.pop(0)
    assert bench_gpu.main([]) == 0
    assert capsys.readouterr().out.strip() == "no CUDA GPU: skipped"


def test_bench_gpu_smoke_run_on_cpu():
    """``bench_gpu.py --device cpu`` runs the benchmark's whole code path (baselines, every optimizer's
    reference/triton rows, the chunked host path, the table) with the kernels interpreted, so a bug in
    the script shows in CI rather than on a GPU session's clock. Checks the table, not the timings."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_gpu.py"), "--device", "cpu",
                           "--elems", "1031", "--host-elems", "777", "--chunk-elems", "256", "--repeats", "1",
                           "--warmup", "0", "--ref-repeats", "1"],
                          env=env, capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    for opt in ("gd", "adagrad", "adam", "adamw", "adadelta"):
        rows = {ln.split()[1]: ln.split() for ln in lines if ln.split()[:1] == [opt]}
        assert set(rows) == {"reference", "triton"}, (opt, proc.stdout)
        assert float(rows["triton"][-1]) <= 2 ** -5, (opt, rows["triton"])  # bf16 out: an ulp or two at most
    for method in ("linear", "task_arithmetic", "ties", "dare", "della"):  # the combine pass: bitwise
        rows = [ln.split() for ln in lines if ln.split()[:2] == [method, "triton"]]
        assert len(rows) == 1 and rows[0][-1] == "0", (method, proc.stdout)
    assert any(ln.split()[:2] == ["pageable", "triton"] for ln in lines), proc.stdout
    assert lines[-1].strip() == "18 rows (smoke run: none written)", proc.stdout


_AOT_SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ame_kernels.backends.triton import step as S, whole_run as W

def build(fn, ptrs, consts):
    sig = {n: ("constexpr" if n in consts else ptrs.get(n, "fp32")) for n in fn.arg_names}
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]

wr = W._whole_run_kernel.fn
ptrs = dict(table="*i64", codes="*i32", pivot_ptr="*fp16", out_ptr="*bf16", coeffs_ptr="*fp32", batch_ptr="*i32",
            batch_idx="*i32", flags_ptr="*i32", C="i64", N="i32", T="i32", C_LOG2="i32")
for opt, in_kind, soup in ((0, 1, True), (1, 3, False), (2, 2, True), (3, 0, False), (4, 3, True)):
    ptx = build(wr, ptrs, dict(OPT=opt, IN_KIND=in_kind, SOUP=soup, ADAPTIVE=soup, HAS_WD=True, MOMENTUM=True,
                               NESTEROV=True, AMSGRAD=True, EPS_INSIDE_SQRT=opt == 1, CHECK_FINITE=soup, BLOCK=1024))
    assert "sqrt.rn.f32" in ptx or opt == 0, "IEEE sqrt expected"
st = S._step_kernel
ptrs = dict(w_ptr="*fp32", state_ptr="*fp32", table="*i64", codes="*i32", pivot_ptr="*fp32", C="i64", M="i32", first="i32")
for opt, slots in ((0, 1), (2, 3), (4, 2)):
    build(st, ptrs, dict(OPT=opt, IN_KIND=3, ADAPTIVE=False, SLOTS=slots, HAS_WD=True, MOMENTUM=True, NESTEROV=False,
                         AMSGRAD=True, EPS_INSIDE_SQRT=False, BLOCK=1024))
print("compiled")
'''


def test_kernels_compile_for_sm90_without_gpu():
    """The CPU tests run the kernels interpreted; this compiles them to PTX for an H100 (sm_90), which
    needs no GPU, so compiled-mode code generation (pointer-table casts, runtime loops, constexpr
    branches, IEEE sqrt/div) is checked in CI too. Runs in a child process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, cwd=root)
    if proc.returncode != 0 and "ImportError" in proc.stderr and "triton" in proc.stderr:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
