"""Hugging Face IDs not in the local cache are downloaded when allowed (ame_kernels/io/hub.py).

No network: a fake ``huggingface_hub`` module (monkeypatched into sys.modules) whose
snapshot_download lays out a snapshot folder in the real cache layout and records its calls."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "mergekit_refs"))
import make_refs  # noqa: E402
from test_mergekit_yaml import mroot  # noqa: E402,F401  (the tiny mergekit-family models, written once per module)

COMMIT = "c" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch, mroot):
    """(cache, calls, fake module): org/ftK serves models/ftK; 'raise' makes the next call fail."""
    root, _ = mroot
    cache = tmp_path / "hub"
    calls = []
    mod = types.ModuleType("huggingface_hub")
    mod.fail = None

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, allow_patterns=None, **kw):
        calls.append({"repo_id": repo_id, "revision": revision, "cache_dir": cache_dir,
                      "allow_patterns": list(allow_patterns or []), **kw})
        if mod.fail is not None:
            raise mod.fail
        src = os.path.join(root, repo_id.split("/")[1])
        d = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
        snap = os.path.join(d, "snapshots", COMMIT)
        os.makedirs(snap, exist_ok=True)
        for f in os.listdir(src):
            if any(__import__("fnmatch").fnmatch(f, p) for p in allow_patterns):
                with open(os.path.join(src, f), "rb") as a, open(os.path.join(snap, f), "wb") as b:
                    b.write(a.read())
        os.makedirs(os.path.join(d, "refs"), exist_ok=True)
        with open(os.path.join(d, "refs", revision or "main"), "w") as f:
            f.write(COMMIT)
        return snap

    mod.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", mod)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache, calls, mod


def _run(tmp_path, text, name="m.yml", out="out"):
    from ame_kernels.cli import main

    p = tmp_path / name
    p.write_text(text)
    return main([str(p), str(tmp_path / out), "-q"]), p


TEXT = ("merge_method: linear\nmodels:\n  - model: org/ft0\n    parameters: {weight: 1}\n"
        "  - model: org/ft1@v1\n    parameters: {weight: 3}\ndtype: float32\n")


def test_a_missing_id_is_downloaded_with_its_revision(mroot, hub, tmp_path):
    _, f32 = mroot
    cache, calls, _ = hub
    rc, _ = _run(tmp_path, TEXT)
    assert rc == 0
    assert [(c["repo_id"], c["revision"]) for c in calls] == [("org/ft0", None), ("org/ft1", "v1")]
    assert all(c["cache_dir"] == str(cache) and "*.safetensors" in c["allow_patterns"]
               and "*.json" in c["allow_patterns"] for c in calls)
    got = make_refs.load_dir(str(tmp_path / "out"))
    n = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_allclose(got[n], (f32["ft0"][n] + 3.0 * f32["ft1"][n]) / 4, rtol=1e-6, atol=1e-7)
    # now cached: not downloaded again
    calls.clear()
    rc, _ = _run(tmp_path, TEXT, "m2.yml", "out2")
    assert rc == 0 and calls == []


def test_offline_mode_is_a_clear_error_without_a_download(hub, tmp_path, monkeypatch, capsys):
    _, calls, _ = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, p = _run(tmp_path, TEXT)
    assert rc == 2 and calls == []
    err = capsys.readouterr().err
    assert str(p) in err and "models[0].model" in err and "'org/ft0'" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "out").exists()


def test_a_failed_download_names_the_id(hub, tmp_path, capsys):
    _, calls, mod = hub
    mod.fail = OSError("Connection refused")
    rc, p = _run(tmp_path, TEXT)
    assert rc == 2 and len(calls) == 1
    err = capsys.readouterr().err
    assert "models[0].model" in err and "'org/ft0'" in err and "downloading it failed" in err
    assert "Connection refused" in err and not (tmp_path / "out").exists()


def test_without_huggingface_hub_it_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    rc, _ = _run(tmp_path, TEXT)
    assert rc == 2
    err = capsys.readouterr().err
    assert "'org/ft0'" in err and "pip install huggingface_hub" in err


def test_a_repo_without_safetensors_fetches_the_torch_files(hub, tmp_path):
    from ame_kernels.io.hub import ALLOW_PATTERNS, TORCH_PATTERNS, resolve_hf_id

    _, _, mod = hub
    real, asked = mod.snapshot_download, []

    def no_weights(repo_id, **kw):  # a repo with configs only: no *.safetensors come back
        asked.append(kw["allow_patterns"])
        return real(repo_id, **{**kw, "allow_patterns": ["*.json"]})

    mod.snapshot_download = no_weights
    snap = resolve_hf_id("org/ft0", "x")
    assert os.path.isfile(os.path.join(snap, "config.json"))
    assert asked == [ALLOW_PATTERNS, TORCH_PATTERNS]
