"""The cpu backend's step kernel: parity with the reference backend's step (torch.optim
with its state loaded from our slots), equality with the whole-run kernel when driven
step by step, per SIMD level, and the step binding's argument checks."""

import numpy as np
import pytest
import torch

import ame_kernels
from ame_kernels.backends import available
from ame_kernels.config import AMEConfig
from ame_kernels.errors import MergeError
from ame_kernels.schedule import schedule
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not available()["cpu"][0], reason=f"cpu backend: {available()['cpu'][1]}")

if available()["cpu"][0]:
    from ame_kernels.backends.cpu import CpuBackend
    from ame_kernels.backends.reference import ReferenceBackend

    LEVELS = ame_kernels.build_info()["simd_supported"]
else:
    LEVELS = ["scalar"]

VARIANTS = {
    "gd": dict(optimizer="sgd"),
    "sgd_momentum": dict(optimizer="sgd", momentum=0.9, dampening=0.1, lr=0.5),
    "sgd_nesterov_wd": dict(optimizer="sgd", momentum=0.8, nesterov=True, weight_decay=0.05, lr=0.5),
    "adagrad_decay": dict(optimizer="adagrad", lr=0.1, lr_decay=0.1, initial_accumulator_value=0.2),
    "adagrad_inside": dict(optimizer="adagrad", lr=0.1, eps_inside_sqrt=True, eps=1e-6),
    "adam": dict(optimizer="adam", lr=0.01),
    "adam_amsgrad_wd": dict(optimizer="adam", lr=0.01, amsgrad=True, weight_decay=0.1),
    "adamw": dict(optimizer="adamw", lr=0.01, weight_decay=0.1),
    "adamw_inside": dict(optimizer="adamw", lr=0.01, weight_decay=0.1, eps_inside_sqrt=True, eps=1e-6),
    "adadelta_wd": dict(optimizer="adadelta", weight_decay=0.01),
}


def _inputs(n, c, dtypes=(torch.float32,)):
    return [(torch.randn(c) + 0.3 * i).to(dtypes[i % len(dtypes)]) for i in range(n)]


def _initial_state(hyper, c):
    if not hyper.state_slots:
        return torch.empty(0, c)
    return torch.tensor(hyper.initial_state(), dtype=torch.float32).reshape(-1, 1).repeat(1, c).contiguous()


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_by_step_equals_whole_run(variant, adaptive, simd, exact):
    """The same rules, the same fp32 operations: bit for bit the stepped whole-run result
    (fold=False: GD's folded weighted sum rounds differently; tests/test_linear_fold.py)
    with exact=True and wherever both kernels run the exact instructions; the whole-run
    kernel's estimates (AVX-512, and AVX2's register forms) agree within tolerance."""
    n, c = 5, 4099
    xs = _inputs(n, c, (torch.bfloat16, torch.float32, torch.float16))
    plan = schedule(AMEConfig(**VARIANTS[variant], epochs=2, batch_size=2, shuffle=True), n)
    pivot = torch.randn(c)
    be = CpuBackend(simd=simd, fold=False, exact=exact)
    whole = torch.empty(c)
    be.whole_run(xs, plan, pivot, adaptive, whole, threads=2)

    w = pivot.clone()
    state = _initial_state(plan.hyper, c)
    for t in range(1, plan.steps + 1):
        # the whole-run kernel sums each batch in ascending ingredient index (its mean is then
        # the soup's when the batch holds every ingredient); the step kernel in the order given
        batch = [xs[i] for i in sorted(plan.batch(t))]
        be.step(w, state, batch, None if adaptive else pivot, plan.coeffs[t - 1], t, plan.hyper, threads=2)
    if exact or simd == "scalar" or VARIANTS[variant]["optimizer"] == "sgd":
        assert torch.equal(w, whole), f"{variant}: max |diff| {(w - whole).abs().max().item():g}"
    else:  # the whole-run kernel's estimates (AVX-512, AVX2 register forms); the step kernel is exact
        assert_close(w, whole, what=variant)


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("size", [1, 7, 33, 40009])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_parity_with_reference(variant, size, simd):
    """w and every state slot after each step, against torch.optim (the reference step)."""
    n = 3
    xs = _inputs(n, size, (torch.float32, torch.bfloat16))
    plan = schedule(AMEConfig(**VARIANTS[variant], batch_size=2, epochs=2), n)
    hyper = plan.hyper
    w_ref = torch.randn(size)
    w_cpu = w_ref.clone()
    s_ref = _initial_state(hyper, size)
    s_cpu = s_ref.clone()
    for t in range(1, plan.steps + 1):
        batch = [xs[i] for i in plan.batch(t)]
        ReferenceBackend().step(w_ref, s_ref, batch, None, plan.coeffs[t - 1], t, hyper)
        CpuBackend(simd=simd).step(w_cpu, s_cpu, batch, None, plan.coeffs[t - 1], t, hyper, threads=2)
        assert_close(w_cpu, w_ref, what=f"{variant} w after step {t}")
        for k in range(hyper.state_slots):
            assert_close(s_cpu[k], s_ref[k], what=f"{variant} state[{k}] after step {t}")


def test_step_with_fixed_pivot_matches_reference():
    n, c = 4, 1000
    xs = _inputs(n, c)
    plan = schedule(AMEConfig(optimizer="adam", lr=0.01), n)
    pivot = torch.randn(c)
    w_ref, w_cpu = pivot.clone(), pivot.clone()
    s_ref, s_cpu = torch.zeros(2, c), torch.zeros(2, c)
    for t in range(1, plan.steps + 1):
        batch = [xs[i] for i in plan.batch(t)]
        ReferenceBackend().step(w_ref, s_ref, batch, pivot, plan.coeffs[t - 1], t, plan.hyper)
        CpuBackend().step(w_cpu, s_cpu, batch, pivot, plan.coeffs[t - 1], t, plan.hyper)
    assert_close(w_cpu, w_ref, what="fixed pivot")


def test_step_errors():
    be = CpuBackend()
    plan = schedule(AMEConfig(optimizer="adam"), 2)
    h, c = plan.hyper, plan.coeffs[0]
    w, x = torch.zeros(10), torch.zeros(10)
    with pytest.raises(MergeError, match=r"\[step\] w: must be float32"):
        be.step(torch.zeros(10, dtype=torch.bfloat16), torch.zeros(2, 10), [x], None, c, 1, h)
    with pytest.raises(MergeError, match=r"\[step\] state: expected 20 elements"):
        be.step(w, torch.zeros(1, 10), [x], None, c, 1, h)
    with pytest.raises(MergeError, match=r"\[step\] batch: need at least 1 input"):
        be.step(w, torch.zeros(2, 10), [], None, c, 1, h)
    with pytest.raises(MergeError, match=r"\[step\] batch\[0\]: expected 10 elements, got 5"):
        be.step(w, torch.zeros(2, 10), [torch.zeros(5)], None, c, 1, h)
    with pytest.raises(MergeError, match=r"\[step\] pivot: must be float32"):
        be.step(w, torch.zeros(2, 10), [x], x.half(), c, 1, h)
    with pytest.raises(ValueError, match=r"\[step\] t: steps count from 1, got 0"):
        be.step(w, torch.zeros(2, 10), [x], None, c, 0, h)
    with pytest.raises(ValueError, match=r"\[step\] coeffs: expected 4 values"):
        be.step(w, torch.zeros(2, 10), [x], None, np.ones(3, np.float32), 1, h)

    from ame_kernels._native import load
    from ame_kernels.backends.base import hyper_kwargs

    step = load("_C").step
    common = dict(w=w.data_ptr(), numel=10, batch=[x.data_ptr()], batch_dtypes=["float32"], pivot=0,
                  coeffs=np.ones(4, np.float32), t=1, threads=1, simd="auto", exact=False, **hyper_kwargs(h))
    state = torch.zeros(2, 10)
    step(state=state.data_ptr(), slots=2, **common)
    for name in ("momentum", "eps", "threads", "simd", "exact"):  # no defaults in the binding: Python passes everything
        with pytest.raises(TypeError):
            step(state=state.data_ptr(), slots=2, **{k: v for k, v in common.items() if k != name})
    with pytest.raises(ValueError, match=r"\[step\] state: adam with these hyperparameters needs 2 state slots, got 3"):
        step(state=0, slots=3, **common)
    with pytest.raises(ValueError, match=r"\[step\] state: null pointer"):
        step(state=0, slots=2, **common)
    with pytest.raises(ValueError, match=r"\[step\] batch_dtypes\[0\]: unsupported dtype 'int32'"):
        step(state=w.data_ptr(), slots=2, **{**common, "batch_dtypes": ["int32"]})
