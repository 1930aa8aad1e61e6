"""One ``@triton.jit`` helper per optimizer update, shared by ``whole_run`` and ``step``.

Every rule works on one block of elements in fp32 registers and returns the new
``(w, s0, s1, s2)``: the parameter and up to three state slots, in the slot order
of ``ame_kernels.backends.base`` (unused slots pass through untouched). The
per-step scalars come from ``StepPlan.coeffs`` (``lr_eff``, ``decay``,
``inv_bc2_sqrt``); the complements ``1 - beta`` etc. are computed on the host in
float64 and arrive as fp32 arguments, as torch.optim passes them (computing
``1 - beta2`` in fp32 would be off by ~1e-5 relative).

Square roots and divisions are the IEEE ones (``sqrt_rn``, ``div_rn``): Triton's
default ``sqrt``/``/`` are approximate on NVIDIA GPUs and would drift from torch.

``update`` dispatches on the constexpr optimizer code (``schedule.OPTIMIZER_CODES``),
so each compiled kernel holds exactly one rule.
"""

import triton
import triton.language as tl

SGD = tl.constexpr(0)
ADAGRAD = tl.constexpr(1)
ADAM = tl.constexpr(2)
ADAMW = tl.constexpr(3)
ADADELTA = tl.constexpr(4)


@triton.jit
def sgd(w, g, buf, first, lr_eff, momentum, one_minus_dampening, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    """GD, torch.optim.SGD; the paper's eq. 4/5 with momentum optional.

    momentum == 0: w -= lr * g
    else:          buf = g (t == 1) | momentum * buf + (1 - dampening) * g
                   w -= lr * (g + momentum * buf  if nesterov else  buf)
    """
    if MOMENTUM:
        buf = tl.where(first, g, momentum * buf + one_minus_dampening * g)
        if NESTEROV:
            w = w - lr_eff * (g + momentum * buf)
        else:
            w = w - lr_eff * buf
    else:
        w = w - lr_eff * g
    return w, buf


@triton.jit
def adagrad(w, g, s, lr_eff, eps, EPS_INSIDE_SQRT: tl.constexpr):
    """torch.optim.Adagrad (lr_eff = lr / (1 + (t-1) lr_decay)); paper Prop. 1.

    s += g^2;  w -= lr_eff * g / (sqrt(s) + eps)      [sqrt(s + eps) with EPS_INSIDE_SQRT]
    """
    s = s + g * g
    if EPS_INSIDE_SQRT:
        denom = tl.sqrt_rn(s + eps)
    else:
        denom = tl.sqrt_rn(s) + eps
    w = w - lr_eff * tl.div_rn(g, denom)
    return w, s


@triton.jit
def adam(w, g, m, v, vmax, lr_eff, decay, inv_bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
         DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, EPS_INSIDE_SQRT: tl.constexpr):
    """torch.optim.Adam / AdamW (DECOUPLED: w *= 1 - lr wd first); lr_eff = lr / (1 - beta1^t).

    m += (1 - b1)(g - m);  v = b2 v + (1 - b2) g^2;  (amsgrad: vmax = max(vmax, v), used for v)
    w -= lr_eff * m / (sqrt(v) * inv_bc2_sqrt + eps)   [sqrt(v * inv_bc2_sqrt^2 + eps)]
    """
    if DECOUPLED:
        w = w * decay
    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + one_minus_beta2 * (g * g)
    if AMSGRAD:
        vmax = tl.maximum(vmax, v)
        vv = vmax
    else:
        vv = v
    if EPS_INSIDE_SQRT:
        denom = tl.sqrt_rn(vv * (inv_bc2_sqrt * inv_bc2_sqrt) + eps)
    else:
        denom = tl.sqrt_rn(vv) * inv_bc2_sqrt + eps
    w = w - lr_eff * tl.div_rn(m, denom)
    return w, m, v, vmax


@triton.jit
def adadelta(w, g, a, u, lr_eff, rho, one_minus_rho, eps):
    """torch.optim.Adadelta.

    a = rho a + (1 - rho) g^2;  d = sqrt(u + eps) / sqrt(a + eps) * g
    u = rho u + (1 - rho) d^2;  w -= lr * d
    """
    a = rho * a + one_minus_rho * (g * g)
    d = tl.div_rn(tl.sqrt_rn(u + eps), tl.sqrt_rn(a + eps)) * g
    u = rho * u + one_minus_rho * (d * d)
    w = w - lr_eff * d
    return w, a, u


@triton.jit
def update(w, g, s0, s1, s2, first, lr_eff, decay, inv_bc2_sqrt,
           h_momentum, h_one_minus_dampening, h_beta1c, h_beta2, h_beta2c, h_rho, h_rhoc, h_eps,
           OPT: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, AMSGRAD: tl.constexpr,
           EPS_INSIDE_SQRT: tl.constexpr):
    """Apply the rule selected by OPT; returns (w, s0, s1, s2)."""
    if OPT == SGD:
        w, s0 = sgd(w, g, s0, first, lr_eff, h_momentum, h_one_minus_dampening, MOMENTUM, NESTEROV)
    elif OPT == ADAGRAD:
        w, s0 = adagrad(w, g, s0, lr_eff, h_eps, EPS_INSIDE_SQRT)
    elif OPT == ADADELTA:
        w, s0, s1 = adadelta(w, g, s0, s1, lr_eff, h_rho, h_rhoc, h_eps)
    else:
        w, s0, s1, s2 = adam(w, g, s0, s1, s2, lr_eff, decay, inv_bc2_sqrt, h_beta1c, h_beta2, h_beta2c, h_eps,
                             OPT == ADAMW, AMSGRAD, EPS_INSIDE_SQRT)
    return w, s0, s1, s2


@triton.jit
def _at(addr, dtype: tl.constexpr, offs, ALIGNED: tl.constexpr):
    """``addr`` (an int64 from the table) as a ``dtype`` pointer, plus ``offs``.

    A pointer read from memory carries no alignment the compiler can see, so its loads
    would be scalar (one ld.global.b16 per bf16 element). ALIGNED (every table entry is
    16-byte aligned, checked on the host) lets them be 16-byte vector loads.
    """
    p = addr.to(tl.pointer_type(dtype)) + offs
    if ALIGNED:
        p = tl.multiple_of(p, 16)  # bytes: each contiguous run of offs starts 16-byte aligned
    return p


@triton.jit
def load_as_f32(table, codes, i, offs, mask, IN_KIND: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Ingredient ``i`` at ``offs`` as fp32, read in its own dtype through the pointer table.

    ``table`` holds each input's data_ptr as int64; IN_KIND 0/1/2 = all fp32/bf16/fp16,
    3 = mixed (``codes[i]`` picks the dtype at run time). ALIGNED: see ``_at``.
    """
    addr = tl.load(table + i)
    if IN_KIND == 0:
        x = tl.load(_at(addr, tl.float32, offs, ALIGNED), mask=mask, other=0.0)
    elif IN_KIND == 1:
        x = tl.load(_at(addr, tl.bfloat16, offs, ALIGNED), mask=mask, other=0.0).to(tl.float32)
    elif IN_KIND == 2:
        x = tl.load(_at(addr, tl.float16, offs, ALIGNED), mask=mask, other=0.0).to(tl.float32)
    else:
        code = tl.load(codes + i)
        if code == 0:
            x = tl.load(_at(addr, tl.float32, offs, ALIGNED), mask=mask, other=0.0)
        elif code == 1:
            x = tl.load(_at(addr, tl.bfloat16, offs, ALIGNED), mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(_at(addr, tl.float16, offs, ALIGNED), mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def flag_nonfinite(x, mask, flag_ptr):
    """Set ``*flag_ptr`` to 1 if any unmasked element of ``x`` is NaN or +-Inf (one atomic per block)."""
    bad = tl.max(tl.where(mask & ((tl.abs(x) == float("inf")) | (x != x)), 1, 0), axis=0)
    tl.atomic_max(flag_ptr, bad)


@triton.jit
def store_rounded(ptr, offs, x, mask):
    """Store fp32 ``x`` in ``ptr``'s dtype, rounding to nearest even.

    bf16 is rounded by hand: compiled Triton's fp32->bf16 is RTNE already, but the
    interpreter truncates, and the CPU tests must see the GPU's rounding.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        # NaN: keep the sign and top payload, force a quiet NaN (rounding could carry it to inf).
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        tl.store(ptr + offs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)
