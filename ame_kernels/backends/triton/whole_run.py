"""Whole-run kernel: one launch runs the entire schedule for a block of elements.

Each program owns BLOCK elements of the flat buffer [C]. It builds w_0 (the fp32
soup of all N inputs, or the given pivot), then loops over every step of the
plan (all epochs and batches, runtime bounds T and batch_ptr), keeping w, w_0 and
the optimizer moments in registers: the moments never touch memory. Inputs are
read in their own dtype through an int64 pointer table (no stacking, no upcast
copy); after the first pass over a block its N slices sit in L2, so the traffic
is about N*C*sizeof(in) + C*sizeof(out) bytes. w is written once, in ``out``'s dtype.

GD is folded (``_weighted_sum_kernel``): SGD with any momentum / nesterov / dampening /
coupled weight decay is linear in (w_0, x_1..x_N), so the host folds the whole schedule
into N+1 fp32 weights (``schedule.folded_weights``, the cpu backend's fold) and the
kernel computes out = sum_i c_i x_i (+ c_N * pivot for a tensor pivot), reading each
input once whatever the number of epochs: fp32 FMAs over the inputs in order, as the
cpu kernel sums. ``whole_run(fold=False)`` (``TritonBackend(fold=False)``), a non-sgd
optimizer or an ill-conditioned fold (``linear_coefficients`` returns None) step instead.

Nothing per learning rate or step count is compiled: lr_t, zeta_t, bias
corrections, batch members and the folded weights are device tensors (``StepPlan``).
Compile-time (constexpr) are only the optimizer, its flags, the input dtype kind and BLOCK.
"""

import contextlib
import os

import numpy as np
import torch
import triton
import triton.language as tl

from ...errors import MergeError
from ...schedule import Hyper, StepPlan, folded_weights
from ..base import check_flat, check_plan_inputs
from . import rules

_IN_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: Passed to every launch rather than left to Triton's default, which 3.10 turns off: the
#: kernels are written for contracted a*b+c (as the CPU kernels' FMAs), and the rounding
#: must not change with the Triton version.
FP_FUSION = True
_FLOAT_DTYPES = tuple(_IN_KIND)


def _configs():
    """A few BLOCK/num_warps choices on GPU; one fixed config under the interpreter
    (autotune with one config never benchmarks, and the interpreter ignores warps), or
    with AME_TRITON_AUTOTUNE=0 (the first GPU config: test runs that compile hundreds of
    variants need not benchmark four configs of each). Read when the kernels are defined."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK": 128}, num_warps=4)]
    configs = [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in GPU_CONFIGS]
    return configs[:1] if os.environ.get("AME_TRITON_AUTOTUNE") == "0" else configs


#: (BLOCK, num_warps) autotuned on a GPU. 8 or 16 elements per thread: a bf16/fp16 thread
#: then reads whole 16-byte vectors (4 elements per thread, e.g. BLOCK 512 x 4 warps,
#: compile to 8-byte loads; ``python -m ame_kernels.kernel_report`` shows the widths).
GPU_CONFIGS = ((1024, 4), (2048, 8), (2048, 4), (4096, 8))


# Keyed on the size bucket (log2 of C), N and every constexpr but BLOCK, never on C itself:
# a state dict has many distinct tensor/chunk sizes and must not re-tune for each one, while
# each compiled variant (optimizer, input kind, options) is tuned on its own (Triton's key
# holds only the names listed here and the tensors' dtypes). Re-running during tuning is
# harmless: the kernel only reads inputs and writes out/flags idempotently.
_WHOLE_RUN_KEY = ["C_LOG2", "N", "OPT", "IN_KIND", "SOUP", "ADAPTIVE", "HAS_WD", "MOMENTUM", "NESTEROV",
                  "AMSGRAD", "EPS_INSIDE_SQRT", "CHECK_FINITE", "ALIGNED"]


@triton.autotune(configs=_configs(), key=_WHOLE_RUN_KEY)
@triton.jit
def _whole_run_kernel(
    table, codes, pivot_ptr, out_ptr, coeffs_ptr, batch_ptr, batch_idx, flags_ptr,
    C, N, T, C_LOG2,
    h_wd, h_momentum, h_one_minus_dampening, h_beta1c, h_beta2, h_beta2c, h_rho, h_rhoc, h_eps, h_init,
    OPT: tl.constexpr, IN_KIND: tl.constexpr, SOUP: tl.constexpr, ADAPTIVE: tl.constexpr,
    HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, AMSGRAD: tl.constexpr,
    EPS_INSIDE_SQRT: tl.constexpr, CHECK_FINITE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: C may exceed 2^31
    mask = offs < C

    # w_0. One pass over all N inputs when a soup is needed or inputs must be checked;
    # it also warms L2 for the steps that follow.
    if SOUP or CHECK_FINITE:
        soup = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, N):
            x = rules.load_as_f32(table, codes, i, offs, mask, IN_KIND, ALIGNED)
            if CHECK_FINITE:
                rules.flag_nonfinite(x, mask, flags_ptr + i)
            soup += x
        if SOUP:
            w0 = tl.div_rn(soup, tl.zeros_like(soup) + N)  # fp32 sum then an IEEE divide
    if not SOUP:
        w0 = tl.load(pivot_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    w = w0
    s0 = tl.zeros([BLOCK], dtype=tl.float32)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    if OPT == rules.ADAGRAD:
        s0 += h_init

    for t in range(0, T):
        gscale = tl.load(coeffs_ptr + 4 * t)
        lr_eff = tl.load(coeffs_ptr + 4 * t + 1)
        decay = tl.load(coeffs_ptr + 4 * t + 2)
        inv_bc2_sqrt = tl.load(coeffs_ptr + 4 * t + 3)
        lo = tl.load(batch_ptr + t)
        hi = tl.load(batch_ptr + t + 1)
        if ADAPTIVE:
            p = w
        else:
            p = w0
        # g = (p - mean of the batch) * zeta_t / N (base.py, "Batch mean"): batch_idx holds
        # each batch in ascending index, so a batch of every ingredient sums as the soup did
        mean = rules.load_as_f32(table, codes, tl.load(batch_idx + lo), offs, mask, IN_KIND, ALIGNED)
        for j in range(lo + 1, hi):
            i = tl.load(batch_idx + j)
            mean += rules.load_as_f32(table, codes, i, offs, mask, IN_KIND, ALIGNED)
        if hi - lo > 1:
            mean = tl.div_rn(mean, tl.zeros_like(mean) + (hi - lo).to(tl.float32))
        zs = (gscale.to(tl.float64) * (hi - lo).to(tl.float64)).to(tl.float32)  # fp32(fp64(gscale) m)
        g = (p - mean) * zs
        if HAS_WD:
            g += h_wd * w
        w, s0, s1, s2 = rules.update(
            w, g, s0, s1, s2, t == 0, lr_eff, decay, inv_bc2_sqrt,
            h_momentum, h_one_minus_dampening, h_beta1c, h_beta2, h_beta2c, h_rho, h_rhoc, h_eps,
            OPT, MOMENTUM, NESTEROV, AMSGRAD, EPS_INSIDE_SQRT,
        )

    rules.store_rounded(out_ptr, offs, w, mask)


@triton.autotune(configs=_configs(), key=["C_LOG2", "N", "IN_KIND", "PIVOT", "CHECK_FINITE", "ALIGNED"])
@triton.jit
def _weighted_sum_kernel(
    table, codes, pivot_ptr, out_ptr, weights_ptr, flags_ptr,
    C, N, C_LOG2,
    IN_KIND: tl.constexpr, PIVOT: tl.constexpr, CHECK_FINITE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """GD folded on the host: out = sum_i weights[i] x_i (+ weights[N] * pivot when PIVOT).

    The weights are runtime data (fp32 [N+1], ``schedule.folded_weights``): a new lr,
    schedule or epoch count reuses the compiled kernel. fp32 FMAs over the inputs in
    order, then the pivot, as the cpu kernel's ``weighted_sum_impl``.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: C may exceed 2^31
    mask = offs < C
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, N):
        x = rules.load_as_f32(table, codes, i, offs, mask, IN_KIND, ALIGNED)
        if CHECK_FINITE:
            rules.flag_nonfinite(x, mask, flags_ptr + i)
        acc = tl.fma(tl.zeros_like(acc) + tl.load(weights_ptr + i), x, acc)
    if PIVOT:
        p = tl.load(pivot_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc = tl.fma(tl.zeros_like(acc) + tl.load(weights_ptr + N), p, acc)
    rules.store_rounded(out_ptr, offs, acc, mask)


# --- host side ------------------------------------------------------------------

_MAX_CACHED_PLANS = 8
_plan_cache: dict = {}  # (id(plan), device) -> (plan, coeffs, batch_ptr, batch_idx); tiny, bounded


def upload_async(host, device: torch.device) -> tuple:
    """Copy small host tensors to ``device`` without blocking the host: (tensors..., ready event).

    The copy runs on the current stream from pinned memory (torch keeps the pinned block
    alive until the copy is done); cached uploads used later from another stream wait on
    the event first (``wait_upload``).
    """
    if device.type != "cuda":
        return tuple(h.clone() for h in host) + (None,)
    out = tuple(h.pin_memory().to(device, non_blocking=True) for h in host)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return out + (event,)


def wait_upload(entry: tuple) -> tuple:
    """The tensors of a cached upload, after making the current stream wait for its copy."""
    if entry[-1] is not None:
        stream = torch.cuda.current_stream(entry[0].device)
        stream.wait_event(entry[-1])
        for t in entry[:-1]:
            t.record_stream(stream)  # not reused by the allocator before this stream is done with it
    return entry[:-1]


def _plan_tensors(plan: StepPlan, device: torch.device):
    """The plan's per-step arrays on ``device``, uploaded once per (plan, device).

    A chunked merge calls the kernel once per chunk with the same plan; re-uploading
    the schedule each time would put a synchronous host copy in every launch.
    """
    key = (id(plan), str(device))
    hit = _plan_cache.get(key)
    if hit is not None and hit[0] is plan:
        return wait_upload(hit[1:])
    host = (
        torch.as_tensor(np.ascontiguousarray(plan.coeffs, dtype=np.float32)),
        torch.as_tensor(np.ascontiguousarray(plan.batch_ptr, dtype=np.int32)),
        torch.as_tensor(plan.summation_idx()),  # each batch ascending: the batch mean's order
    )
    entry = upload_async(host, device)
    if len(_plan_cache) >= _MAX_CACHED_PLANS:
        _plan_cache.pop(next(iter(_plan_cache)))
    _plan_cache[key] = (plan,) + entry
    return entry[:-1]


_weights_cache: dict = {}  # (id(plan), device, adaptive, mode, index) -> (plan, upload or None); tiny, bounded


def _fold_weights(plan: StepPlan, adaptive_pivot: bool, mode: str, index: int, device: torch.device):
    """The folded GD weights (fp32 [N+1], ``schedule.folded_weights``) on ``device``, or None
    (not sgd, or ill-conditioned: step). Uploaded once per (plan, device, pivot mode), like
    the plan's own arrays, without blocking the host."""
    key = (id(plan), str(device), bool(adaptive_pivot), mode, int(index))
    hit = _weights_cache.get(key)
    if hit is None or hit[0] is not plan:
        w = folded_weights(plan, adaptive_pivot, mode, index)
        entry = None if w is None else upload_async((torch.from_numpy(w),), device)
        if len(_weights_cache) >= _MAX_CACHED_PLANS:
            _weights_cache.pop(next(iter(_weights_cache)))
        hit = _weights_cache[key] = (plan, entry)
    if hit[1] is None:
        return None
    return wait_upload(hit[1])[0]


def check_inputs(fn: str, arg: str, tensors, numel: int, device: torch.device) -> list:
    """Each of ``tensors`` is a contiguous float32/bfloat16/float16 tensor of ``numel``
    elements on ``device``; returns their dtype codes (0 fp32, 1 bf16, 2 fp16)."""
    return [_IN_KIND[getattr(torch, check_flat(fn, f"{arg}[{k}]", x, numel, device))] for k, x in enumerate(tensors)]


_MAX_CACHED_TABLES = 64
_table_cache: dict = {}  # (device, ptrs, kinds) -> (table, codes); the content is a pure function of the key


def pointer_table(fn: str, arg: str, tensors, numel: int, device: torch.device):
    """(int64 [M] data_ptr table, int32 [M] dtype codes, IN_KIND) for ``tensors`` (checked).

    IN_KIND is the common dtype's code, or 3 when the dtypes are mixed. Tables are cached
    by (device, pointers, dtypes), and a new one is uploaded from pinned memory without
    blocking: the chunked driver launches once per chunk from the same buffers, and a
    synchronous upload there would stall the host behind the compute stream.
    """
    kinds = check_inputs(fn, arg, tensors, numel, device)
    ptrs = tuple(x.data_ptr() for x in tensors)
    key = (str(device), ptrs, tuple(kinds))
    hit = _table_cache.get(key)
    if hit is None:
        hit = upload_async((torch.tensor(ptrs, dtype=torch.int64), torch.tensor(kinds, dtype=torch.int32)), device)
        if len(_table_cache) >= _MAX_CACHED_TABLES:
            _table_cache.pop(next(iter(_table_cache)))
        _table_cache[key] = hit
        table, codes = hit[:-1]
    else:
        table, codes = wait_upload(hit)
    in_kind = kinds[0] if len(set(kinds)) == 1 else 3
    return table, codes, in_kind


def aligned16(tensors) -> bool:
    """Every tensor's data starts 16-byte aligned: the kernels may then use vector loads
    through the pointer table (``rules._at``). Views into a packed buffer may not be."""
    return all(x.data_ptr() % 16 == 0 for x in tensors)


def hyper_args(hyper: Hyper) -> dict:
    """Scalar hyperparameters as kernel arguments; complements computed in float64."""
    return dict(
        h_wd=float(hyper.weight_decay),
        h_momentum=float(hyper.momentum),
        h_one_minus_dampening=1.0 - float(hyper.dampening),
        h_beta1c=1.0 - float(hyper.beta1),
        h_beta2=float(hyper.beta2),
        h_beta2c=1.0 - float(hyper.beta2),
        h_rho=float(hyper.rho),
        h_rhoc=1.0 - float(hyper.rho),
        h_eps=float(hyper.eps),
    )


def hyper_flags(hyper: Hyper) -> dict:
    return dict(
        OPT=hyper.code,
        HAS_WD=hyper.weight_decay != 0,
        MOMENTUM=hyper.momentum != 0,
        NESTEROV=bool(hyper.nesterov),
        AMSGRAD=bool(hyper.amsgrad),
        EPS_INSIDE_SQRT=bool(hyper.eps_inside_sqrt),
    )


def whole_run(inputs, plan: StepPlan, pivot, adaptive_pivot: bool, out: torch.Tensor, check_finite: bool = False,
              fold: bool = True) -> list:
    """Run the whole schedule over the flat buffers ``inputs`` (N x [C]) into ``out`` [C].

    Same contract as ``Backend.whole_run`` (ame_kernels/backends/base.py); inputs,
    pivot and out must be on one device (CUDA, or CPU under TRITON_INTERPRET=1).
    fold: run GD as one weighted sum (``_weighted_sum_kernel``) when the plan allows it;
    False always steps.
    """
    fn = "triton.whole_run"
    inputs = check_plan_inputs(fn, plan, inputs)
    if not isinstance(out, torch.Tensor) or out.dtype not in _FLOAT_DTYPES or not out.is_contiguous():
        raise MergeError(f"{fn}: out must be a contiguous float32/bfloat16/float16 tensor")
    c, device = out.numel(), out.device
    table, codes, in_kind = pointer_table(fn, "inputs", inputs, c, device)

    soup = pivot is None
    mode, index = "soup", 0
    if soup:
        pivot_t = out  # unused placeholder pointer
    elif isinstance(pivot, (int, np.integer)) and not isinstance(pivot, bool):
        if not 0 <= int(pivot) < plan.n:
            raise MergeError(f"{fn}: pivot index {pivot} out of range [0, {plan.n})")
        pivot_t = inputs[int(pivot)]
        mode, index = "index", int(pivot)
    elif isinstance(pivot, torch.Tensor):
        check_inputs(fn, "pivot", [pivot], c, device)
        pivot_t = pivot
        mode = "tensor"
    else:
        raise MergeError(f"{fn}: pivot must be None (soup), an input index or a tensor, got {type(pivot).__name__}")

    flags = torch.zeros(max(plan.n, 1), dtype=torch.int32, device=device)
    if c == 0:
        return []
    grid = lambda meta: (triton.cdiv(c, meta["BLOCK"]),)  # noqa: E731
    weights = _fold_weights(plan, adaptive_pivot, mode, index, device) if fold else None
    with on_device(device):
        if weights is not None:
            _weighted_sum_kernel[grid](
                table, codes, pivot_t, out, weights, flags,
                c, plan.n, max(c, 1).bit_length(),
                IN_KIND=in_kind, PIVOT=mode == "tensor", CHECK_FINITE=bool(check_finite),
                ALIGNED=aligned16(inputs), enable_fp_fusion=FP_FUSION,
            )
        else:
            coeffs, batch_ptr, batch_idx = _plan_tensors(plan, device)
            hyper = plan.hyper
            _whole_run_kernel[grid](
                table, codes, pivot_t, out, coeffs, batch_ptr, batch_idx, flags,
                c, plan.n, plan.steps, max(c, 1).bit_length(),
                h_init=float(hyper.initial_accumulator_value),
                SOUP=soup, ADAPTIVE=bool(adaptive_pivot), IN_KIND=in_kind, CHECK_FINITE=bool(check_finite),
                ALIGNED=aligned16(inputs), **hyper_args(hyper), **hyper_flags(hyper), enable_fp_fusion=FP_FUSION,
            )
    if not check_finite:
        return []
    return torch.nonzero(flags.cpu()).reshape(-1).tolist()


def on_device(device: torch.device):
    """Triton launches on the *current* CUDA device and stream, whatever the tensors' device:
    make the tensors' device current (a no-op on cuda:0 or CPU), as torch's own ops do."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
