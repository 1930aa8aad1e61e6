"""Merge methods: every method on every CPU backend against its plain-torch definition, the
paper identities between them, the exact streamed statistics, and bad input named before work."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ame_kernels as ak
from ame_kernels.methods import METHODS, split_call
from ame_kernels.methods.combine import philox4x32_10
from ame_kernels.methods.stats import TorchStats, select_ranks
from backends import cpu_backends
from tolerances import assert_close

BACKENDS = cpu_backends()
NON_AME = [m for m in METHODS if m != "ame"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def family(n, shape, dtype=torch.float32, seed=0, scale=0.1, ties=False):
    """A base and n fine-tunes (base + small task vectors); ``ties``: task vectors on a coarse grid."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    fts = []
    for _ in range(n):
        tau = torch.randn(shape, generator=g) * scale
        if ties:
            tau = (tau * 20).round() / 20  # many equal magnitudes, zeros included
        fts.append((base + tau).to(dtype))
    return base.to(dtype), fts


def params_for(name, n):
    """A parameter set that exercises the method (densities below 1, non-default weights)."""
    m = METHODS[name]
    names = {q.name for q in m.params}
    kw = {}
    if "weight" in names:
        kw["weights"] = [0.5 + 0.25 * i for i in range(n)]
    if "density" in names:
        kw["density"] = [0.3 + 0.1 * (i % 3) for i in range(n)]
    if "gamma" in names:
        kw["gamma"] = 0.1
    if "epsilon" in names:
        kw["epsilon"] = 0.1
    if "t" in names:
        kw["t"] = 0.3
    if "lambda" in names:
        kw["lambda_"] = 0.9
    return kw


def run_reference(name, xs, base, kw):
    """The method's own plain-torch definition, per tensor (not the combine pass)."""
    call = split_call(name, kw, len(xs), base is not None)
    return call.method.reference(xs, base, call.params, "")


def counts(name):
    m = METHODS[name]
    lo = max(m.min_n, 1)
    hi = m.max_n or 8
    return sorted({lo, min(hi, 3), hi})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NON_AME)
def test_every_method_matches_its_definition(backend, name):
    """Odd sizes, every dtype, N from the method's minimum to 8 (or its maximum)."""
    for n in counts(name):
        for dtype in DTYPES:
            for shape in [(1,), (7, 5), (33, 61)]:
                base, xs = family(n, shape, dtype, seed=n + len(shape))
                b = base if METHODS[name].base == "required" else None
                kw = params_for(name, n)
                got = ak.merge(xs, method=name, base=b, backend=backend, out_dtype="float32", **kw)
                want = run_reference(name, xs, b, kw)
                assert_close(got, want.reshape(shape), torch.float32, what=f"{name} {backend} N={n} {dtype} {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "della"])
def test_ties_in_magnitudes_zero_task_vectors_and_edge_densities(backend, name):
    base, xs = family(4, (40, 25), seed=3, ties=True)
    xs[1] = base.clone()  # a zero task vector
    for density in (1e-3, 0.5, 1.0):
        kw = params_for(name, 4)
        kw["density"] = density
        if name == "della":
            kw["epsilon"] = min(0.1, density / 2) if density < 1 else 0.1
            if density < 1 and not (0 < density - kw["epsilon"] and density + kw["epsilon"] < 1):
                continue
        if name.startswith("breadcrumbs"):
            kw["gamma"] = min(0.1, 1 - density)
        got = ak.merge(xs, method=name, base=base, backend=backend, **kw)
        assert_close(got, run_reference(name, xs, base, kw).reshape(base.shape), torch.float32,
                     what=f"{name} density {density}")


def test_trimmed_set_is_exact_under_ties():
    """TIES keeps exactly k = int(density * numel) entries per task vector even when magnitudes tie,
    the lower index winning a tie."""
    base = torch.zeros(10)
    x = torch.tensor([1.0, -3.0, 3.0, 0.5, 3.0, 0.0, -1.0, 2.0, 3.0, 0.25])
    out = ak.merge([x], method="ties", base=base, density=0.3, backend="reference")
    assert torch.equal(out, torch.tensor([0, -3.0, 3.0, 0, 3.0, 0, 0, 0, 0, 0]))
    out = ak.merge([x], method="breadcrumbs", base=base, density=0.3, gamma=0.2, backend="reference")
    assert torch.equal(out, torch.tensor([0, 0, 0, 0, 3.0, 0, 0, 2.0, 3.0, 0]))


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("backend", BACKENDS)
def test_identities(backend):
    base, xs = family(4, (17, 23), seed=5)
    w = [0.4, 0.3, 0.2, 0.6]
    ta = ak.merge(xs, method="task_arithmetic", base=base, weights=w, backend=backend)
    # sparsification off -> task arithmetic (same weights, no normalisation)
    for name, extra in [("breadcrumbs", dict(gamma=0.0)), ("dare_linear", {}), ("della_linear", {})]:
        got = ak.merge(xs, method=name, base=base, backend=backend, weights=w, density=1.0, **extra)
        assert_close(got, ta, what=f"{name} density 1 == task_arithmetic")
    # with sign election too, once every task vector agrees in sign (election keeps them all)
    agree = [base + (x - base).abs() for x in xs]
    ta_agree = ak.merge(agree, method="task_arithmetic", base=base, weights=w, backend=backend)
    for name in ("ties", "breadcrumbs_ties", "dare_ties", "della"):
        got = ak.merge(agree, method=name, base=base, backend=backend, weights=w, density=1.0, normalize=False)
        assert_close(got, ta_agree, what=f"{name} density 1, agreeing signs == task_arithmetic")
    # linear with equal weights == the soup == the mean
    soup = torch.stack(xs).mean(0)
    assert_close(ak.merge(xs, method="linear", backend=backend), soup, what="linear == mean")
    assert_close(ak.merge(xs, method="linear", weights=[2.0] * 4, backend=backend), soup, what="equal weights")
    # slerp endpoints
    assert torch.equal(ak.merge(xs[:2], method="slerp", t=0.0, backend=backend), xs[0])
    assert torch.equal(ak.merge(xs[:2], method="slerp", t=1.0, backend=backend), xs[1])
    # model stock of identical fine-tunes returns them (cos = 1 -> t = 1)
    ms = ak.merge([xs[0]] * 3, method="model_stock", base=base, backend=backend)
    assert_close(ms, xs[0], what="model_stock of identical fine-tunes")
    # task arithmetic == GD-AME with the base as fixed pivot (paper eq. 4): lr 1 constant, one epoch,
    # batch 1, amplification zeta_t = N w_t lambda
    lam = 0.8
    ta = ak.merge(xs, method="task_arithmetic", base=base, weights=w, lambda_=lam, backend=backend)
    gd = ak.merge(xs, optimizer="sgd", lr=1.0, lr_schedule="constant", pivot=base, adaptive_pivot=False,
                  amplification=[4 * lam * v for v in w], backend=backend)
    assert_close(gd, ta, what="task_arithmetic == GD-AME around the base")


def test_slerp_is_spherical_and_falls_back_to_lerp():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    mid = ak.merge([a, b], method="slerp", t=0.5, backend="reference")
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5)] * 2), atol=1e-7)  # on the circle, not the chord
    c = torch.tensor([1.0, 1e-3])  # nearly colinear with a: lerp
    assert torch.allclose(ak.merge([a, c], method="slerp", t=0.25, backend="reference"), 0.75 * a + 0.25 * c)


def test_model_stock_ratio():
    """Two orthogonal task vectors (cos 0) give t = 0: the base; k = 2 at cos 1/2 gives t = 2/3."""
    base = torch.zeros(2)
    out = ak.merge([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], method="model_stock", base=base)
    assert torch.equal(out, base)
    x1, x2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(0.75)])
    out = ak.merge([x1, x2], method="model_stock", base=base, backend="reference")
    assert torch.allclose(out, (2 / 3) * (x1 + x2) / 2, atol=1e-6)


def test_dare_keeps_the_density_and_is_the_same_on_every_chunking():
    base, xs = family(2, (100, 300), seed=7)
    out = ak.merge(xs, method="dare_linear", base=base, density=0.3, rescale="none", seed=11, weights=[1.0, 0.0])
    kept = (out != base).float().mean().item()
    assert abs(kept - 0.3) < 5 * math.sqrt(0.3 * 0.7 / base.numel()), kept
    again = ak.merge(xs, method="dare_linear", base=base, density=0.3, rescale="none", seed=11, weights=[1.0, 0.0])
    other = ak.merge(xs, method="dare_linear", base=base, density=0.3, rescale="none", seed=12, weights=[1.0, 0.0])
    assert torch.equal(out, again) and not torch.equal(out, other)
    # inverse rescaling: kept entries are tau / density
    inv = ak.merge(xs, method="dare_linear", base=base, density=0.3, rescale="inverse", seed=11, weights=[1.0, 0.0])
    m = out != base
    assert_close((inv - base)[m], ((xs[0].float() - base) / np.float32(0.3))[m], what="inverse rescale")
    # l1 rescaling (mergekit's default): the kept task vector has the original's L1 norm
    l1 = ak.merge(xs, method="dare_linear", base=base, density=0.3, seed=11, weights=[1.0, 0.0])
    ratio = (l1 - base).abs().sum() / (xs[0] - base).abs().sum()
    assert abs(ratio.item() - 1) < 1e-4


def test_default_method_is_the_uniform_soup():
    """No method and no AME option: the mean (a bare call used to run GD-AME with harmonic lr, zeta 1)."""
    xs = [torch.full((5,), v) for v in (0.0, 0.01, 0.03)]
    assert torch.allclose(ak.merge(xs), torch.full((5,), 0.04 / 3))
    # an AME option still means AME, as before
    assert not torch.allclose(ak.merge(xs, optimizer="sgd"), torch.full((5,), 0.04 / 3), atol=1e-4)


# --------------------------------------------------------------------------- statistics


def test_philox_known_answers():
    """Philox4x32-10 against the Random123 known-answer vectors."""
    def t(*v):
        return [torch.tensor([x], dtype=torch.int64) for x in v]

    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        assert tuple(int(v) for v in philox4x32_10(*t(*ctr), *key)) == want


def test_philox_uniform_takes_four_words_per_counter():
    """Elements 4q .. 4q + 3 take words 0..3 of counter (q, q >> 32, ingredient, 0): the known answers
    at counter 0, key 0, and the layout at a counter past 2^32 and a seed and name key."""
    from ame_kernels.methods.combine import philox_uniform

    words = (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    got = philox_uniform(0, 0, 0, torch.arange(4, dtype=torch.int64))
    assert got.tolist() == [(w >> 8) * 2.0 ** -24 for w in words]
    seed, key, i, q = 2**40 + 77, 0x1234567, 3, 2**33 + 5
    k0, k1 = seed & 0xFFFFFFFF, ((seed >> 32) ^ key) & 0xFFFFFFFF
    want = philox4x32_10(*[torch.tensor([v], dtype=torch.int64) for v in (q & 0xFFFFFFFF, q >> 32, i, 0)], k0, k1)
    got = philox_uniform(seed, key, i, torch.arange(4 * q, 4 * q + 4, dtype=torch.int64))
    assert got.tolist() == [(int(w) >> 8) * 2.0 ** -24 for w in want]


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3000), chunk=st.integers(200, 3000), seed=st.integers(0, 2**31), coarse=st.booleans(),
       base_dtype=st.sampled_from([None, torch.float32, torch.bfloat16]))
def test_select_ranks_is_exact_and_chunk_invariant(n, chunk, seed, coarse, base_dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if coarse:
        x = (x * 4).round() / 4
    b = None if base_dtype is None else (torch.randn(n, generator=g) * 0.1).to(base_dtype)

    def chunks():
        for o in range(0, n, chunk):
            yield o, [x[o:o + chunk]], (b[o:o + chunk] if b is not None else None)

    m = (x - (b.float() if b is not None else 0)).abs()
    order = sorted(range(n), key=lambda j: (-float(m[j]), j))
    ranks = sorted({0, n // 3, n // 2, n - 1})
    from ame_kernels.methods import stats

    block, stats.LOCATE_BLOCK = stats.LOCATE_BLOCK, 64  # the block-by-block search inside a chunk too
    try:
        keys = select_ranks(chunks, TorchStats, n, [(0, r) for r in ranks])
    finally:
        stats.LOCATE_BLOCK = block
    for r, k in zip(ranks, keys):
        if 0 < r < n:
            assert k == (float(m[order[r]]), order[r])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, match", [
    (dict(method="tie"), r"unknown method 'tie' \(did you mean 'ties'\?\)"),
    (dict(method="ties", density=1.5), r"density: must be in \[0, 1\], got 1.5"),
    (dict(method="della", density=0.5, epsilon=0.6), r"epsilon: must be in \[0, 0.5\)"),
    (dict(method="della", density=0.1, epsilon=0.2), r"density -/\+ epsilon must lie in \(0, 1\)"),
    (dict(method="dare_ties", density=0.0), r"density: must be in \(0, 1\]"),
    (dict(method="breadcrumbs", density=0.95, gamma=0.1), r"gamma \+ density must be <= 1"),
    (dict(method="ties", weights=[1, 2]), r"weight has 2 values but there are 3 ingredients"),
    (dict(method="ties", densty=0.5), r"no parameter 'densty' \(did you mean 'density'\?\)"),
    (dict(method="ties", optimizer="adam"), r"'optimizer' is an option of method 'ame'"),
    (dict(method="linear", weights=[1, -1, 0]), r"sum to 0"),
    (dict(method="slerp", t=1.5), r"t: must be in \[0, 1\]"),
    (dict(method="slerp"), r"takes exactly 2 ingredients, got 3"),
    (dict(method="model_stock", base=None), r"needs a base model"),
    (dict(method="linear", base="x"), r"takes no base model"),
    (dict(method="ties", rescale="inverse"), r"rescale 'inverse' divides by a keep probability"),
    (dict(density=0.5), r"'density' given without a method"),
])
def test_bad_input_is_named_before_any_work(kw, match):
    base, xs = family(3, (4, 3))
    kw = dict(kw)
    b = kw.pop("base", base if kw.get("method") not in ("linear", "slerp", None) else None)
    if isinstance(b, str):
        b = base
    if "t" in kw:
        xs = xs[:2]
    with pytest.raises(ak.MergeError, match=match):
        ak.merge(xs, base=b, **kw)


def test_base_that_differs_from_the_ingredients_is_named():
    base, xs = family(2, (4, 3))
    sds = [{"w": x} for x in xs]
    with pytest.raises(ak.MergeError, match=r"base state dict is missing \['w'\]"):
        ak.merge(sds, method="ties", base={"v": base})
    with pytest.raises(ak.MergeError, match=r"base tensor 'w' has shape \(3, 4\)"):
        ak.merge(sds, method="ties", base={"w": base.T.contiguous()})


def test_methods_lists_every_method_with_parameters():
    listed = ak.methods()
    assert set(listed) == set(METHODS)
    assert listed["ties"]["params"]["density"]["default"] == 1.0
    assert listed["ties"]["base"] == "required" and listed["slerp"]["max_n"] == 2
    assert "optimizer" in listed["ame"]["params"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_keeps_a_nan_without_a_window_and_trims_it_with_one(backend):
    """No rank window: a NaN input reaches the output (the engine's finite check needs that); with a
    window, a NaN ranks nowhere and is dropped, the same on every backend."""
    from ame_kernels.methods.combine import CombinePlan, combine_torch

    be = ak.get_backend(backend)
    x = torch.randn(37)
    x[5] = float("nan")
    for plan in (CombinePlan(1, weight=[1.0]), CombinePlan(1, weight=[1.0], end_mag=[0.5], end_idx=[0])):
        out, want = torch.empty(37), torch.empty(37)
        be.combine([x], None, out, plan, 0)
        combine_torch([x], None, want, plan, 0)
        assert torch.equal(torch.isnan(out), torch.isnan(want))
        assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(want))
    assert torch.isnan(want).sum() == 0 and torch.isnan(out).sum() == 0  # the windowed plan dropped it


def test_sweep_over_a_method_parameter():
    """ak.sweep reaches every method: TIES densities ranked by a held-out score."""
    base, xs = family(3, (20, 10), seed=9)
    target = ak.merge(xs, method="ties", base=base, density=0.6, backend="reference")

    def evaluate(sd):
        return -float((sd - target).abs().sum())

    res = ak.sweep(xs, evaluate, {"method": ["ties"], "base": [base], "density": [0.2, 0.6, 0.9],
                                  "backend": ["reference"]})
    assert res.best_params["density"] == 0.6 and res.best_score == 0.0
    assert len(res.table) == 3
