"""Merge methods on the streaming engine and ame-merge: chunked == in memory, byte-identical
under torchrun, YAML keys used (never ignored), bad configs refused before any work."""

import filecmp
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import ame_kernels as ak
from ame_kernels.cli import main
from ame_kernels.engine import merge_checkpoints
from test_distributed import FLAGS, REPO, torchrun

BACKENDS = [b for b in ("reference", "cpu") if ak.available_backends()[b][0]]

CASES = [
    ("linear", {"weight": [0.2, 0.5, 0.3]}),
    ("task_arithmetic", {"weight": [0.3, 0.5, 0.2], "lambda": 0.7}),
    ("ties", {"density": 0.3}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("dare_linear", {"density": 0.4, "rescale": "inverse"}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("della_linear", {"density": [0.5, 1.0, 0.3], "epsilon": 0.1, "seed": 2}),  # an ingredient without bits
    ("della", {"density": 0.4, "epsilon": 0.15, "rescale": "inverse"}),  # divides by p: the probabilities path
    ("slerp", {"t": 0.3}),
    ("model_stock", {}),
]


def _family(root, n=3):
    torch.manual_seed(0)
    base = {"w": torch.randn(300, 70).to(torch.bfloat16), "b": torch.randn(70), "h": torch.randn(9, 7).half(),
            "i": torch.arange(3)}
    fts = [{k: ((v.float() + 0.1 * torch.randn(v.shape)).to(v.dtype) if v.dtype.is_floating_point else v)
            for k, v in base.items()} for _ in range(n)]
    paths = []
    for i, sd in enumerate(fts):
        os.makedirs(root / f"m{i}")
        save_file(sd, str(root / f"m{i}" / "model.safetensors"))
        paths.append(str(root / f"m{i}"))
    os.makedirs(root / "base")
    save_file(base, str(root / "base" / "model.safetensors"))
    return base, fts, paths, str(root / "base")


def _api_kw(kw):
    return {("lambda_" if k == "lambda" else "weights" if k == "weight" else k): v for k, v in kw.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, kw", CASES, ids=[c[0] for c in CASES])
def test_streamed_equals_in_memory(tmp_path, backend, name, kw):
    """Chunks of 4096 elements (a 21000-element tensor in 6 chunks; per-row methods whole rows):
    the same bytes as ak.merge on the whole tensors, with the reference backend as the oracle."""
    base, fts, paths, bpath = _family(tmp_path)
    needs_base = ak.methods()[name]["base"] == "required"
    xs, sds = (paths[:2], fts[:2]) if name == "slerp" else (paths, fts)
    merge_checkpoints(xs, str(tmp_path / "out"), method=name, base=bpath if needs_base else None, chunk_mb=0.02,
                      backend=backend, **kw)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = ak.merge(sds, method=name, base=base if needs_base else None, backend="reference", **_api_kw(kw))
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), f"{name} {backend}: tensor {k} differs"
    prov = yaml.safe_load((tmp_path / "out" / "ame_merge.yaml").read_text())
    assert prov["method"] == name and prov["config"]["method"] == name


def test_torchrun_is_byte_identical_for_methods(tmp_path):
    _, _, paths, bpath = _family(tmp_path)
    for name, kw in [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5, "seed": 5})]:
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({"method": name, "base": bpath, "models": paths, "chunk_mb": 0.02,
                                       "shard_size": "20kB", **kw}))
        one, two = tmp_path / f"{name}1", tmp_path / f"{name}2"
        single = subprocess.run([sys.executable, "-m", "ame_kernels", str(cfg), str(one), *FLAGS], cwd=REPO,
                                capture_output=True, text=True)
        assert single.returncode == 0, single.stderr
        dist = torchrun(cfg, two)
        assert dist.returncode == 0, dist.stderr[-3000:]
        files = sorted(f for f in os.listdir(one) if f != "ame_merge.yaml")
        assert sum(f.endswith(".safetensors") for f in files) > 1
        _, mismatch, errors = filecmp.cmpfiles(one, two, files, shallow=False)
        assert not mismatch and not errors, (name, mismatch, errors)


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_yaml_method_keys_reach_the_merge(tmp_path, capsys):
    """method:, base:, per-model weight/density and top-level lambda are all used."""
    base, fts, paths, bpath = _family(tmp_path)
    doc = {"method": "ties", "base": bpath, "lambda": 0.5,
           "models": [{"path": p, "weight": w, "density": d} for p, w, d in zip(paths, [1.0, 0.5, 0.25], [0.2, 0.5, 0.9])]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    code, out, err = _cli(capsys, tmp_path / "c.yaml", "--dry-run")
    assert code == 0, err
    assert "method: ties" in out and "density [0.2, 0.5, 0.9]" in out and "lambda 0.5" in out
    code, _, err = _cli(capsys, tmp_path / "c.yaml", tmp_path / "out", "--quiet")
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = ak.merge(fts, method="ties", base=base, weights=[1.0, 0.5, 0.25], density=[0.2, 0.5, 0.9], lambda_=0.5,
                    backend="reference")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_weighted_soup_with_a_base_is_task_arithmetic(tmp_path, capsys):
    """strategy: weighted_soup, normalize: false, base: ... used to ignore the base (sum a_i x_i)."""
    base, fts, paths, bpath = _family(tmp_path)
    a = [0.5, 0.25, 0.75]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"strategy": "weighted_soup", "weights": a, "normalize": False,
                                                      "base": bpath, "models": paths}))
    code, _, err = _cli(capsys, tmp_path / "c.yaml", tmp_path / "out", "--quiet", "--out-dtype", "float32")
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["b"]
    want = base["b"] + sum(ai * (x["b"] - base["b"]) for ai, x in zip(a, fts))
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, sum(ai * x["b"] for ai, x in zip(a, fts)), atol=1e-3)


def test_bare_models_list_is_the_uniform_soup(tmp_path, capsys):
    _, fts, paths, _ = _family(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"models": paths}))
    code, out, _ = _cli(capsys, tmp_path / "c.yaml", "--dry-run")
    assert code == 0 and "method: linear" in out
    code, _, _ = _cli(capsys, tmp_path / "c.yaml", tmp_path / "out", "--quiet", "--out-dtype", "float32")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["b"]
    assert torch.allclose(got, torch.stack([x["b"] for x in fts]).mean(0), atol=1e-7)


@pytest.mark.parametrize("doc, match", [
    ({"method": "tiez"}, "unknown method 'tiez' (did you mean 'ties'?)"),
    ({"method": "ties", "base": "BASE", "density": 2}, "density: must be in [0, 1], got 2"),
    ({"method": "ties"}, "needs a base model"),
    ({"method": "breadcrumbs", "base": "BASE", "density": 0.95, "gamma": 0.1}, "gamma + density must be <= 1"),
    ({"method": "ties", "base": "BASE", "weight": [1, 2]}, "weight has 2 values but there are 3 ingredients"),
    ({"method": "slerp"}, "takes exactly 2 ingredients, got 3"),
    ({"method": "ties", "base": "BASE", "lr": 0.1}, "'lr' is an option of method 'ame'"),
    ({"method": "linear", "densty": 0.5}, "unknown key 'densty' (did you mean 'density'?)"),
    ({"method": "slerp", "t": 2}, "t: must be in [0, 1]"),
    ({"density": 0.5}, "'density' given without a method"),
])
def test_bad_method_configs_exit_2_before_any_work(tmp_path, capsys, doc, match):
    _, _, paths, bpath = _family(tmp_path)
    doc = {k: (bpath if v == "BASE" else v) for k, v in doc.items()}
    models = paths[:2] if doc.get("t") is not None else paths
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"models": models, **doc}))
    code, _, err = _cli(capsys, tmp_path / "c.yaml", tmp_path / "out")
    assert code == 2 and match in err, err
    assert not (tmp_path / "out").exists()


def test_a_nan_hidden_by_a_mask_is_still_reported(tmp_path, capsys):
    """TIES would trim a NaN (it ranks nowhere) and DARE may drop one: both are named, not merged."""
    base, fts, paths, bpath = _family(tmp_path)
    fts[1]["w"][5, 5] = float("nan")
    save_file(fts[1], str(tmp_path / "m1" / "model.safetensors"))
    # the last: no trimming, but the election outvotes a NaN (a NaN vote elects -1, a NaN agrees with nothing)
    for doc in ({"method": "ties", "density": 0.2}, {"method": "dare_linear", "density": 0.3, "rescale": "none"},
                {"method": "ties", "density": 1.0}):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({"models": paths, "base": bpath, **doc}))
        code, _, err = _cli(capsys, tmp_path / "c.yaml", tmp_path / "out", "--quiet")
        assert code == 1 and "tensor 'w': NaN or Inf in ingredient 1" in err, err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("transform, kw", [("dare", dict(density=0.4)), ("ties", dict(density=0.3)),
                                            ("breadcrumbs", dict(density=0.5, gamma=0.1))])
def test_transforms_under_ame_stream_like_in_memory(tmp_path, transform, kw):
    base, fts, paths, bpath = _family(tmp_path)
    merge_checkpoints(paths, str(tmp_path / "out"), optimizer="adam", lr=1e-2, epochs=2, transform=transform,
                      base=bpath, seed=2, chunk_mb=0.02, backend="reference", **kw)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = ak.merge(fts, optimizer="adam", lr=1e-2, epochs=2, transform=transform, base=base, seed=2,
                    backend="reference", **kw)
    assert all(torch.equal(got[k], want[k]) for k in want)
    plain = ak.merge(fts, optimizer="adam", lr=1e-2, epochs=2, backend="reference")
    assert not torch.equal(plain["w"], want["w"])  # the transform changed what AME averaged


def test_transform_semantics():
    """GD soup (lr 1, fixed pivot) over DARE-dropped ingredients == dare_linear with weights 1/N;
    the TIES transform zeroes entries against the elected sign."""
    torch.manual_seed(1)
    base = torch.randn(30, 20)
    xs = [base + 0.1 * torch.randn(30, 20) for _ in range(3)]
    soup = dict(optimizer="sgd", lr=1.0, lr_schedule="constant", adaptive_pivot=False, pivot=0)
    a = ak.merge(xs, **soup, transform="dare", base=base, density=0.5, seed=4, rescale="inverse")
    b = ak.merge(xs, method="dare_linear", base=base, density=0.5, seed=4, rescale="inverse", weights=[1 / 3] * 3)
    assert torch.allclose(a, b, atol=1e-6)
    x = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-1.0, 1.0, 1.0]), torch.tensor([2.0, 1.0, -5.0])]
    t = ak.merge(x, **soup, transform="ties", base=torch.zeros(3), density=1.0)
    assert torch.allclose(t, torch.tensor([3.0, 2.0, -5.0]) / 3)
    with pytest.raises(ak.MergeError, match="transform 'dare' needs a base"):
        ak.merge(xs, optimizer="adam", transform="dare", density=0.5)
    with pytest.raises(ak.MergeError, match="unknown transform 'dar'"):
        ak.merge(xs, optimizer="adam", transform="dar", base=base)
    with pytest.raises(ak.MergeError, match="transform 'ties' takes density, consensus, not 'gamma'"):
        ak.merge(xs, optimizer="adam", transform="ties", base=base, gamma=0.1)
    with pytest.raises(ak.MergeError, match="transform is an option of method 'ame'"):
        ak.merge(xs, method="ties", transform="dare", base=base)
