"""The reference backend against a second, independent loop written here from the spec.

The loop below shares no code with ame_kernels: it builds its own order, shuffle
(the torch.randperm recipe of the API contract), batches, lr_t and zeta_t, and
writes each optimizer's update from torch.optim's documented algorithm in float64.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ame_kernels.config import OPTIMIZERS
import ame_kernels as ak


def independent_ame(xs, *, optimizer, lr, lr_schedule, lr_power, zeta, epochs, batch_size, shuffle, seed,
                    pivot, adaptive, order, wd, momentum, dampening, nesterov, lr_decay, init_acc,
                    betas, eps, amsgrad, rho, eps_inside):
    """float64 AME over numpy arrays, straight from DESIGN section 1 and the torch.optim docs."""
    X = [np.asarray(x, dtype=np.float64) for x in xs]
    n = len(X)
    base = list(order) if order is not None else list(range(n))
    g_ = torch.Generator().manual_seed(seed)
    seq = []
    for _ in range(epochs):
        ep = [base[j] for j in torch.randperm(n, generator=g_).tolist()] if shuffle else base
        seq += [ep[s:s + batch_size] for s in range(0, n, batch_size)]
    if isinstance(pivot, str):
        w0 = np.mean(X, axis=0)
    elif isinstance(pivot, int):
        w0 = X[pivot].copy()
    else:
        w0 = np.asarray(pivot, dtype=np.float64)
    w = w0.copy()
    z = np.zeros_like(w)
    m, v, vmax, s, buf, acc, u = z.copy(), z.copy(), z.copy(), z + init_acc, None, z.copy(), z.copy()
    b1, b2 = betas
    for t, batch in enumerate(seq, start=1):
        lrt = {"constant": lr, "harmonic": lr / t, "power": lr * t ** lr_power}[lr_schedule]
        zt = zeta[t - 1] if isinstance(zeta, list) else zeta
        p = w if adaptive else w0
        # DESIGN's batch pseudogradient: zeta_t / N * (p - the batch mean, summed in ascending index
        # like the soup's), so the soup pivot with a full batch gives exactly 0 here too (as the mean
        # of the per-ingredient differences it is ~1e-17, which Adagrad/Adam normalise into a full
        # step once an adaptive pivot has moved off the soup by that much)
        g = zt / n * (p - np.mean([X[i] for i in sorted(batch)], axis=0))
        if optimizer == "adamw":
            w = w * (1 - lrt * wd)
        elif wd:
            g = g + wd * w
        if optimizer == "sgd":
            if momentum:
                buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
                g = g + momentum * buf if nesterov else buf
            w = w - lrt * g
        elif optimizer == "adagrad":
            clr = lrt / (1 + (t - 1) * lr_decay)
            s = s + g * g
            w = w - clr * g / (np.sqrt(s + eps) if eps_inside else np.sqrt(s) + eps)
        elif optimizer in ("adam", "adamw"):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            vmax = np.maximum(vmax, v)
            vv = vmax if amsgrad else v
            vhat = vv / (1 - b2**t)
            den = np.sqrt(vhat + eps) if eps_inside else np.sqrt(vhat) + eps
            w = w - lrt / (1 - b1**t) * m / den
        else:  # adadelta
            acc = rho * acc + (1 - rho) * g * g
            d = np.sqrt(u + eps) / np.sqrt(acc + eps) * g
            u = rho * u + (1 - rho) * d * d
            w = w - lrt * d
    return w


configs = st.fixed_dictionaries({
    "optimizer": st.sampled_from(OPTIMIZERS),
    "n": st.integers(1, 6),
    "size": st.integers(1, 9),
    "epochs": st.integers(1, 3),
    "batch_size": st.integers(1, 4),
    "shuffle": st.booleans(),
    "seed": st.integers(0, 2**16),
    "adaptive": st.booleans(),
    "pivot_kind": st.sampled_from(["soup", "index", "tensor"]),
    "lr_schedule": st.sampled_from(["constant", "harmonic", "power"]),
    "lr_power": st.sampled_from([-0.5, -1.0, -1.5]),
    "zeta_kind": st.sampled_from(["scalar", "sequence"]),
    "wd": st.sampled_from([0.0, 0.05]),
    "momentum": st.sampled_from([0.0, 0.5, 0.9]),
    "nesterov": st.booleans(),
    "dampening": st.sampled_from([0.0, 0.3]),
    "amsgrad": st.booleans(),
    "eps_inside": st.booleans(),
    "order_kind": st.sampled_from(["none", "reversed"]),
    "dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
})

LR = {"sgd": 0.5, "adagrad": 0.05, "adam": 0.01, "adamw": 0.01, "adadelta": 1.0}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=configs)
def test_reference_matches_independent_loop(c):
    gen = torch.Generator().manual_seed(c["seed"])
    n, size = c["n"], c["size"]
    xs = [torch.randn(size, generator=gen).to(c["dtype"]) for _ in range(n)]
    steps = c["epochs"] * math.ceil(n / c["batch_size"])
    zeta = [float(z) for z in torch.rand(steps, generator=gen) * 2 + 0.5] if c["zeta_kind"] == "sequence" else 1.5
    # soup + a full batch included: g = 0 in fp32 as analytically (the batch mean in the soup's
    # order); the float64 loop's own rounding there is ~1e-17, normalised to a step far below atol
    pivot_kind = c["pivot_kind"]
    pivot = {"soup": "soup", "index": n - 1, "tensor": torch.randn(size, generator=gen)}[pivot_kind]
    nesterov = c["nesterov"] and c["momentum"] > 0 and c["dampening"] == 0
    order = list(reversed(range(n))) if c["order_kind"] == "reversed" else None
    opt = c["optimizer"]
    eps = {"sgd": 0.0, "adagrad": 1e-10, "adam": 1e-8, "adamw": 1e-8, "adadelta": 1e-6}[opt]
    out = ak.merge(
        xs, backend="reference", optimizer=opt, lr=LR[opt], lr_schedule=c["lr_schedule"], lr_power=c["lr_power"],
        amplification=zeta, epochs=c["epochs"], batch_size=c["batch_size"], shuffle=c["shuffle"], seed=c["seed"],
        pivot=pivot, adaptive_pivot=c["adaptive"], order=order, weight_decay=c["wd"],
        momentum=c["momentum"], dampening=c["dampening"], nesterov=nesterov, amsgrad=c["amsgrad"],
        eps_inside_sqrt=c["eps_inside"], out_dtype="float32",
    )
    expected = independent_ame(
        [x.float().numpy() for x in xs], optimizer=opt, lr=LR[opt], lr_schedule=c["lr_schedule"],
        lr_power=c["lr_power"], zeta=zeta, epochs=c["epochs"], batch_size=c["batch_size"], shuffle=c["shuffle"],
        seed=c["seed"], pivot=pivot if not isinstance(pivot, torch.Tensor) else pivot.numpy(),
        adaptive=c["adaptive"], order=order, wd=c["wd"], momentum=c["momentum"], dampening=c["dampening"],
        nesterov=nesterov, lr_decay=0.0, init_acc=0.0, betas=(0.9, 0.999), eps=eps, amsgrad=c["amsgrad"],
        rho=0.9, eps_inside=c["eps_inside"],
    )
    # fp32 (reference) vs float64 (here): a few fp32 ulp per step; adaptive optimizers
    # normalise g, so an absolute floor covers elements whose g is near zero.
    np.testing.assert_allclose(out.numpy(), expected, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("opt", ["adagrad", "adam"])
def test_lr_decay_and_initial_accumulator(opt):
    xs = [torch.randn(11) for _ in range(4)]
    kw = dict(lr_decay=0.3, initial_accumulator_value=0.2) if opt == "adagrad" else dict(betas=(0.8, 0.95))
    out = ak.merge(xs, backend="reference", optimizer=opt, lr=0.1, epochs=2, **kw)
    exp = independent_ame(
        [x.numpy() for x in xs], optimizer=opt, lr=0.1, lr_schedule="harmonic", lr_power=-1.0, zeta=1.0, epochs=2,
        batch_size=1, shuffle=False, seed=0, pivot="soup", adaptive=True, order=None, wd=0.0, momentum=0.0,
        dampening=0.0, nesterov=False, lr_decay=kw.get("lr_decay", 0.0), init_acc=kw.get("initial_accumulator_value", 0.0),
        betas=kw.get("betas", (0.9, 0.999)), eps=1e-10 if opt == "adagrad" else 1e-8, amsgrad=False, rho=0.9,
        eps_inside=False,
    )
    np.testing.assert_allclose(out.numpy(), exp, rtol=2e-4, atol=2e-5)


def test_reference_step_api_equals_whole_run():
    """ReferenceBackend.step driven with the plan's coefficient rows reproduces whole_run."""
    from ame_kernels.backends.reference import ReferenceBackend, batch_mean

    xs = [torch.randn(23) for _ in range(5)]
    for opt, extra in [("sgd", dict(momentum=0.9, nesterov=True)), ("adagrad", dict(lr_decay=0.1)),
                       ("adam", dict(amsgrad=True)), ("adamw", dict(weight_decay=0.1)), ("adadelta", {}),
                       ("adam", dict(eps_inside_sqrt=True))]:
        cfg = ak.AMEConfig(optimizer=opt, epochs=2, batch_size=2, adaptive_pivot=False, **extra)
        plan = ak.schedule(cfg, 5)
        be = ReferenceBackend()
        whole = torch.empty(23)
        be.whole_run(xs, plan, None, False, whole)
        w0 = batch_mean(xs)
        w = w0.clone()
        state = torch.stack([torch.full((23,), v) for v in plan.hyper.initial_state()]) if plan.hyper.state_slots \
            else torch.empty(0, 23)
        for t in range(1, plan.steps + 1):
            be.step(w, state, [xs[i] for i in sorted(plan.batch(t))], w0, plan.coeffs[t - 1], t, plan.hyper)
        torch.testing.assert_close(w, whole, rtol=1e-5, atol=1e-6, msg=f"{opt} {extra}")


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 + 5, 2**40 + 3, 2**64 - 1, -7])
def test_shuffle_permutations_equal_torch_randperm_without_torch(seed):
    """schedule.randperms draws what torch.randperm draws from a generator seeded with ``seed``."""
    from ame_kernels.schedule import randperms

    for n in (1, 2, 3, 8, 17, 64):
        g = torch.Generator().manual_seed(seed)
        want = [torch.randperm(n, generator=g).tolist() for _ in range(3)]
        assert randperms(seed, n, 3) == want, (seed, n)
