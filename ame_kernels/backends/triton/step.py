"""Step kernel: one fused optimizer step with the state in fp32 buffers.

For the stateful APIs (the online "stew", greedy ensembling), whose state must be
snapshotted and restored between steps: read w [C] and state [S, C], read the M
batch members in their own dtype through a pointer table, write w and state back.
The per-step scalars (one ``coeffs`` row) are runtime arguments: no recompilation
per lr or step.
"""

import numpy as np
import torch
import triton
import triton.language as tl

from ...errors import MergeError
from ...schedule import Hyper
from ..base import check_step_row
from . import rules
from .whole_run import FP_FUSION, aligned16, hyper_args, hyper_flags, on_device, pointer_table

# One fixed config, no autotune: the kernel updates w and state in place, so re-running
# it while tuning would corrupt them, and a plain streaming loop gains little from tuning.
_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _step_kernel(
    w_ptr, state_ptr, table, codes, pivot_ptr,
    C, M, first, zscale, lr_eff, decay, inv_bc2_sqrt,
    h_wd, h_momentum, h_one_minus_dampening, h_beta1c, h_beta2, h_beta2c, h_rho, h_rhoc, h_eps,
    OPT: tl.constexpr, IN_KIND: tl.constexpr, ADAPTIVE: tl.constexpr, SLOTS: tl.constexpr,
    HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, AMSGRAD: tl.constexpr,
    EPS_INSIDE_SQRT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    # state is [SLOTS, C] row-major: slot k of element e at k * C + e, summed onto the int64
    # offsets (C is an i32 argument below 2^31 elements, and 2 * C would overflow it)
    offs1 = offs + C
    offs2 = offs1 + C
    s0 = tl.zeros([BLOCK], dtype=tl.float32)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    if SLOTS > 0:
        s0 = tl.load(state_ptr + offs, mask=mask, other=0.0)
    if SLOTS > 1:
        s1 = tl.load(state_ptr + offs1, mask=mask, other=0.0)
    if SLOTS > 2:
        s2 = tl.load(state_ptr + offs2, mask=mask, other=0.0)

    if ADAPTIVE:
        p = w
    else:
        p = tl.load(pivot_ptr + offs, mask=mask, other=0.0)
    # g = (p - mean of the batch) * zeta_t / N (base.py, "Batch mean"), summed in the order given
    mean = rules.load_as_f32(table, codes, 0, offs, mask, IN_KIND, ALIGNED)
    for j in range(1, M):
        mean += rules.load_as_f32(table, codes, j, offs, mask, IN_KIND, ALIGNED)
    if M > 1:
        mean = tl.div_rn(mean, tl.zeros_like(mean) + M)
    g = (p - mean) * zscale
    if HAS_WD:
        g += h_wd * w
    w, s0, s1, s2 = rules.update(
        w, g, s0, s1, s2, first != 0, lr_eff, decay, inv_bc2_sqrt,
        h_momentum, h_one_minus_dampening, h_beta1c, h_beta2, h_beta2c, h_rho, h_rhoc, h_eps,
        OPT, MOMENTUM, NESTEROV, AMSGRAD, EPS_INSIDE_SQRT,
    )

    tl.store(w_ptr + offs, w, mask=mask)
    if SLOTS > 0:
        tl.store(state_ptr + offs, s0, mask=mask)
    if SLOTS > 1:
        tl.store(state_ptr + offs1, s1, mask=mask)
    if SLOTS > 2:
        tl.store(state_ptr + offs2, s2, mask=mask)


def _check_fp32(fn: str, arg: str, x, shape, device) -> None:
    if not isinstance(x, torch.Tensor):
        raise MergeError(f"{fn}: {arg} must be a tensor, got {type(x).__name__}")
    if x.dtype != torch.float32 or tuple(x.shape) != tuple(shape) or not x.is_contiguous():
        raise MergeError(f"{fn}: {arg} must be a contiguous float32 tensor of shape {tuple(shape)}, "
                         f"got {x.dtype} {tuple(x.shape)}")
    if x.device != device:
        raise MergeError(f"{fn}: {arg} is on {x.device}, expected {device}")


def step(w, state, batch, pivot, coeffs, t: int, hyper: Hyper) -> None:
    """One fused step in place; same contract as ``Backend.step`` (ame_kernels/backends/base.py)."""
    fn = "triton.step"
    if not isinstance(hyper, Hyper):
        raise MergeError(f"{fn}: hyper must be a Hyper, got {type(hyper).__name__}")
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise MergeError(f"{fn}: w must be a 1-D float32 tensor")
    c, device = w.numel(), w.device
    _check_fp32(fn, "w", w, (c,), device)
    slots = hyper.state_slots
    _check_fp32(fn, "state", state, (slots, c), device)
    batch = list(batch)
    if not batch:
        raise MergeError(f"{fn}: batch must hold at least one tensor")
    table, codes, in_kind = pointer_table(fn, "batch", batch, c, device)
    if pivot is not None:
        _check_fp32(fn, "pivot", pivot, (c,), device)
    row = check_step_row(fn, coeffs, t)
    if c == 0:
        return
    gscale, lr_eff, decay, inv_bc2_sqrt = (float(v) for v in row)
    zscale = float(np.float32(float(np.float32(gscale)) * len(batch)))  # zeta_t / N, fp32 (base.py)
    with on_device(device):
        _step_kernel[(triton.cdiv(c, _BLOCK),)](
            w, state if slots else w, table, codes, pivot if pivot is not None else w,
            c, len(batch), int(int(t) == 1), zscale, lr_eff, decay, inv_bc2_sqrt,
            **hyper_args(hyper),
            IN_KIND=in_kind, ADAPTIVE=pivot is None, SLOTS=slots, **hyper_flags(hyper),
            ALIGNED=aligned16(batch), BLOCK=_BLOCK, num_warps=_NUM_WARPS, enable_fp_fusion=FP_FUSION,
        )
