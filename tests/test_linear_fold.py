"""GD folded into one weighted sum (schedule.linear_coefficients + the cpu kernel's linear path).

SGD is linear in (w_0, x_1..x_N), so the host folds the whole schedule into N+1 weights
and the kernel reads each input once. The fold must agree with torch.optim (the reference)
and with the stepped kernel to fp32 rounding, for every SGD option, pivot and schedule.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ame_kernels as ak
from ame_kernels.backends import available
from ame_kernels.schedule import MAX_LINEAR_GAIN, linear_coefficients, schedule
from tolerances import assert_close

CPU = available()["cpu"][0]
needs_cpu = pytest.mark.skipif(not CPU, reason=f"cpu backend: {available()['cpu'][1]}")


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 6), epochs=st.integers(1, 3), batch_size=st.integers(1, 4), shuffle=st.booleans(),
    adaptive=st.booleans(), momentum=st.sampled_from([0.0, 0.5, 0.9]), nesterov=st.booleans(),
    dampening=st.sampled_from([0.0, 0.2]), wd=st.sampled_from([0.0, 0.1]),
    schedule_kind=st.sampled_from(["constant", "harmonic", "power"]), seed=st.integers(0, 1000),
)
def test_coefficients_reproduce_torch_optim(n, epochs, batch_size, shuffle, adaptive, momentum, nesterov, dampening,
                                            wd, schedule_kind, seed):
    """sum_i c_i x_i + c_N w_0 (float64) equals the reference's torch.optim run (fp32)."""
    nesterov = nesterov and momentum > 0 and dampening == 0
    cfg = ak.AMEConfig(optimizer="sgd", lr=0.5, lr_schedule=schedule_kind, epochs=epochs, batch_size=batch_size,
                       shuffle=shuffle, seed=seed, adaptive_pivot=adaptive, momentum=momentum, nesterov=nesterov,
                       dampening=dampening, weight_decay=wd, amplification=1.7, pivot=torch.zeros(9) + 0.3)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 9, generator=g)
    plan = schedule(cfg, n)
    c = linear_coefficients(plan, adaptive, max_gain=float("inf"))
    assert c is not None and c.shape == (n + 1,)
    gain = np.abs(c).sum()
    # the guard falls back to stepping exactly when the combination is ill-conditioned
    assert (linear_coefficients(plan, adaptive) is None) == (gain > MAX_LINEAR_GAIN)
    folded = c[:n] @ xs.double().numpy() + c[n] * 0.3
    ref = ak.merge(xs, cfg, backend="reference")
    # the fp32 reference's own rounding grows with the gain (terms of size ~gain cancel)
    np.testing.assert_allclose(folded, ref.double().numpy(), rtol=1e-5, atol=1e-6 * max(1.0, gain))


def test_non_sgd_and_unstable_schedules_are_not_folded():
    assert linear_coefficients(schedule(ak.AMEConfig(optimizer="adam"), 4), True) is None
    # lr 10 constant: |1 - lr g| > 1, the coefficients blow up past MAX_LINEAR_GAIN
    plan = schedule(ak.AMEConfig(optimizer="sgd", lr=10.0, lr_schedule="constant", amplification=4.0, epochs=3), 4)
    assert linear_coefficients(plan, True) is None
    ok = linear_coefficients(schedule(ak.AMEConfig(optimizer="sgd"), 4), True)
    assert ok is not None and np.abs(ok).sum() <= MAX_LINEAR_GAIN


SGD_VARIANTS = {
    "gd": dict(),
    "gd_constant_fixed": dict(lr_schedule="constant", adaptive_pivot=False),
    "momentum": dict(momentum=0.9, dampening=0.1, lr=0.5),
    "nesterov_wd": dict(momentum=0.8, nesterov=True, weight_decay=0.05, lr=0.5),
}


@needs_cpu
@pytest.mark.parametrize("simd", ak.build_info().get("simd_supported", ["scalar"]))
@pytest.mark.parametrize("pivot", ["soup", 2, "tensor"])
@pytest.mark.parametrize("size", [1, 17, 4099])
@pytest.mark.parametrize("variant", sorted(SGD_VARIANTS))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_folded_equals_stepped_and_reference(variant, size, pivot, simd, out_dtype):
    from ame_kernels.backends.cpu import CpuBackend
    from ame_kernels.backends.reference import ReferenceBackend

    xs = [(torch.randn(size) + 0.5 * i).to([torch.bfloat16, torch.float32, torch.float16][i % 3]) for i in range(5)]
    cfg = ak.AMEConfig(optimizer="sgd", epochs=3, batch_size=2, shuffle=True, **SGD_VARIANTS[variant])
    plan = schedule(cfg, 5)
    p = torch.randn(size).to(torch.float16) if pivot == "tensor" else (None if pivot == "soup" else pivot)
    outs = {}
    for name, be in [("fold", CpuBackend(simd=simd)), ("step", CpuBackend(simd=simd, fold=False)),
                     ("ref", ReferenceBackend())]:
        outs[name] = torch.empty(size, dtype=out_dtype)
        be.whole_run(xs, plan, p, cfg.adaptive_pivot, outs[name], threads=2)
    assert_close(outs["fold"], outs["ref"], what=f"fold vs reference ({variant})")
    assert_close(outs["fold"], outs["step"], what=f"fold vs stepped kernel ({variant})")


@needs_cpu
def test_fold_reads_each_input_once_per_epoch_count():
    """Same weights whatever the epochs once the schedule has converged: the folded kernel's cost
    does not depend on T, and its result tracks the reference at every epoch count."""
    from ame_kernels.backends.cpu import CpuBackend

    xs = [torch.randn(1000) for _ in range(4)]
    for epochs in (1, 5, 40):
        cfg = ak.AMEConfig(optimizer="sgd", epochs=epochs, momentum=0.5)
        got = ak.merge(xs, cfg, backend="cpu")
        ref = ak.merge(xs, cfg, backend="reference")
        assert_close(got, ref, what=f"{epochs} epochs")
    assert CpuBackend().fold


@needs_cpu
def test_fold_reports_nonfinite_inputs_by_index():
    from ame_kernels.backends.cpu import CpuBackend

    xs = [torch.randn(300) for _ in range(4)]
    xs[2][123] = float("nan")
    xs[3][299] = float("inf")  # in the ragged tail of the last tile
    plan = schedule(ak.AMEConfig(optimizer="sgd"), 4)
    bad = CpuBackend().whole_run(xs, plan, None, True, torch.empty(300), check_finite=True)
    assert bad == [2, 3]
    assert CpuBackend().whole_run([torch.randn(300)] * 4, plan, None, True, torch.empty(300), check_finite=True) == []
