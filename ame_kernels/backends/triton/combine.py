"""Combine kernel: the elementwise pass of every non-AME merge method, over one chunk.

Implements ``ame_kernels.methods.combine`` (its module docstring is the normative
definition; ``combine_torch`` the oracle this kernel is tested against bit for bit).
Each program owns BLOCK elements. Inputs are read in their own dtype through the int64
pointer table (``whole_run.pointer_table``: one dtype, or mixed with a per-input code),
the base (optional) and out through typed pointer arguments, per-element keep
probabilities (optional, float32) through a second pointer table with 0 for "none".

Per-ingredient scalars come from two small device arrays, uploaded once per plan:

    fparams fp32 [5, N]:  weight, scale, top_mag, end_mag, density
    iparams i64  [3, N]:  top_idx, end_idx, mode (0 no draw, 1 draw against density,
                          2 draw against probs[i])

so a new plan (other weights, densities, windows, seeds) reuses the compiled kernel.
Compile-time are only the input dtype kind, whether there is a base / a probs table /
any draw, the elect mode, normalize, inv_prob, alignment and BLOCK.

Arithmetic, in the oracle's order: all fp32, adds and multiplies as separate IEEE
operations, divisions correctly rounded (``tl.div_rn``; Triton's ``/`` is approximate
on NVIDIA GPUs). ``enable_fp_fusion`` is False for this kernel (``FP_FUSION`` below),
unlike the whole-run kernels: the oracle computes ``acc + w * t`` and ``b + lam * mixed``
as a multiply then an add, each rounded, and a contracted FMA would round once and
differ in the last bit.

elect none is one pass over the inputs. elect sum / count need every y_i twice (the
vote, then the agreeing sum): the first pass records keep_i as bit i of an int32 per
element (ingredients 0..31; an int64 costs the heaviest variant two registers past 128),
the second re-reads the inputs (L1/L2 hits: this program just read them) and rebuilds
y_i from the bit without redrawing Philox; ingredients past 31 recompute their keep
(window and draw) in the second pass.

Philox4x32-10: 32-bit words as uint32 tensors, ``tl.umulhi`` for the high halves, the
constants and key schedule of ``methods.combine.philox4x32_10``; counter
(q mod 2^32, q >> 32, i, 0) with q = g >> 2, word g mod 4, key (k0, k1) from the host: one
counter per four lanes, expanded with join / reshape, so a block starts on a counter. A chunk
whose offset is not a multiple of 4 has its first 1-3 elements merged by the oracle
(``combine_torch``, bitwise the kernel) and the rest by the kernel from the next multiple.
"""

import os

import numpy as np
import torch
import triton
import triton.language as tl

from ...errors import MergeError
from ...methods.combine import MASK32, CombinePlan, combine_torch
from ...methods.transforms import transform_torch
from ..base import check_probs, check_transform_outs
from . import rules
from .whole_run import GPU_CONFIGS, aligned16, check_inputs, on_device, pointer_table, upload_async, wait_upload

#: Passed to every launch of this kernel (and to the ahead-of-time compile in
#: kernel_report): no FMA contraction, see the module docstring.
FP_FUSION = False
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MODE_NONE, _MODE_DENSITY, _MODE_PROBS = 0, 1, 2


def _configs():
    """As ``whole_run._configs``: one config under the interpreter or AME_TRITON_AUTOTUNE=0."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK": 1024}, num_warps=4)]
    configs = [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in GPU_CONFIGS]
    return configs[:1] if os.environ.get("AME_TRITON_AUTOTUNE") == "0" else configs


@triton.jit
def philox_uniform4(q, i, k0, k1, BLOCK: tl.constexpr):
    """u in [0, 1) for the 4 x (BLOCK / 4) elements of the counters ``q`` (consecutive, int64; q[0] =
    the block's first global index >> 2): element 4 q + w takes word w of counter (q, q >> 32, i, 0)
    under key (k0, k1) (uint32). One counter per four lanes, expanded in element order."""
    c0 = q.to(tl.uint32)  # low word (truncation)
    c1 = (q >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + i  # i < 2^31: the same word as uint32
    c3 = tl.zeros_like(c0)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    words = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [BLOCK])  # [q, k, j] -> word 2 k + j
    return (words >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24: exact


@triton.jit
def _prob(fparams, iparams, ptable, i, N, offs, mask, HAS_PROBS: tl.constexpr, ALIGNED: tl.constexpr,
          BLOCK: tl.constexpr):
    """(p_i as an fp32 block, mode_i): probs[i][j], density[i], or 1.0 where nothing is drawn."""
    mode = tl.load(iparams + 2 * N + i)
    p = tl.full([BLOCK], 1.0, tl.float32)
    if mode == 1:
        p = p * 0.0 + tl.load(fparams + 4 * N + i)
    if HAS_PROBS:
        if mode == 2:
            addr = tl.load(ptable + i)
            p = tl.load(rules._at(addr, tl.float32, offs, ALIGNED), mask=mask, other=1.0)
    return p, mode


@triton.jit
def _keep(m, g, q, p, mode, fparams, iparams, i, N, k0, k1, RANDOM: tl.constexpr, BLOCK: tl.constexpr):
    """keep_i: the magnitude-rank window, and the draw u < p where mode != 0 (q: the block's counters)."""
    tm = tl.load(fparams + 2 * N + i)
    em = tl.load(fparams + 3 * N + i)
    ti = tl.load(iparams + i)
    ei = tl.load(iparams + N + i)
    before_top = (m > tm) | ((m == tm) & (g < ti))
    before_end = (m > em) | ((m == em) & (g < ei)) | ((tl.zeros_like(m) + em) < 0)  # no end: every entry, NaN included
    keep = (before_top == 0) & before_end
    if RANDOM:
        if mode != 0:
            keep = keep & (philox_uniform4(q, i, k0, k1, BLOCK) < p)
    return keep


@triton.jit
def _sign(y):
    """torch.sign on the CPU: +1, -1, and 0 for +-0 and NaN."""
    return tl.where(y > 0, 1.0, tl.where(y < 0, -1.0, 0.0))


_COMBINE_KEY = ["C_LOG2", "N", "IN_KIND", "HAS_BASE", "HAS_PROBS", "RANDOM", "ELECT", "NORMALIZE", "INV_PROB",
                "ALIGNED", "SPLIT"]


# Keyed like the whole-run kernels: size bucket, N and every constexpr but BLOCK. Re-running
# during tuning is harmless: the kernel only reads its inputs and writes out.
@triton.autotune(configs=_configs(), key=_COMBINE_KEY)
@triton.jit(do_not_specialize=["offset", "k0_arg", "k1_arg"])  # never the constexpr 1: .to() below
def _combine_kernel(
    table, codes, base_ptr, out_ptr, fparams, iparams, ptable, otable,
    C, N, C_LOG2, offset, k0_arg, k1_arg, div_none, lam,
    IN_KIND: tl.constexpr, HAS_BASE: tl.constexpr, HAS_PROBS: tl.constexpr, RANDOM: tl.constexpr,
    ELECT: tl.constexpr, NORMALIZE: tl.constexpr, INV_PROB: tl.constexpr, ALIGNED: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: C may exceed 2^31
    mask = offs < C
    g = offset.to(tl.int64) + offs  # global element index (masks, windows)
    # the block's Philox counters (offset is a multiple of 4, the host's contract): lanes 4k..4k+3
    q = (offset.to(tl.int64) + pid.to(tl.int64) * BLOCK) // 4 + tl.arange(0, BLOCK // 4)
    k0 = k0_arg.to(tl.uint32)
    k1 = k1_arg.to(tl.uint32)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK], dtype=tl.float32)

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    vote = tl.zeros([BLOCK], dtype=tl.float32)
    bits = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, N):
        x = rules.load_as_f32(table, codes, i, offs, mask, IN_KIND, ALIGNED)
        tau = x - b
        p, mode = _prob(fparams, iparams, ptable, i, N, offs, mask, HAS_PROBS, ALIGNED, BLOCK)
        keep = _keep(tl.abs(tau), g, q, p, mode, fparams, iparams, i, N, k0, k1, RANDOM, BLOCK)
        t = tau
        if INV_PROB:
            t = tl.div_rn(tau, p)  # p == 1 where nothing is drawn: exact
        t = t * tl.load(fparams + N + i)
        t = tl.where(keep, t, 0.0)
        y = tl.load(fparams + i) * t
        if ELECT == 0:
            if SPLIT:  # the transform pass: each ingredient's b + y_i to its own fp32 output
                tl.store(rules._at(tl.load(otable + i), tl.float32, offs, ALIGNED), b + y, mask=mask)
            else:
                acc = acc + y
        else:
            if ELECT == 1:
                vote = vote + y
            else:
                vote = vote + _sign(y)
            if i < 32:
                bits = bits | (keep.to(tl.int32) << i)

    if ELECT == 0:
        div = tl.zeros([BLOCK], dtype=tl.float32) + div_none  # sum of weights, |.| < 1e-8 -> 1 (host)
    else:
        s = tl.where(vote >= 0, 1.0, -1.0)
        div = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, N):
            x = rules.load_as_f32(table, codes, i, offs, mask, IN_KIND, ALIGNED)
            tau = x - b
            p, mode = _prob(fparams, iparams, ptable, i, N, offs, mask, HAS_PROBS, ALIGNED, BLOCK)
            if i < 32:
                keep = ((bits >> i) & 1) != 0
            else:
                keep = _keep(tl.abs(tau), g, q, p, mode, fparams, iparams, i, N, k0, k1, RANDOM, BLOCK)
            t = tau
            if INV_PROB:
                t = tl.div_rn(tau, p)
            t = t * tl.load(fparams + N + i)
            t = tl.where(keep, t, 0.0)
            w = tl.load(fparams + i)
            y = w * t
            agree = _sign(y) == s
            if SPLIT:
                tl.store(rules._at(tl.load(otable + i), tl.float32, offs, ALIGNED), b + tl.where(agree, y, 0.0),
                         mask=mask)
            else:
                acc = acc + tl.where(agree, y, 0.0)
                div = div + tl.where(agree, w, 0.0)
        div = tl.where(div == 0, 1.0, div)

    if not SPLIT:
        if NORMALIZE:
            mixed = tl.div_rn(acc, div)
        else:
            mixed = acc
        rules.store_rounded(out_ptr, offs, b + lam * mixed, mask)


# --- host side ------------------------------------------------------------------

_MAX_CACHED_PLANS = 8
_params_cache: dict = {}  # (id(plan), device, modes) -> (plan, fparams, iparams, event); tiny, bounded
_MAX_CACHED_TABLES = 64
_address_cache: dict = {}  # (device, addresses) -> (table, event); content is a pure function of the key


def _plan_params(plan: CombinePlan, modes: tuple, device: torch.device):
    """(fparams fp32 [5N], iparams int64 [3N]) on ``device``, uploaded once per (plan, device, modes)."""
    key = (id(plan), str(device), modes)
    hit = _params_cache.get(key)
    if hit is not None and hit[0] is plan:
        return wait_upload(hit[1:])
    f = np.concatenate([plan.weight, plan.scale, plan.top_mag, plan.end_mag, plan.density]).astype(np.float32)
    i = np.concatenate([plan.top_idx, plan.end_idx, np.asarray(modes, dtype=np.int64)]).astype(np.int64)
    entry = upload_async((torch.from_numpy(f), torch.from_numpy(i)), device)
    if len(_params_cache) >= _MAX_CACHED_PLANS:
        _params_cache.pop(next(iter(_params_cache)))
    _params_cache[key] = (plan,) + entry
    return entry[:-1]


def _address_table(ptrs: tuple, device: torch.device):
    key = (str(device), ptrs)
    hit = _address_cache.get(key)
    if hit is None:
        hit = upload_async((torch.tensor(ptrs, dtype=torch.int64),), device)
        if len(_address_cache) >= _MAX_CACHED_TABLES:
            _address_cache.pop(next(iter(_address_cache)))
        _address_cache[key] = hit
        return hit[0]
    return wait_upload(hit)[0]


def elect_none_divisor(weight: np.ndarray) -> float:
    """sum_i weight[i] in fp32, in order, from 0; 1 where |sum| < 1e-8 (the oracle's elect-none div)."""
    div = np.float32(0.0)
    for w in np.asarray(weight, dtype=np.float32):
        div = np.float32(div + w)
    return 1.0 if abs(div) < np.float32(1e-8) else float(div)


def combine(inputs, base, out, plan: CombinePlan, offset: int = 0, probs=None) -> None:
    """The combine pass over one chunk; same contract as ``Backend.combine`` (backends/base.py).

    inputs, base, out and probs on one device (CUDA, or CPU under TRITON_INTERPRET=1).
    """
    fn = "triton.combine"
    if not isinstance(out, torch.Tensor) or out.dtype not in _FLOAT_DTYPES or not out.is_contiguous():
        raise MergeError(f"{fn}: out must be a contiguous float32/bfloat16/float16 tensor")
    _launch(fn, inputs, base, out, None, plan, offset, probs)


def transform(inputs, base, outs, plan: CombinePlan, offset: int = 0) -> None:
    """The transform pass over one chunk (``methods.transforms.transform_torch``, bitwise): the combine
    kernel stopped before the mix (SPLIT), outs[i] = b + ingredient i's kept, rescaled, weighted and
    (elect) agreeing task-vector entries, each a contiguous float32 tensor of C elements."""
    fn = "triton.transform"
    outs = check_transform_outs(fn, outs, getattr(plan, "n", -1))
    _launch(fn, inputs, base, None, outs, plan, offset, None)


def _launch(fn: str, inputs, base, out, outs, plan: CombinePlan, offset: int, probs) -> None:
    """One combine (out) or transform (outs) pass: checks, the oracle's head off a Philox counter,
    one kernel launch."""
    if not isinstance(plan, CombinePlan):
        raise MergeError(f"{fn}: plan must be a CombinePlan, got {type(plan).__name__}")
    inputs = list(inputs)
    if len(inputs) != plan.n or plan.n < 1:
        raise MergeError(f"{fn}: inputs has {len(inputs)} tensors but the plan is for N={plan.n} (N >= 1)")
    first = out if outs is None else outs[0]
    c, device = first.numel(), first.device
    table, codes, in_kind = pointer_table(fn, "inputs", inputs, c, device)
    if base is not None:
        check_inputs(fn, "base", [base], c, device)
    if outs is not None:
        check_inputs(fn, "outs", outs, c, device)
    offset = int(offset)
    if offset < 0 or offset + c >= 2 ** 63:
        raise MergeError(f"{fn}: offset must be in [0, 2^63 - C), got {offset}")
    probs = check_probs(fn, probs, plan.n, c, device)
    modes = tuple(
        _MODE_PROBS if probs is not None and probs[k] is not None
        else (_MODE_DENSITY if plan.density[k] < 1 else _MODE_NONE)
        for k in range(plan.n))
    if c == 0:
        return
    head = min(-offset % 4, c)
    if head:  # the kernel's blocks start on a Philox counter (4 elements each): the oracle takes the
        # first 1-3 elements (bitwise the kernel's result), the kernel the rest from a multiple of 4
        hb = None if base is None else base[:head]
        if outs is None:
            combine_torch([x[:head] for x in inputs], hb, out[:head], plan, offset,
                          None if probs is None else [None if p is None else p[:head] for p in probs])
        else:
            transform_torch([x[:head] for x in inputs], hb, [o[:head] for o in outs], plan, offset)
        if head == c:
            return
        inputs, offset, c = [x[head:] for x in inputs], offset + head, c - head
        out = None if out is None else out[head:]
        outs = None if outs is None else [o[head:] for o in outs]
        base = None if base is None else base[head:]
        probs = None if probs is None else [None if p is None else p[head:] for p in probs]
        table, codes, in_kind = pointer_table(fn, "inputs", inputs, c, device)
    fparams, iparams = _plan_params(plan, modes, device)
    has_probs = _MODE_PROBS in modes
    ptable = _address_table(tuple(0 if p is None else p.data_ptr() for p in probs), device) if has_probs else iparams
    otable = _address_table(tuple(o.data_ptr() for o in outs), device) if outs is not None else iparams
    aligned = (aligned16(inputs) and (not has_probs or aligned16([p for p in probs if p is not None]))
               and (outs is None or aligned16(outs)))
    seed = plan.seed
    dst = out if outs is None else outs[0]  # out_ptr is not written under SPLIT
    grid = lambda meta: (triton.cdiv(c, meta["BLOCK"]),)  # noqa: E731
    with on_device(device):
        _combine_kernel[grid](
            table, codes, base if base is not None else dst, dst, fparams, iparams, ptable, otable,
            c, plan.n, max(c, 1).bit_length(), offset, seed & MASK32, ((seed >> 32) ^ plan.name_key) & MASK32,
            elect_none_divisor(plan.weight), float(plan.lam),
            IN_KIND=in_kind, HAS_BASE=base is not None, HAS_PROBS=has_probs, RANDOM=any(modes),
            ELECT=int(plan.elect), NORMALIZE=bool(plan.normalize), INV_PROB=bool(plan.inv_prob),
            ALIGNED=aligned, SPLIT=outs is not None, enable_fp_fusion=FP_FUSION,
        )
