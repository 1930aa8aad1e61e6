"""Shared combine-pass test cases (tests/test_triton_combine.py, tests/test_cuda_combine.py).

``make_case`` builds seeded inputs, a base, a ``CombinePlan`` (rank windows from the data,
ties included) and per-element probabilities; ``assert_bitwise`` compares raw bits (any
NaN equals any NaN: NaN payloads and signs are not part of the contract).
"""

import numpy as np
import torch

from ame_kernels.methods.combine import ELECT_COUNT, ELECT_NONE, ELECT_SUM, CombinePlan, name_key

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({F32: torch.int32, BF16: torch.int16, F16: torch.int16}[t.dtype])


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Equal bits, except that any NaN equals any NaN: payloads and signs of NaNs are not part of
    the contract (torch rounds every NaN to bf16 0x7fc0, the kernels keep the sign)."""
    got, want = got.cpu(), want.cpu()
    g, w = _bits(got), _bits(want)
    differ = (g != w) & ~(torch.isnan(got) & torch.isnan(want))
    if differ.any():
        bad = differ.nonzero().reshape(-1)
        k = int(bad[0])
        raise AssertionError(f"{what}: {bad.numel()} of {g.numel()} elements differ; first at {k}: "
                             f"got {got.reshape(-1)[k].item()!r} want {want.reshape(-1)[k].item()!r}")


def _window_keys(taus, r_lo, r_hi, offset):
    """(top_mag, top_idx, end_mag, end_idx) of ranks r_lo, r_hi of |tau| (descending, ties by index)."""
    tm, ti, em, ei = [], [], [], []
    for tau in taus:
        m = tau.float().abs().cpu().numpy()
        order = np.lexsort((np.arange(m.size), -m))  # by -m, then index
        c = m.size
        if r_lo == 0:
            tm.append(np.inf), ti.append(0)
        else:
            tm.append(m[order[r_lo]]), ti.append(offset + int(order[r_lo]))
        if r_hi >= c:
            em.append(-1.0), ei.append(0)
        else:
            em.append(m[order[r_hi]]), ei.append(offset + int(order[r_hi]))
    return tm, ti, em, ei


def make_case(n, size, in_dtypes, out_dtype, elect=ELECT_NONE, normalize=False, inv_prob=False, density=1.0,
          base=True, base_dtype=None, probs=False, window=None, offset=0, ties=False, lam=0.75, seed=1234,
          weights=None, device="cpu"):
    """(inputs, base, plan, probs) for one combine call; fixed by the arguments (seeded)."""
    gen = torch.Generator().manual_seed(size * 131 + n * 7 + elect)
    dts = [in_dtypes[k % len(in_dtypes)] for k in range(n)]
    b = torch.randn(size, generator=gen).to(base_dtype or dts[0]) if base else None
    xs = []
    for dt in dts:
        d = torch.randn(size, generator=gen)
        if ties:  # few distinct magnitudes: rank windows must break ties by index
            d = torch.round(d * 2) / 4
        x = (d if b is None else b.float() + d).to(dt)
        xs.append(x)
    w = np.asarray(weights if weights is not None else np.linspace(-0.5, 1.25, n) + 0.1, dtype=np.float32)
    dens = np.asarray(density if np.ndim(density) else np.full(n, density), dtype=np.float32)
    kw = {}
    if window is not None:
        taus = [x.float() - (b.float() if b is not None else 0) for x in xs]
        tm, ti, em, ei = _window_keys(taus, window[0], window[1], offset)
        kw = dict(top_mag=tm, top_idx=ti, end_mag=em, end_idx=ei)
    plan = CombinePlan(n=n, weight=w, scale=np.linspace(0.5, 2.0, n), density=dens, seed=seed,
                       name_key=name_key("layers.0.mlp.weight"), elect=elect, normalize=normalize, lam=lam,
                       inv_prob=inv_prob, **kw)
    pr = None
    if probs:
        pr = [torch.rand(size, generator=gen) * 0.9 + 0.05 if k % 2 == 0 else None for k in range(n)]
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [mv(x) for x in xs], mv(b), plan, (None if pr is None else [mv(p) for p in pr])



# (id, n, size, input dtypes, out dtype, options): every method's shape of plan, N = 1..8.
CASES = [
    ("linear-1", 1, 1, [F32], F32, dict(normalize=True, base=False)),
    ("task-arith-2", 2, 7, [BF16], BF16, dict(lam=0.5)),
    ("linear-mixed-3", 3, 33, [F32, BF16, F16], F16, dict(normalize=True, base=False)),
    ("ties-sum-4", 4, 1000, [BF16], BF16, dict(elect=ELECT_SUM, normalize=True, window=(0, 400), ties=True)),
    ("ties-count-5", 5, 1000, [F16, F32], F32, dict(elect=ELECT_COUNT, normalize=True, window=(0, 300), ties=True)),
    ("breadcrumbs-2", 2, 1000, [F32], BF16, dict(window=(50, 700), ties=True, offset=4096)),
    ("dare-3", 3, 1000, [BF16], BF16, dict(density=0.3, inv_prob=True)),
    ("dare-ties-6", 6, 4099, [BF16], BF16, dict(density=[0.2, 0.5, 0.9, 1.0, 0.7, 0.1], inv_prob=True,
                                                 elect=ELECT_SUM, normalize=True, offset=(1 << 32) - 2000)),
    ("della-7", 7, 1000, [F32, BF16], F16, dict(probs=True, inv_prob=True, elect=ELECT_SUM, normalize=True,
                                                 density=0.5, offset=3 << 33)),
    ("dare-nobase-8", 8, 33, [F16], F32, dict(density=0.6, base=False, elect=ELECT_COUNT, base_dtype=F32)),
    ("ties-8-zero-weights", 8, 7, [BF16], BF16, dict(elect=ELECT_SUM, normalize=True, weights=[0.0] * 8)),
]


