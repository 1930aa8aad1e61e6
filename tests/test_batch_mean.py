"""The batch pseudogradient on every backend: g_t = (p_t - mean_{B_t} x) * zeta_t / N, the batch
mean summed in ascending ingredient index exactly as the soup is (ame_kernels/backends/base.py,
"Batch mean"; DESIGN 1, Numerics).

With the soup pivot and a batch holding every ingredient, p - mean is then exactly 0 in fp32,
as in exact arithmetic, so Adagrad, Adam(W) and Adadelta (0 / (0 + eps), sqrt(eps/eps) * 0)
leave the soup where it is, bit for bit, through every step and epoch, whatever order the
schedule drew the batch in (given, shuffled, by scores) and whatever the input dtypes; and
every backend agrees there with the float64 answer (w_T = the exact mean) within
tests/tolerances.py. Before, each backend summed fp32 differences (p - x_i), got rounding noise
of ~1e-8 and a normalizing optimizer stepped by up to lr on it (5e-3 relative off float64).

Backends: the reference (whole_run and step), the cpu kernels (whole-run, exact and estimates,
and step), the Triton kernels under TRITON_INTERPRET=1 (make test's interpreter pass runs the
``triton`` rows), the CUDA kernels' per-thread code through host emulation (whole_run_emulated,
step_emulated) and, where a GPU is present, the CUDA backend itself.
"""

import os

import numpy as np
import pytest
import torch

import ame_kernels as ak
from ame_kernels import _native
from ame_kernels.backends.reference import ReferenceBackend, batch_mean, zeta_over_n
from ame_kernels.config import AMEConfig
from ame_kernels.schedule import schedule
from tolerances import assert_close

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
N, C = 5, 4099  # a ragged tail on every backend's vector / block width

OPTIMIZERS = {
    "adagrad": dict(optimizer="adagrad", lr=0.1),
    "adagrad_inside": dict(optimizer="adagrad", lr=0.1, eps=1e-3, eps_inside_sqrt=True),
    "adam": dict(optimizer="adam", lr=0.02),
    "adam_amsgrad": dict(optimizer="adam", lr=0.02, amsgrad=True, betas=(0.8, 0.99)),
    "adamw": dict(optimizer="adamw", lr=0.02),  # weight_decay 0: decoupled decay 1
    "adadelta": dict(optimizer="adadelta", lr=1.0, rho=0.8),
}
ORDERS = {
    "given": dict(batch_size=N),
    "shuffle": dict(batch_size=N + 2, shuffle=True, seed=5),
    "scores": dict(batch_size=N, scores=[0.3, 0.9, 0.1, 0.5, 0.7]),
}

CPU = ak.available_backends()["cpu"][0]
C_CUDA = _native.load("_C_cuda")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GPU = torch.cuda.is_available() and ak.available_backends().get("cuda", (False,))[0]


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    dtypes = [F32, BF16, F16, BF16, F32]
    return [(torch.randn(C, generator=g) + 0.2 * i).to(d) for i, d in enumerate(dtypes)]


def _plan(opt, order):
    return schedule(AMEConfig(**OPTIMIZERS[opt], **ORDERS[order], epochs=3), N)


def _soup(xs, fast=False):
    """The soup as the kernels form it: fp32 sum in ascending index, / N (exact), or
    * fp32(1/N) (the AVX-512 whole-run kernel's estimates; the same operation as its batch means)."""
    if not fast:
        return batch_mean(xs)
    total = batch_mean(xs[:1]).clone()
    for x in xs[1:]:
        total += x.float()
    return total * torch.tensor(1.0 / len(xs), dtype=F32)


def _whole_runners():
    """(id, whole_run(xs, plan, out), the kernel's soup uses the estimates) for each backend here."""
    runs = [("reference", lambda xs, plan, out: ReferenceBackend().whole_run(xs, plan, None, True, out), False)]
    if CPU:
        from ame_kernels.backends.cpu import CpuBackend

        for level in ak.build_info()["simd_supported"]:
            for exact in (True, False):
                be = CpuBackend(simd=level, exact=exact, fold=False)
                runs.append((f"cpu-{level}-{'exact' if exact else 'fast'}",
                             lambda xs, plan, out, be=be: be.whole_run(xs, plan, None, True, out, threads=2),
                             level == "avx512" and not exact))
    if C_CUDA is not None:
        from ame_kernels.backends.cuda import whole_run_emulated

        for vec in (True, False):
            runs.append((f"cuda-emulated-vec{int(vec)}",
                         lambda xs, plan, out, vec=vec: whole_run_emulated(xs, plan, None, True, out, vec=vec), False))
    return runs


WHOLE = _whole_runners()


def _check_unmoved(out, xs, fast, what):
    soup = _soup(xs, fast)
    assert torch.equal(out, soup), f"{what}: max |w_T - soup| {(out - soup).abs().max().item():g}"
    # the float64 answer: g = 0 in exact arithmetic, so w_T = w_0 = the exact mean
    exact = torch.stack([x.double() for x in xs]).mean(0)
    assert_close(out, exact, dtype=F32, what=f"{what} vs float64")


@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("backend", [w[0] for w in WHOLE])
def test_whole_run_full_batch_leaves_the_soup(backend, opt, order):
    _, run, fast = next(w for w in WHOLE if w[0] == backend)
    xs, plan = _inputs(), _plan(opt, order)
    out = torch.empty(C)
    run(xs, plan, out)
    _check_unmoved(out, xs, fast, f"{backend} {opt} {order}")


def _state(plan):
    st = torch.tensor(plan.hyper.initial_state(), dtype=F32).reshape(-1, 1).repeat(1, C)
    return st.reshape(plan.hyper.state_slots, C).contiguous()


def _steppers():
    steps = [("reference", ReferenceBackend().step)]
    if CPU:
        from ame_kernels.backends.cpu import CpuBackend

        steps.append(("cpu", lambda *a: CpuBackend().step(*a, threads=2)))
    if C_CUDA is not None:
        from ame_kernels.backends.base import hyper_kwargs

        def emulated(w, state, batch, pivot, coeffs, t, hyper):
            C_CUDA.step_emulated(
                w=w.data_ptr(), state=state.data_ptr() if hyper.state_slots else 0, c=w.numel(),
                batch=[x.data_ptr() for x in batch], batch_dtypes=[str(x.dtype).replace("torch.", "") for x in batch],
                pivot=0 if pivot is None else pivot.data_ptr(), coeffs=[float(v) for v in coeffs], t=int(t),
                vec=True, **hyper_kwargs(hyper))

        steps.append(("cuda-emulated", emulated))
    return steps


STEP = _steppers()


@pytest.mark.parametrize("fixed", [False, True], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("backend", [s[0] for s in STEP])
def test_step_full_batch_leaves_the_soup(backend, opt, fixed):
    """The step entry point, fed each batch in ascending index (as stew and greedy do)."""
    step = dict(STEP)[backend]
    xs, plan = _inputs(), _plan(opt, "shuffle")
    soup = _soup(xs)
    w, state = soup.clone(), _state(plan)
    for t in range(1, plan.steps + 1):
        step(w, state, [xs[i] for i in sorted(plan.batch(t))], soup if fixed else None, plan.coeffs[t - 1], t,
             plan.hyper)
    _check_unmoved(w, xs, False, f"{backend} step {opt}")


@pytest.mark.skipif(not INTERPRET, reason="triton on CPU needs TRITON_INTERPRET=1 (make test's interpreter pass)")
@pytest.mark.parametrize("opt", ["adagrad", "adam_amsgrad", "adamw", "adadelta"])
def test_triton_full_batch_leaves_the_soup(opt):
    from ame_kernels.backends.triton import TritonBackend

    xs, be = _inputs(), TritonBackend()
    for order in sorted(ORDERS):
        plan = _plan(opt, order)
        out = torch.empty(C)
        be.whole_run(xs, plan, None, True, out)
        _check_unmoved(out, xs, False, f"triton {opt} {order}")
    plan = _plan(opt, "shuffle")
    soup = _soup(xs)
    w, state = soup.clone(), _state(plan)
    for t in range(1, plan.steps + 1):
        be.step(w, state, [xs[i] for i in sorted(plan.batch(t))], None, plan.coeffs[t - 1], t, plan.hyper)
    _check_unmoved(w, xs, False, f"triton step {opt}")


@pytest.mark.skipif(not GPU, reason="the CUDA backend needs a GPU (its per-thread code is checked by emulation above)")
@pytest.mark.parametrize("opt", ["adagrad", "adam", "adadelta"])
def test_cuda_device_full_batch_leaves_the_soup(opt):
    from ame_kernels.backends.cuda import CudaBackend

    xs = _inputs()
    dev = [x.cuda() for x in xs]
    for order in sorted(ORDERS):
        out = torch.empty(C, device="cuda")
        CudaBackend(fold=False).whole_run(dev, _plan(opt, order), None, True, out)
        _check_unmoved(out.cpu(), xs, False, f"cuda {opt} {order}")


def test_the_corner_is_not_warned_about():
    """The corner is well-posed now: schedule no longer warns (it did, and the property test excluded it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for opt in ("adagrad", "adam", "adadelta"):
            schedule(AMEConfig(optimizer=opt, batch_size=4), 3)


def test_summation_order_and_scale():
    """StepPlan.summation_idx sorts within each batch only; zeta_over_n is fp32(fp64(gscale) * m)."""
    plan = schedule(AMEConfig(optimizer="adam", batch_size=3, epochs=2, shuffle=True, seed=1, amplification=0.7), 7)
    idx = plan.summation_idx()
    for t in range(1, plan.steps + 1):
        lo, hi = plan.batch_ptr[t - 1], plan.batch_ptr[t]
        assert idx[lo:hi].tolist() == sorted(plan.batch(t))
        m = hi - lo
        zs = zeta_over_n(plan.coeffs[t - 1, 0], m)
        assert zs == float(np.float32(np.float64(np.float32(0.7 / (7 * m))) * m))
        assert abs(zs - 0.7 / 7) <= 0.7 / 7 * 2**-23
    assert plan.batch_idx.tolist() != idx.tolist()  # the drawn order itself is kept
