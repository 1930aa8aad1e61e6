"""Parity with mergekit's own outputs, without mergekit: the references are stored.

benchmarks/mergekit_refs/ holds mergekit-yaml's merges (mergekit version in its
MANIFEST.json) of tiny Llama-shaped checkpoints that ``models.py`` regenerates bitwise
with numpy (the digests in MANIFEST.json are checked first). Each test reruns the
recorded config through ``ak.merge(..., method=...)`` and compares.

Deterministic methods (linear, task_arithmetic, ties, breadcrumbs(_ties), slerp,
model_stock): |ours - mergekit| <= ATOL = 5e-7 absolute on every entry, both float32.
Why that number: every stored output matches a float64 evaluation of the semantics
in MANIFEST.json["semantics"] to <= 2.2e-7 (make_refs.py checks it, and
test_references_match_stated_semantics here), i.e. mergekit's own float32 rounding,
~2 ulp at |x| ~ 1 (the norm gains); 5e-7 is 3.2e-5 of the largest task-vector entry
(2**-6). A semantic difference cannot hide under it: the inputs sit on an exact grid
with every task-vector entry nonzero, |entry| >= 2**-14 = 6.1e-5 and all magnitudes
distinct within a tensor, so one entry kept/dropped/elected differently moves the
output by >= 6.1e-5 * weight * lambda (> 3e-5 here), 60x ATOL.

Random methods (dare_linear, dare_ties, della, della_linear: mergekit draws its masks
with torch.bernoulli), one fine-tune of weight 1 so ``out - base`` is the sparsified
task vector: the kept fraction (out != base) within a 5-sigma binomial band of the
density (whole model and each tensor; for DELLA each rank quintile against its mean
keep probability), and every kept entry scaled by mergekit's rule for the installed
version (L1: sum|tau| / sum|kept tau| over the whole tensor; 1 with rescale false),
checked on our own mask to float32 rounding. The stored mergekit masks pass the same
statistical checks (so the test's bands are known to accept mergekit itself).

Every test skips, saying why, while ``ak.merge`` lacks ``method=`` or the parameter
a config uses (so this file is useful the moment the API lands).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFS = os.path.join(ROOT, "benchmarks", "mergekit_refs")
sys.path.insert(0, REFS)
import models as mkmodels  # noqa: E402  (benchmarks/mergekit_refs/models.py: numpy only)

ATOL = 5e-7
SIGMAS = 5.0

with open(os.path.join(REFS, "MANIFEST.json")) as _f:
    MANIFEST = json.load(_f)
CONFIGS = {c["name"]: c for c in MANIFEST["configs"]}
EXACT = [n for n, c in CONFIGS.items() if c["kind"] == "exact"]
RANDOM = [n for n, c in CONFIGS.items() if c["kind"] == "random"]


@pytest.fixture(scope="module")
def inputs():
    f32 = mkmodels.models_f32()
    for key, sd in f32.items():
        assert mkmodels.digest(sd) == MANIFEST["models"]["digests"][key], (
            f"models.py no longer reproduces {key!r} bitwise (numpy's random streams changed?): "
            "the stored mergekit references do not apply; regenerate them with make_refs.py")
    return f32


def _load(fn):
    from safetensors.numpy import load_file

    return load_file(os.path.join(REFS, fn))


def _ak():
    ak = pytest.importorskip("ame_kernels")
    if "method" not in inspect.signature(ak.merge).parameters:
        pytest.skip("ak.merge takes no method= yet (the merge-method API has not landed)")
    return ak


def _torch(sd, names=None):
    return {n: torch.from_numpy(np.array(sd[n])) for n in (names or sd)}


def _call(ak, cfg, f32, names=None, **extra):
    """ak.merge with the recorded config's parameters; defaults stay defaults (not passed)."""
    meth = cfg["method"]
    P = dict(cfg["parameters"])
    kw = {"method": meth, "out_dtype": "float32"}
    if meth == "slerp":  # ingredients [base_model, other], t = 0 gives the first; no base
        ings = [e["model"] for e in cfg["models"]]
    else:
        ings = [e["model"] for e in cfg["models"]]
        if cfg["base"]:
            kw["base"] = _torch(f32[cfg["base"]], names)
    per = [k for k in ("weight", "density", "gamma", "epsilon") if any(k in e for e in cfg["models"])]
    for k in per:
        vals = [e[k] for e in cfg["models"]]
        kw["weights" if k == "weight" else k] = vals
    if "lambda" in P:
        kw["lambda_"] = P.pop("lambda")
    kw.update(P)
    kw.update(extra)
    try:
        return ak.merge([_torch(f32[i], names) for i in ings], **kw)
    except (TypeError, ValueError) as e:  # MergeError is a ValueError
        msg = str(e)
        if "unknown method" in msg or "has no parameter" in msg or "unexpected keyword" in msg:
            pytest.skip(f"ak.merge cannot run mergekit config {cfg['name']!r} yet: {msg}")
        raise


# ---- always runnable: the stored references themselves ---------------------------------

def test_inputs_regenerate_bitwise(inputs):
    assert set(inputs) == set(mkmodels.NAMES)
    for sd in inputs.values():
        assert [n for n in sd] == [n for n, _ in mkmodels.shapes()]


@pytest.mark.parametrize("name", EXACT)
def test_references_match_stated_semantics(inputs, name):
    """MANIFEST.json's semantics, evaluated in float64, reproduce mergekit's stored output."""
    import make_refs  # benchmarks/mergekit_refs: no mergekit import at module level

    cfg = CONFIGS[name]
    ref = _load(cfg["file"])
    for n, _ in mkmodels.shapes():
        np.testing.assert_allclose(ref[n], make_refs.oracle(cfg, inputs, n), rtol=0, atol=ATOL / 2,
                                   err_msg=f"{name}: {n}")


# ---- deterministic methods: values ----------------------------------------------------

def _compare(name, ours, ref, names):
    for n in names:
        got = ours[n]
        assert got.dtype == torch.float32, (name, n, got.dtype)
        diff = np.abs(got.numpy().astype(np.float64) - ref[n])
        bad = int((diff > ATOL).sum())
        assert bad == 0, (f"{name}: {n}: {bad} of {diff.size} entries differ from mergekit by more than "
                          f"{ATOL:g} (worst {diff.max():.3g}; task-vector scale {mkmodels.task_vector_scale():g})")


@pytest.mark.parametrize("name", EXACT)
def test_parity_exact(inputs, name):
    ak = _ak()
    cfg = CONFIGS[name]
    ref = _load(cfg["file"])
    t = cfg["parameters"].get("t")
    if isinstance(t, list):
        # mergekit's gradient: one scalar t per tensor (layer i of L at i/(L-1), the rest at 0),
        # run here as one ak.merge per distinct t so a scalar-t API is tested too
        groups = {}
        for n, _ in mkmodels.shapes():
            tv = CONFIGS[name].get("t_per_tensor", {}).get(n)
            if tv is None:
                import make_refs

                tv = make_refs.slerp_t(n, t, mkmodels.SPEC["layers"])
            groups.setdefault(tv, []).append(n)
        for tv, names in groups.items():
            ours = _call(ak, {**cfg, "parameters": {**cfg["parameters"], "t": tv}}, inputs, names)
            _compare(f"{name} (t={tv:g})", ours, ref, names)
        return
    ours = _call(ak, cfg, inputs)
    _compare(name, ours, ref, [n for n, _ in mkmodels.shapes()])


def test_slerp_gradient_list(inputs):
    """A per-layer t list, mergekit style, in one call (skips while ak.merge takes one t)."""
    ak = _ak()
    cfg = CONFIGS["slerp_gradient"]
    try:
        ours = _call(ak, cfg, inputs)
    except (TypeError, ValueError) as e:
        if "t" in str(e):
            pytest.skip(f"ak.merge takes no per-layer t list: {e}")
        raise
    _compare("slerp_gradient", ours, _load(cfg["file"]), [n for n, _ in mkmodels.shapes()])


# ---- random methods: statistics and the rescale rule ---------------------------------

def _band(k, n, p):
    return abs(k - n * p) <= SIGMAS * math.sqrt(max(n * p * (1 - p), 1e-12)) + 1


def _della_probs(delta, density, eps):
    d2 = delta.reshape(1, -1) if delta.ndim == 1 else delta
    rank = np.argsort(np.argsort(np.abs(d2), axis=1, kind="stable"), axis=1, kind="stable")
    return density - eps + 2 * eps * rank / max(d2.shape[1] - 1, 1), d2.shape


def _check_masks(label, cfg, f32, kept_by_name, scaled_by_name=None):
    """kept_by_name: name -> bool mask; scaled_by_name: name -> (out - base) for the rescale rule."""
    e = cfg["models"][0]
    d, meth = e["density"], cfg["method"]
    della = meth.startswith("della")
    eps = e.get("epsilon", 0.15)
    rescale = cfg["parameters"].get("rescale", True)
    base, ft = f32["base"], f32[e["model"]]
    total_k = total_n = 0
    qk, qn, qp, qv = np.zeros(5), np.zeros(5), np.zeros(5), np.zeros(5)
    for n, _ in mkmodels.shapes():
        tau = ft[n].astype(np.float64) - base[n]
        kept = kept_by_name[n]
        total_k += int(kept.sum())
        total_n += kept.size
        if della:
            p, shp = _della_probs(tau, d, eps)
            assert abs(kept.sum() - p.sum()) <= SIGMAS * math.sqrt((p * (1 - p)).sum()) + 1, (label, n)
            q = np.minimum((np.argsort(np.argsort(np.abs(tau.reshape(shp)), 1), 1) * 5) // shp[1], 4)
            for i in range(5):
                sel = q == i
                qk[i] += kept.reshape(shp)[sel].sum()
                qn[i] += sel.sum()
                qp[i] += p[sel].sum()
                qv[i] += (p[sel] * (1 - p[sel])).sum()
        else:
            assert _band(int(kept.sum()), kept.size, d), (label, n, int(kept.sum()), kept.size, d)
        if scaled_by_name is not None:
            got = scaled_by_name[n]
            assert np.all(got[~kept] == 0)
            ratio = got[kept] / tau[kept]
            expect = np.abs(tau).sum() / np.abs(tau[kept]).sum() if rescale else 1.0
            # out is float32 near |base|: the ratio carries ulp(out) / |tau| of rounding noise
            out_abs = np.abs(base[n][kept].astype(np.float64) + got[kept]).astype(np.float32)
            tol = 2 * np.spacing(out_abs) / np.abs(tau[kept]) + 1e-6
            assert np.all(np.abs(ratio - expect) <= tol), (
                f"{label}: {n}: kept entries scaled by {np.median(ratio):.6g}, mergekit's rule gives "
                f"{expect:.6g} ({'sum|tau|/sum|kept tau|' if rescale else 'no rescale'})")
    if della:
        for i in range(5):  # rank quintile i: larger |tau| is kept more often
            assert abs(qk[i] - qp[i]) <= SIGMAS * math.sqrt(qv[i]) + 1, (label, i, qk[i] / qn[i], qp[i] / qn[i])
    else:
        assert _band(total_k, total_n, d), (label, total_k / total_n, d)


def _mk_masks(cfg):
    rec = _load(cfg["file"])
    out = {}
    for n, shape in mkmodels.shapes():
        size = int(np.prod(shape))
        out[n] = np.unpackbits(rec[n + ".mask"])[:size].reshape(shape).astype(bool)
    return out, rec


@pytest.mark.parametrize("name", RANDOM)
def test_mergekit_masks_pass_the_statistics(inputs, name):
    """The bands below accept mergekit's own draws, and its scale is the recorded rule."""
    cfg = CONFIGS[name]
    masks, rec = _mk_masks(cfg)
    base, ft = inputs["base"], inputs[cfg["models"][0]["model"]]
    scaled = {}
    for n, _ in mkmodels.shapes():
        tau = ft[n].astype(np.float64) - base[n]
        scaled[n] = np.where(masks[n], tau * float(rec[n + ".scale"][0]), 0.0)
    _check_masks(f"mergekit {name}", cfg, inputs, masks, scaled)


@pytest.mark.parametrize("name", RANDOM)
def test_parity_random(inputs, name):
    ak = _ak()
    cfg = CONFIGS[name]
    ours = _call(ak, cfg, inputs, seed=0)
    base = inputs["base"]
    kept, scaled = {}, {}
    for n, _ in mkmodels.shapes():
        got = ours[n].numpy().astype(np.float64) - base[n]
        kept[n] = got != 0  # no task-vector entry is 0 (models.py), so a dropped one leaves base exactly
        scaled[n] = got
    _check_masks(f"ame {name}", cfg, inputs, kept, scaled)


def test_random_seed_changes_the_mask(inputs):
    ak = _ak()
    cfg = CONFIGS["dare_linear"]
    n = "model.embed_tokens.weight"
    a = _call(ak, cfg, inputs, seed=0)[n]
    b = _call(ak, cfg, inputs, seed=0)[n]
    c = _call(ak, cfg, inputs, seed=1)[n]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
