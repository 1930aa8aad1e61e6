"""The contract every backend implements.

Entry points (all on flat, contiguous buffers; the API layer and the engine do the
flattening, validation, scheduling and output placement, so a backend only computes):

- ``whole_run``: the whole AME schedule over one buffer (below).
- ``step``: one fused AME optimizer step with the state in buffers (stew, greedy).
- ``combine``: the elementwise pass of every other merge method (linear, task
  arithmetic, TIES, DARE, breadcrumbs, DELLA, SLERP, model stock) for one chunk, from a
  ``CombinePlan``; its arithmetic is defined in ``ame_kernels.methods.combine``.
- ``transform``: the same pass stopped before the mix, writing each ingredient's
  sparsified version x_i' = b + (kept, rescaled, elected tau_i) to its own fp32 buffer:
  a task-vector transform under AME (``ame_kernels.methods.transforms``).
- ``magnitude_bracket``, ``magnitude_histogram``, ``gram``, ``kept_l1``: the per-chunk
  statistics primitives those methods stream before their combine pass
  (``ame_kernels.methods.stats``), and ``della_probs`` (DELLA's per-row rank
  probabilities). The defaults here are plain torch (numpy for ``della_probs``) on any
  device; native backends may override them.
- Host-streaming and buffer variants that only some backends have, with the same
  arithmetic: ``whole_run_chunked`` (cuda, triton: host tensors streamed through the
  GPU with pinned double buffers) and, in ``backends.cpu``, ``whole_run_buffers`` /
  ``combine_buffers`` / ``*_buffers`` (numpy views of mapped files, no torch), which the
  checkpoint engine uses on the CPU.

The AME schedule arrives as a ``StepPlan`` (``ame_kernels.schedule``): no backend
re-derives t, batches, lr_t, zeta_t or bias corrections.

Arithmetic (normative, DESIGN section 1), per element, all in fp32:

    w_0 = pivot                      (soup: mean(0..N-1); k: inputs[k]; or a tensor)
    for t in 1..T:                   (row t-1 of plan.coeffs = gscale, lr_eff, decay, inv_bc2_sqrt)
        p   = w_{t-1} if adaptive_pivot else w_0
        g   = (p - mean(batch(t))) * zs_t
        if hyper.weight_decay: g += weight_decay * w          (coupled L2; 0 for adamw)
        sgd:      momentum == 0: w -= lr_eff * g
                  else buf = g if t == 1 else momentum*buf + (1-dampening)*g
                       w -= lr_eff * (g + momentum*buf if nesterov else buf)
        adagrad:  s += g*g;  w -= lr_eff * g / (sqrt(s) + eps)        [sqrt(s + eps) if eps_inside_sqrt]
        adam(w):  w *= decay (adamw);  m += (1-b1)(g-m);  v = b2 v + (1-b2) g^2
                  (amsgrad: vmax = max(vmax, v), used in place of v)
                  w -= lr_eff * m / (sqrt(v) * inv_bc2_sqrt + eps)     [sqrt(v*inv_bc2_sqrt^2 + eps)]
        adadelta: a = rho a + (1-rho) g^2;  d = sqrt(u + eps) / sqrt(a + eps) * g
                  u = rho u + (1-rho) d^2;  w -= lr_eff * d
    out = w_T rounded to out's dtype (round to nearest even)

Batch mean (DESIGN 1, Numerics). For indices b_1 < b_2 < ... < b_m (a step's members
sorted ascending, whatever order the schedule drew them in; m = |B_t|):

    mean(b) = (((x_b1 + x_b2) + x_b3) + ... + x_bm) / m    fp32 adds, left to right, then one
                                                           IEEE divide; m = 1: x_b1 itself
    zs_t    = fp32(fp64(gscale_t) * m)                     zeta_t / N from the float32 column,
                                                           rounded once (host or fp64 in-kernel)
    g       = (p - mean) * zs_t                            one fp32 subtract, one multiply

The soup is mean(0, 1, ..., N-1), the very same operation, so with the soup pivot and a
batch of every ingredient ``p - mean`` is exactly 0 in fp32, as in exact arithmetic, and
every optimizer leaves the soup where it is (0 / (0 + eps) = 0, Adadelta sqrt(eps/eps) * 0).
The step entry point sums its ``batch`` in the order given: callers pass it in ascending
ingredient index (``sorted(plan.batch(t))``). A backend may replace "/ m" by "* fp32(1/m)"
(the cpu kernels' FastMath), provided the soup and every batch mean use the same operation.
GD folded into one weighted sum (``schedule.linear_coefficients``) is exempt: it never forms g.

State slots (``Hyper.state_slots``), in this order: sgd [momentum_buffer];
adagrad [sum]; adam/adamw [exp_avg, exp_avg_sq, (max_exp_avg_sq)];
adadelta [square_avg, acc_delta]. Initial values: ``Hyper.initial_state()``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from ..errors import MergeError
from ..schedule import Hyper, StepPlan

#: dtypes a kernel must read and write.
FLOAT_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def check_flat(fn: str, arg: str, x, numel: int, device, dtypes=FLOAT_DTYPE_NAMES) -> str:
    """``x`` is a contiguous tensor of one of ``dtypes`` (names; default float32/bfloat16/float16)
    with ``numel`` elements on ``device``; returns its dtype name. Raises MergeError naming
    ``fn`` and ``arg`` otherwise."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise MergeError(f"{fn}: {arg} must be a tensor, got {type(x).__name__}")
    name = str(x.dtype).replace("torch.", "")
    if name not in dtypes:
        expected = " or ".join(dtypes) if len(dtypes) < 3 else ", ".join(dtypes[:-1]) + " or " + dtypes[-1]
        raise MergeError(f"{fn}: {arg} has dtype {x.dtype}; expected {expected}")
    if x.numel() != numel:
        raise MergeError(f"{fn}: {arg} has {x.numel()} elements, expected {numel}")
    if not x.is_contiguous():
        raise MergeError(f"{fn}: {arg} must be contiguous")
    if x.device != device:
        raise MergeError(f"{fn}: {arg} is on {x.device}, expected {device} (all tensors on one device)")
    return name

def check_probs(fn: str, probs, n: int, numel: int, device):
    """None, or ``probs`` as a list of N entries, each None or a float32 tensor of ``numel`` elements
    on ``device`` (the combine pass's per-element keep probabilities)."""
    if probs is None:
        return None
    probs = list(probs)
    if len(probs) != n:
        raise MergeError(f"{fn}: probs has {len(probs)} entries, expected N={n} (tensors or None)")
    for k, p in enumerate(probs):
        if p is not None:
            check_flat(fn, f"probs[{k}]", p, numel, device, dtypes=("float32",))
    return probs


def check_transform_outs(fn: str, outs, n: int) -> list:
    """The transform pass's outputs as a list: N contiguous float32 tensors (their size and device
    are checked with the inputs')."""
    import torch

    outs = list(outs)
    if len(outs) != n or not outs:
        raise MergeError(f"{fn}: outs has {len(outs)} tensors but the plan is for N={n}")
    for k, o in enumerate(outs):
        if not isinstance(o, torch.Tensor) or o.dtype != torch.float32 or not o.is_contiguous():
            raise MergeError(f"{fn}: outs[{k}] must be a contiguous float32 tensor")
    return outs


def hyper_kwargs(hyper) -> dict:
    """A ``schedule.Hyper`` as the native bindings' keyword arguments (``_C`` and ``_C_cuda``
    take the same names): the optimizer code name, floats and bools."""
    return dict(
        optimizer=hyper.optimizer,
        momentum=float(hyper.momentum),
        dampening=float(hyper.dampening),
        nesterov=bool(hyper.nesterov),
        weight_decay=float(hyper.weight_decay),
        beta1=float(hyper.beta1),
        beta2=float(hyper.beta2),
        eps=float(hyper.eps),
        rho=float(hyper.rho),
        amsgrad=bool(hyper.amsgrad),
        eps_inside_sqrt=bool(hyper.eps_inside_sqrt),
        initial_accumulator_value=float(hyper.initial_accumulator_value),
    )


def plan_kwargs(plan) -> dict:
    """A ``StepPlan``'s per-step host arrays (int32 batch_ptr / batch_idx, float32 coeffs) and
    its hyperparameters, as the native bindings' keyword arguments (which check them). The
    batch members come sorted ascending within each step (``StepPlan.summation_idx``): the
    batch mean's summation order."""
    import numpy as np

    return dict(
        batch_ptr=np.ascontiguousarray(plan.batch_ptr, dtype=np.int32),
        batch_idx=np.ascontiguousarray(plan.summation_idx(), dtype=np.int32),
        coeffs=np.ascontiguousarray(plan.coeffs, dtype=np.float32),
        **hyper_kwargs(plan.hyper),
    )


def check_plan_inputs(fn: str, plan, inputs) -> list:
    """``plan`` is a StepPlan for exactly ``len(inputs)`` ingredients; returns ``list(inputs)``."""
    from ..schedule import StepPlan

    if not isinstance(plan, StepPlan):
        raise MergeError(f"{fn}: plan must be a StepPlan, got {type(plan).__name__}")
    inputs = list(inputs)
    if len(inputs) != plan.n:
        raise MergeError(f"{fn}: inputs has {len(inputs)} tensors but the plan is for N={plan.n}")
    return inputs


def check_step_row(fn: str, coeffs, t) -> "np.ndarray":
    """The step kernels' scalars: one ``StepPlan.coeffs`` row (float64 [4]) and a step ``t >= 1``."""
    row = np.asarray(coeffs, dtype=np.float64).reshape(-1)
    if row.shape != (4,):
        raise MergeError(f"{fn}: coeffs must be one row of 4 values (gscale, lr_eff, decay, inv_bc2_sqrt), "
                         f"got shape {np.shape(coeffs)}")
    if int(t) < 1:
        raise MergeError(f"{fn}: t counts from 1, got {t}")
    return row


Pivot = Union[None, int, "torch.Tensor"]  # noqa: F821  (None = soup)


class Backend:
    """One way to compute; subclasses override ``whole_run`` and ``step``."""

    name = "base"

    def available(self) -> tuple:
        """(True, '') when usable here, else (False, reason)."""
        return True, ""

    def supports_device(self, device_type: str) -> bool:
        """Whether tensors on ``device_type`` ('cpu', 'cuda', ...) can be given directly."""
        raise NotImplementedError

    def whole_run(
        self,
        inputs: Sequence["torch.Tensor"],  # noqa: F821
        plan: StepPlan,
        pivot: Pivot,
        adaptive_pivot: bool,
        out: "torch.Tensor",  # noqa: F821
        threads: Optional[int] = None,
        check_finite: bool = False,
    ) -> list:
        """Run the whole schedule over one flat buffer.

        inputs: N contiguous 1-D tensors of one numel C on one device, each float32,
            bfloat16 or float16 (they may differ). Read only.
        pivot: None (soup), an index into ``inputs``, or a 1-D tensor of numel C.
        out: contiguous 1-D tensor of numel C (float32/bfloat16/float16), written once.
        check_finite: also report non-finite input values met while reading.
        Returns the sorted indices of the inputs that held a NaN or Inf (always [] when
        ``check_finite`` is False); the caller decides whether that is an error.
        """
        raise NotImplementedError

    def step(
        self,
        w: "torch.Tensor",  # noqa: F821
        state: "torch.Tensor",  # noqa: F821
        batch: Sequence["torch.Tensor"],  # noqa: F821
        pivot: Optional["torch.Tensor"],  # noqa: F821
        coeffs: np.ndarray,
        t: int,
        hyper: Hyper,
        threads: Optional[int] = None,
    ) -> None:
        """One fused optimizer step, in place.

        w: fp32 [C] (read-modify-write); state: fp32 [hyper.state_slots, C] (read-modify-write);
        batch: M >= 1 tensors of numel C (any float dtype); pivot: fp32 [C] or None
        (adaptive: p = w); coeffs: float32 [4] row for global step ``t`` (1-based).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ merge methods

    def combine(self, inputs, base, out, plan, offset: int = 0, probs=None, threads: Optional[int] = None) -> None:
        """The combine pass over one chunk (``ame_kernels.methods.combine``), writing ``out``.

        inputs: N contiguous 1-D tensors of numel C (float32/bfloat16/float16, may differ);
        base: None (zero) or such a tensor; out: C elements of float32/bfloat16/float16;
        plan: a ``CombinePlan`` for N ingredients; offset: the chunk's first element index in
        the flattened tensor (random masks and rank windows use global indices);
        probs: None or N float32 tensors (or None entries) of per-element keep probabilities.
        """
        from ..methods.combine import combine_torch

        combine_torch(inputs, base, out, plan, offset, probs)

    def transform(self, inputs, base, outs, plan, offset: int = 0, threads: Optional[int] = None) -> Optional[int]:
        """The transform pass over one chunk (``ame_kernels.methods.transforms.transform_torch``):
        outs[i] (float32, numel C) = b + ingredient i's kept, rescaled and (elect) agreeing task-vector
        entries under ``plan`` (unit weights). The count of Inf/NaN written where the backend counts
        them, else None."""
        from ..methods.transforms import transform_torch

        transform_torch(inputs, base, outs, plan, offset)
        return None

    def magnitude_histogram(self, x, base, prefix_mask: int, prefix: int, shift: int, nbins: int):
        """int64[nbins] counts of the fp32 bits of |x - b| (``methods.stats``)."""
        from ..methods.stats import magnitude_histogram_torch

        return magnitude_histogram_torch(x, base, prefix_mask, prefix, shift, nbins)

    def magnitude_bracket(self, inputs, base, which, lo, hi, cap: int, shift=None):
        """Per target t: counts of |x - b|'s fp32 bits above / inside [lo[t], hi[t]] / non-finite
        for input which[t], the entries inside, and a binned target's counts per task and bin
        (``methods.stats.magnitude_bracket_torch``)."""
        from ..methods.stats import magnitude_bracket_torch

        return magnitude_bracket_torch(inputs, base, which, lo, hi, cap, shift)

    def gram(self, inputs, base):
        """float64[N, N] of sum_j tau_i[j] tau_k[j], tau = x - b."""
        from ..methods.stats import gram_torch

        return gram_torch(inputs, base)

    def kept_l1(self, inputs, base, plan, offset: int = 0, probs=None):
        """float64[N, 2]: (sum |tau_i|, sum over kept entries |tau_i|) under ``plan``'s masks."""
        from ..methods.stats import kept_l1_torch

        return kept_l1_torch(inputs, base, plan, offset, probs)

    def della_probs(self, x, base, shape: tuple, density: float, epsilon: float, threads: Optional[int] = None):
        """float32 [C] on x's device: DELLA's keep probabilities of a chunk of whole rows of a
        tensor of ``shape`` (``methods.task_vectors.della_probs``, bitwise): numpy on the host for
        host tensors, torch's sort on the device for the others (no round trip through the host)."""
        import torch

        from ..methods.stats import magnitudes_torch
        from ..methods.task_vectors import della_probs, della_probs_torch

        if x.device.type != "cpu":
            return della_probs_torch(magnitudes_torch(x, base, device=True), tuple(shape), density, epsilon).contiguous()
        return torch.from_numpy(della_probs(magnitudes_torch(x, base), tuple(shape), density, epsilon))

