"""Soupability diagnostics on families with known cosine / L2, streamed from memory and from disk.

Diagnostics do not run a kernel backend (float64 Gram matrices on the host), so nothing here is
parametrized by backend.
"""

import json
import math

import numpy as np
import pytest
import torch
import yaml

import ame_kernels as ak
from ame_kernels.diagnostics import DEFAULT_THRESHOLDS, diagnostics, inspect_main, soup_gain


def _orthonormal(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q.T  # [k, d], rows orthonormal


def _split(v):
    """A 1-D float64 vector of 60 elements as a 'model': two tensors of odd shapes plus an int buffer."""
    return {"layer.weight": v[:35].reshape(5, 7).float(), "layer.bias": v[35:].float(), "count": torch.tensor([4])}


def _known_family(theta=0.3):
    """x0 = 3e, x1 = 3(cos t e + sin t f), x2 = 2f: cosines cos t, 0, sin t; L2 by the law of cosines."""
    e, f = _orthonormal(60, 2)
    vs = [3 * e, 3 * (math.cos(theta) * e + math.sin(theta) * f), 2 * f]
    return vs, [_split(v) for v in vs]


def _numpy_oracle(vs):
    x = np.stack([v.float().double().numpy() for v in vs])  # the fp32 values the tensors hold
    n = len(vs)
    norms = np.linalg.norm(x, axis=1)
    cos = np.array([[x[i] @ x[j] / (norms[i] * norms[j]) for j in range(n)] for i in range(n)])
    l2 = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
    soup = x.mean(0)
    return norms, cos, l2, np.linalg.norm(x - soup, axis=1), np.linalg.norm(soup) / norms.mean()


def test_known_cosine_and_l2():
    theta = 0.3
    vs, sds = _known_family(theta)
    d = diagnostics(sds)
    c = math.cos(theta)
    expected_cos = np.array([[1, c, 0], [c, 1, math.sin(theta)], [0, math.sin(theta), 1]])
    np.testing.assert_allclose(d.model.cosine, expected_cos, atol=1e-6)
    expected_l2 = np.array([
        [0, 3 * math.sqrt(2 - 2 * c), math.sqrt(13)],
        [3 * math.sqrt(2 - 2 * c), 0, math.sqrt(9 + 4 - 12 * math.sin(theta))],
        [math.sqrt(13), math.sqrt(9 + 4 - 12 * math.sin(theta)), 0],
    ])
    np.testing.assert_allclose(d.model.l2, expected_l2, rtol=1e-6)
    norms, cos, l2, dist, ratio = _numpy_oracle(vs)
    np.testing.assert_allclose(d.model.norms, [3, 3, 2], rtol=1e-6)
    np.testing.assert_allclose(d.model.dist_to_soup, dist, rtol=1e-9)
    assert d.model.norm_ratio == pytest.approx(ratio, rel=1e-9)
    assert d.model.numel == 60 and d.skipped == ["count"] and set(d.tensors) == {"layer.weight", "layer.bias"}


def test_per_tensor_stats_match_numpy():
    vs, sds = _known_family()
    d = diagnostics(sds)
    for name in ("layer.weight", "layer.bias"):
        norms, cos, l2, dist, ratio = _numpy_oracle([sd[name].reshape(-1) for sd in sds])
        s = d.tensors[name]
        np.testing.assert_allclose(s.norms, norms, rtol=1e-12)
        np.testing.assert_allclose(s.cosine, cos, atol=1e-12)
        np.testing.assert_allclose(s.l2, l2, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(s.dist_to_soup, dist, rtol=1e-9, atol=1e-12)


def test_task_vectors_against_base():
    """x_i = base + v_i: cosines are the v_i's; L2 and distances to the soup do not depend on the base."""
    vs, _ = _known_family(0.7)
    base = torch.randn(60, dtype=torch.float64) * 10
    sds = [_split(base + v) for v in vs]
    d = diagnostics(sds, base=_split(base))
    assert d.relative_to == "task vectors"
    np.testing.assert_allclose(d.model.cosine[0, 1], math.cos(0.7), atol=1e-5)
    np.testing.assert_allclose(d.model.cosine[0, 2], 0.0, atol=1e-5)
    plain = diagnostics(sds)
    np.testing.assert_allclose(d.model.l2, plain.model.l2, rtol=1e-12)
    assert plain.model.cosine.min() > 0.9  # weights dominated by the shared base: similar


def test_streaming_chunks_do_not_change_the_result():
    sds = [{"a": torch.randn(64, 33), "b": torch.randn(1000)} for _ in range(4)]
    big = diagnostics(sds)
    tiny = diagnostics(sds, chunk_mb=100 * 8 / 2**20)  # 100 elements per chunk: many partial chunks
    for attr in ("cosine", "l2", "dist_to_soup", "norms"):
        np.testing.assert_allclose(getattr(tiny.model, attr), getattr(big.model, attr), rtol=1e-10, atol=1e-12)


def test_close_ingredients_keep_precision():
    """Distances ~1e-6 on weights ~1: the centred Gram matrix keeps them (a raw one would cancel)."""
    base = torch.randn(5000, dtype=torch.float64)
    deltas = [torch.randn(5000, dtype=torch.float64) * 1e-6 for _ in range(3)]
    xs = [(base + dl).float() for dl in deltas]
    d = diagnostics(xs)
    _, _, l2, dist, _ = _numpy_oracle(xs)
    np.testing.assert_allclose(d.model.l2, l2, rtol=1e-6)
    np.testing.assert_allclose(d.model.dist_to_soup, dist, rtol=1e-6)
    assert any(f["code"] == "near_duplicates" for f in d.flags) and d.soupable  # a note, not a warning


def test_flags():
    # independent random weights: no shared trajectory, soup shrinks
    indep = diagnostics([torch.randn(2000) for _ in range(4)])
    codes = {f["code"] for f in indep.flags}
    assert {"low_similarity", "norm_shrinkage", "tensor_norm_shrinkage"} <= codes and not indep.soupable
    # fine-tunes of one model: soupable, no warnings
    base = torch.randn(2000)
    fine = diagnostics([base + 0.05 * torch.randn(2000) for _ in range(4)])
    assert fine.soupable and not [f for f in fine.flags if f["level"] == "warning"]
    # opposing task vectors
    v = torch.randn(2000)
    opp = diagnostics([base + v, base - v + 0.1 * torch.randn(2000)], base=base)
    assert "opposing_task_vectors" in {f["code"] for f in opp.flags} and not opp.soupable
    # an outlier among fine-tunes
    far = diagnostics([base + 0.05 * torch.randn(2000) for _ in range(4)] + [base + 2.0 * torch.randn(2000)])
    assert any(f["code"] == "outlier" and "[4]" in f["message"] for f in far.flags)
    # thresholds are overridable (and checked)
    relaxed = diagnostics([torch.randn(2000) for _ in range(3)], thresholds={"min_cosine": -1.0, "min_norm_ratio": 0.0,
                                                                           "min_tensor_norm_ratio": 0.0})
    assert relaxed.soupable
    with pytest.raises(ak.MergeError, match="unknown threshold"):
        diagnostics([torch.randn(3), torch.randn(3)], thresholds={"cosine": 0.5})
    assert set(DEFAULT_THRESHOLDS) >= {"min_cosine", "outlier"}


def test_checkpoint_paths_stream_from_disk(tmp_path):
    """Paths are read through the engine's reader (bf16 included) and agree with the in-memory tensors."""
    from safetensors.torch import save_file

    sds = [{"w": torch.randn(9, 11).to(torch.bfloat16), "b": torch.randn(13), "n": torch.arange(4)} for _ in range(3)]
    paths = []
    for i, sd in enumerate(sds):
        p = tmp_path / f"m{i}"
        p.mkdir()
        save_file(sd, str(p / "model.safetensors"))
        paths.append(str(p))
    from_disk = diagnostics(paths, chunk_mb=50 * 8 / 2**20)
    in_memory = diagnostics(sds)
    np.testing.assert_allclose(from_disk.model.cosine, in_memory.model.cosine, rtol=1e-12)
    np.testing.assert_allclose(from_disk.model.l2, in_memory.model.l2, rtol=1e-12)
    assert from_disk.labels == paths and from_disk.skipped == ["n"]

    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"path": f"m{i}", "score": 0.5} for i in range(3)], "optimizer": "adam"}))
    assert inspect_main([str(cfg)]) == 0
    assert inspect_main([str(cfg), "--json"]) == 0
    assert inspect_main([str(cfg), "--base", paths[0]]) == 0
    assert inspect_main([str(tmp_path / "missing.yaml")]) == 2


def test_inspect_output(tmp_path, capsys):
    from safetensors.torch import save_file

    for i in range(2):
        save_file({"x": torch.randn(20) + 5}, str(tmp_path / f"m{i}.safetensors"))
    (tmp_path / "c.yaml").write_text("models:\n  - m0.safetensors\n  - path: m1.safetensors\n")
    assert inspect_main([str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "pairwise cosine similarity" in out and "pairwise L2 distance" in out and "threshold checks" in out
    assert inspect_main([str(tmp_path / "c.yaml"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n"] == 2 and len(doc["model"]["cosine"]) == 2 and "x" in doc["tensors"]


def test_soup_gain():
    assert soup_gain(0.8, [1.0, 0.9]) == pytest.approx(0.1)  # min loss - soup loss
    assert soup_gain(1.2, [1.0, 0.9]) == pytest.approx(-0.3)
    assert soup_gain(0.75, [0.7, 0.72], higher_is_better=True) == pytest.approx(0.03)
    with pytest.raises(ak.MergeError, match="at least one"):
        soup_gain(1.0, [])
    with pytest.raises(ak.MergeError, match="finite"):
        soup_gain(float("nan"), [1.0])


def test_bad_input():
    with pytest.raises(ak.MergeError, match="at least 2"):
        diagnostics([torch.zeros(3)])
    with pytest.raises(ak.MergeError, match="shape"):
        diagnostics([{"a": torch.zeros(3)}, {"a": torch.zeros(4)}])
    with pytest.raises(ak.MergeError, match="missing \\['b'\\]"):
        diagnostics([{"a": torch.zeros(3), "b": torch.zeros(1)}, {"a": torch.zeros(3)}])
    with pytest.raises(ak.MergeError, match="NaN or Inf in ingredient 1"):
        diagnostics([torch.zeros(3), torch.tensor([1.0, float("inf"), 0.0])])
    with pytest.raises(ak.MergeError, match="base lacks"):
        diagnostics([{"a": torch.ones(3)}, {"a": torch.ones(3)}], base={"b": torch.ones(3)})
    with pytest.raises(ak.MergeError, match="no such file"):
        diagnostics(["/nonexistent/a", "/nonexistent/b"])
    with pytest.raises(ak.MergeError, match="chunk_mb"):
        diagnostics([torch.zeros(3), torch.ones(3)], chunk_mb=0)
