"""Tolerances for kernel-vs-reference parity, keyed by output dtype, each with its reason.

fp32: the kernels and torch.optim evaluate the same formulas in fp32 but in a
    different operation order (FMA contraction, a multiply by 1/sqrt(bc2) where
    torch divides by sqrt(bc2)): a few ulp per step, growing slowly with T.
bf16 / fp16: both sides compute in fp32 and round once at the end; a few-ulp fp32
    difference can flip that final rounding, so at most one unit in the last place
    of the output dtype (bf16 8 bits of mantissa: 2^-8 relative; fp16: 2^-11).
"""

import torch

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-6),
}


def outside(actual: torch.Tensor, expected: torch.Tensor, dtype) -> torch.Tensor:
    """The elements of ``actual`` beyond TOL[dtype] of ``expected`` (a bool mask; NaNs are not
    compared here, assert_close checks that they match)."""
    tol = TOL[dtype]
    return (actual - expected).abs() > tol["atol"] + tol["rtol"] * expected.abs()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = "") -> None:
    """Like torch.testing.assert_close with TOL[dtype], but reports the mismatch count and first indices."""
    dtype = dtype or expected.dtype
    tol = TOL[dtype]
    a = actual.detach().float().cpu().reshape(-1)
    e = expected.detach().float().cpu().reshape(-1)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    bad = outside(a, e, dtype)
    bad = (bad & ~(torch.isnan(a) & torch.isnan(e))) | nan_mismatch
    if bad.any():
        idx = torch.nonzero(bad).reshape(-1)[:5].tolist()
        pairs = ", ".join(f"[{i}] {a[i].item():.8g} vs {e[i].item():.8g}" for i in idx)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements outside rtol={tol['rtol']:g} atol={tol['atol']:g}; first: {pairs}"
        )


def oracle64(xs, plan, pivot, adaptive):
    """The reference backend's own loop (its helpers, torch.optim) in float64: the exact answer
    that the fp32 errors of a kernel and of the reference are measured against (the accuracy
    criterion: a kernel's error at most twice the reference's). pivot: None (the soup), an
    ingredient's index or a tensor; inputs are exact in float64."""
    from ame_kernels.backends import reference as R

    xs = [x.cpu() for x in xs]
    if pivot is None:
        w0 = torch.stack([x.double() for x in xs]).mean(0)
    elif isinstance(pivot, int):
        w0 = xs[pivot].double().clone()
    else:
        w0 = pivot.cpu().double().clone()
    w = w0.clone()
    hyper = plan.hyper
    opt = R._ManualEpsInside(w, hyper) if R._uses_manual(hyper) else R._make_optimizer(w, hyper)
    for t in range(1, plan.steps + 1):
        p = w if adaptive else w0
        g = R._pseudogradient(p, [xs[i].double() for i in sorted(plan.batch(t))], float(plan.zeta[t - 1]) / plan.n)
        lr = float(plan.lr[t - 1])
        if isinstance(opt, R._ManualEpsInside):
            opt.step(g, lr)
        else:
            w.grad = g
            opt.param_groups[0]["lr"] = lr
            opt.step()
    return w
