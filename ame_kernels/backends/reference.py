"""The reference backend: plain PyTorch on any device, stepping ``torch.optim``.

It is the oracle every kernel is tested against, so clarity beats speed: an
fp32 copy of w, one ``torch.optim.<Optimizer>([w])``, and per step
``w.grad = g_t; group['lr'] = lr_t; opt.step()``. torch.optim derives its own
bias corrections, Adagrad lr decay and SGD first-step momentum from its own step
count, so only the batches, lr_t and zeta_t / N of the StepPlan are used here,
the last taken as the kernels take it, from the coefficient table's float32
gscale column (``zeta_over_n``), so that the pseudogradient is the same fp32 number
on every backend (``base.py``, "Batch mean"); the other columns are the kernels' business.

The one thing torch.optim cannot do is the paper's printed eps-inside-sqrt
variant of Adam/AdamW/Adagrad; for that option this file writes the update by
hand, following torch's code line by line with only the eps placement moved.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..schedule import Hyper, StepPlan
from ..errors import MergeError
from .base import Backend, Pivot, check_flat, check_plan_inputs, check_step_row


def _make_optimizer(w: torch.Tensor, hyper: Hyper) -> torch.optim.Optimizer:
    common = dict(lr=1.0, foreach=False)
    if hyper.optimizer == "sgd":
        return torch.optim.SGD(
            [w], momentum=hyper.momentum, dampening=hyper.dampening, nesterov=hyper.nesterov,
            weight_decay=hyper.weight_decay, **common,
        )
    if hyper.optimizer == "adagrad":
        # lr_decay is applied by the plan's lr_eff for kernels; torch applies it itself here.
        return torch.optim.Adagrad(
            [w], lr_decay=hyper.lr_decay, weight_decay=hyper.weight_decay,
            initial_accumulator_value=hyper.initial_accumulator_value, eps=hyper.eps, **common,
        )
    if hyper.optimizer in ("adam", "adamw"):
        cls = torch.optim.AdamW if hyper.optimizer == "adamw" else torch.optim.Adam
        return cls(
            [w], betas=(hyper.beta1, hyper.beta2), eps=hyper.eps, amsgrad=hyper.amsgrad,
            weight_decay=hyper.adamw_weight_decay if hyper.optimizer == "adamw" else hyper.weight_decay,
            **common,
        )
    if hyper.optimizer == "adadelta":
        return torch.optim.Adadelta([w], rho=hyper.rho, eps=hyper.eps, weight_decay=hyper.weight_decay, **common)
    raise ValueError(f"[reference] unknown optimizer {hyper.optimizer!r}")


class _ManualEpsInside:
    """Adam/AdamW/Adagrad with eps inside the square root (the paper's printed form)."""

    def __init__(self, w: torch.Tensor, hyper: Hyper, state: Optional[list] = None):
        self.w, self.h = w, hyper
        self.t = 0
        self.slots = state if state is not None else [
            torch.full_like(w, v) for v in hyper.initial_state()
        ]

    def step(self, g: torch.Tensor, lr: float) -> None:
        h, w = self.h, self.w
        self.t += 1
        t = self.t
        if h.optimizer == "adagrad":
            if h.weight_decay:
                g = g.add(w, alpha=h.weight_decay)
            clr = lr / (1 + (t - 1) * h.lr_decay)
            s = self.slots[0]
            s.addcmul_(g, g, value=1)
            w.addcdiv_(g, s.add(h.eps).sqrt(), value=-clr)
            return
        if h.optimizer == "adamw":
            w.mul_(1 - lr * h.adamw_weight_decay)
        elif h.weight_decay:
            g = g.add(w, alpha=h.weight_decay)
        m, v = self.slots[0], self.slots[1]
        m.lerp_(g, 1 - h.beta1)
        v.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
        if h.amsgrad:
            torch.maximum(self.slots[2], v, out=self.slots[2])
            v = self.slots[2]
        bc1 = 1 - h.beta1**t
        bc2 = 1 - h.beta2**t
        w.addcdiv_(m, (v / bc2).add(h.eps).sqrt(), value=-lr / bc1)


def _uses_manual(hyper: Hyper) -> bool:
    return hyper.eps_inside_sqrt and hyper.optimizer in ("adam", "adamw", "adagrad")


def batch_mean(batch: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The mean of ``batch`` as every backend forms it (base.py, "Batch mean"): the tensors
    summed in ``dtype`` in the order given, left to right, then one division by their count
    (none for one tensor). In ascending ingredient index this is also the soup's mean, so
    the soup pivot minus the mean of a batch of every ingredient is exactly zero."""
    total = batch[0].to(dtype).clone()
    for x in batch[1:]:
        total += x.to(dtype)
    return total / len(batch) if len(batch) > 1 else total


def zeta_over_n(gscale: float, m: int) -> float:
    """zeta_t / N as the kernels derive it from the plan's float32 gscale_t = zeta_t / (N |B_t|):
    fp32(fp64(gscale_t) * |B_t|), one rounding (base.py, "Batch mean")."""
    import numpy as np

    return float(np.float32(float(np.float32(gscale)) * m))


def _pseudogradient(p: torch.Tensor, batch: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """g = scale * (p - mean of the batch) in p's dtype (DESIGN 1, Numerics); scale = zeta_t / N
    (``zeta_over_n`` in fp32; the float64 oracle passes zeta_t / N itself). The batch in
    ascending ingredient index."""
    return (p - batch_mean(batch, p.dtype)) * scale


class ReferenceBackend(Backend):
    name = "reference"

    def supports_device(self, device_type: str) -> bool:
        return True

    def whole_run(self, inputs, plan: StepPlan, pivot: Pivot, adaptive_pivot: bool, out, threads=None, check_finite=False):
        pivot = _check_whole_run(plan, inputs, pivot, out)
        bad = sorted(i for i, x in enumerate(inputs) if check_finite and not torch.isfinite(x).all())
        if pivot is None:
            w0 = batch_mean(inputs)  # ascending index, / N: the full batch's mean to the bit
        elif isinstance(pivot, int):
            w0 = inputs[pivot].float().clone()
        else:
            w0 = pivot.float().clone()
        w = w0.clone()
        hyper = plan.hyper
        opt = _ManualEpsInside(w, hyper) if _uses_manual(hyper) else _make_optimizer(w, hyper)
        for t in range(1, plan.steps + 1):
            p = w if adaptive_pivot else w0
            members = sorted(plan.batch(t))
            g = _pseudogradient(p, [inputs[i] for i in members], zeta_over_n(plan.coeffs[t - 1, 0], len(members)))
            lr = float(plan.lr[t - 1])
            if isinstance(opt, _ManualEpsInside):
                opt.step(g, lr)
            else:
                w.grad = g
                opt.param_groups[0]["lr"] = lr
                opt.step()
        out.copy_(w)
        return bad

    def step(self, w, state, batch, pivot, coeffs, t, hyper: Hyper, threads=None):
        """One torch.optim step whose state is loaded from / stored back to ``state``.

        lr_t and the pseudogradient scale are taken from ``coeffs`` (gscale, and lr
        recovered from lr_eff by undoing what schedule._coeffs applied).
        """
        _check_step(w, state, batch, pivot, hyper)
        row = check_step_row("[reference] step", coeffs, t)
        gscale, lr_eff = float(row[0]), float(row[1])
        lr = _lr_from_eff(lr_eff, t, hyper)
        p = w if pivot is None else pivot
        batch = list(batch)
        # the kernels' fp32 zeta_t / N; the float64 oracle mode keeps gscale * m unrounded
        scale = zeta_over_n(gscale, len(batch)) if w.dtype == torch.float32 else gscale * len(batch)
        g = _pseudogradient(p, batch, scale)
        slots = [state[k] for k in range(hyper.state_slots)]
        if _uses_manual(hyper):
            opt = _ManualEpsInside(w, hyper, slots)
            opt.t = t - 1
            opt.step(g, lr)
            return
        opt = _make_optimizer(w, hyper)
        st = _torch_state(hyper, slots, t - 1, w)
        if st:
            opt.state[w] = st
        w.grad = g
        opt.param_groups[0]["lr"] = lr
        opt.step()
        _store_state(hyper, opt.state[w], slots)
        w.grad = None


def _check_whole_run(plan, inputs, pivot, out):
    """The base-class contract of whole_run, checked as the kernel backends check it; returns the
    pivot as None, a plain int index, or a tensor."""
    fn = "[reference] whole_run"
    inputs = check_plan_inputs(fn, plan, inputs)
    if not isinstance(out, torch.Tensor):
        raise MergeError(f"{fn}: out must be a tensor, got {type(out).__name__}")
    numel, device = out.numel(), out.device
    check_flat(fn, "out", out, numel, device)
    if isinstance(inputs[0], torch.Tensor) and inputs[0].numel() != numel:
        raise MergeError(f"{fn}: out has {numel} elements but inputs[0] has {inputs[0].numel()} (they must match)")
    for k, x in enumerate(inputs):
        check_flat(fn, f"inputs[{k}]", x, numel, device)
    if pivot is None or isinstance(pivot, torch.Tensor):
        if pivot is not None:
            check_flat(fn, "pivot", pivot, numel, device)
        return pivot
    if isinstance(pivot, bool) or not hasattr(pivot, "__index__"):
        raise MergeError(f"{fn}: pivot must be None (soup), an ingredient index or a tensor, got {type(pivot).__name__}")
    if not 0 <= int(pivot) < plan.n:
        raise MergeError(f"{fn}: pivot index {int(pivot)} is not in [0, {plan.n})")
    return int(pivot)


def _check_step(w, state, batch, pivot, hyper: Hyper) -> None:
    """The base-class contract of step, as the kernels check it, except that the oracle also steps
    in float64 (w, state and pivot all float64: the exact answer tests compare fp32 errors with)."""
    fn = "[reference] step"
    if not isinstance(w, torch.Tensor):
        raise MergeError(f"{fn}: w must be a tensor, got {type(w).__name__}")
    c, device, wd = w.numel(), w.device, w.dtype
    if wd not in (torch.float32, torch.float64):
        raise MergeError(f"{fn}: w must be float32 (or float64, the oracle's exact mode), got {wd}")

    def check(arg, x, numel, dtypes):
        check_flat(fn, arg, x, numel, device, dtypes=tuple(str(d).replace("torch.", "") for d in dtypes))

    check("w", w, c, (wd,))
    slots = hyper.state_slots
    if slots:
        check("state", state, slots * c, (wd,))
        if tuple(state.shape) != (slots, c):
            raise MergeError(f"{fn}: state must have shape [{slots}, {c}], got {tuple(state.shape)}")
    batch = list(batch)
    if not batch:
        raise MergeError(f"{fn}: batch must hold at least one tensor")
    for k, x in enumerate(batch):
        check(f"batch[{k}]", x, c, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    if pivot is not None:
        check("pivot", pivot, c, (wd,))


def _lr_from_eff(lr_eff: float, t: int, hyper: Hyper) -> float:
    if hyper.optimizer == "adagrad":
        return lr_eff * (1 + (t - 1) * hyper.lr_decay)
    if hyper.optimizer in ("adam", "adamw"):
        return lr_eff * (1 - hyper.beta1**t)
    return lr_eff


def _torch_state(hyper: Hyper, slots: list, steps_done: int, w: torch.Tensor) -> dict:
    """torch.optim state dict for one parameter, built from our slot buffers."""
    step = torch.tensor(float(steps_done))
    if hyper.optimizer == "sgd":
        return {"momentum_buffer": slots[0].clone() if slots and steps_done > 0 else None}
    if hyper.optimizer == "adagrad":
        return {"step": step, "sum": slots[0].clone()}
    if hyper.optimizer in ("adam", "adamw"):
        st = {"step": step, "exp_avg": slots[0].clone(), "exp_avg_sq": slots[1].clone()}
        if hyper.amsgrad:
            st["max_exp_avg_sq"] = slots[2].clone()
        return st
    return {"step": step, "square_avg": slots[0].clone(), "acc_delta": slots[1].clone()}


def _store_state(hyper: Hyper, st: dict, slots: list) -> None:
    names = {
        "sgd": ["momentum_buffer"],
        "adagrad": ["sum"],
        "adam": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        "adamw": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        "adadelta": ["square_avg", "acc_delta"],
    }[hyper.optimizer]
    for k, slot in enumerate(slots):
        slot.copy_(st[names[k]])


__all__ = ["ReferenceBackend"]
