"""The ``mergekit-yaml`` console script (ame_kernels/mergekit_yaml.py): declared, runs a mergekit
config end to end, and hands to mergekit's own entry only what mergekit runs and this engine
refuses (a fake ``mergekit`` package on sys.path records the argv it was handed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFS = os.path.join(ROOT, "benchmarks", "mergekit_refs")
sys.path.insert(0, REFS)
import make_refs  # noqa: E402
import models as mkmodels  # noqa: E402

MKVENV_PYTHON = os.environ.get("AME_MERGEKIT_PYTHON", "/work/mkvenv/bin/python")
LINEAR = ("merge_method: linear\nmodels:\n  - model: R/ft0\n    parameters: {weight: 1}\n"
          "  - model: R/ft1\n    parameters: {weight: 3}\ndtype: float32\n")


@pytest.fixture(scope="module")
def mroot(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mkmodels"))
    f32 = mkmodels.models_f32()
    make_refs.write_models(root, f32)
    return root, f32


@pytest.fixture
def fake_mergekit(tmp_path, monkeypatch):
    """A ``mergekit`` package whose run_yaml.main records sys.argv to a file and exits 0; the log path."""
    pkg = tmp_path / "fakemk" / "mergekit"
    (pkg / "scripts").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "scripts" / "__init__.py").write_text("")
    log = tmp_path / "handed.json"
    (pkg / "scripts" / "run_yaml.py").write_text(
        "import json, sys\n\ndef main():\n"
        f"    open({str(log)!r}, 'w').write(json.dumps(sys.argv))\n    sys.exit(0)\n")
    for m in [m for m in sys.modules if m == "mergekit" or m.startswith("mergekit.")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.syspath_prepend(str(tmp_path / "fakemk"))
    monkeypatch.delenv("AME_NO_MERGEKIT_FALLBACK", raising=False)
    yield log
    for m in [m for m in sys.modules if m == "mergekit" or m.startswith("mergekit.")]:
        del sys.modules[m]  # the fake, imported by the test


def _entry(monkeypatch, argv):
    import ame_merge_entry

    monkeypatch.setattr(sys, "argv", ["mergekit-yaml", *[str(a) for a in argv]])
    return ame_merge_entry.mergekit_yaml_main()


def _cfg(tmp_path, root, text, name="m.yml"):
    p = tmp_path / name
    p.write_text(text.replace("R/", root + "/"))
    return p


def test_the_script_is_declared():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["mergekit-yaml"] == "ame_merge_entry:mergekit_yaml_main"
    assert scripts["ame-merge"] == "ame_merge_entry:main"
    from importlib import metadata

    eps = {e.name: e.value for e in metadata.entry_points(group="console_scripts") if e.name == "mergekit-yaml"}
    if eps:  # the installed (editable) package declares it too
        assert "ame_merge_entry:mergekit_yaml_main" in eps.values()


def test_mergekit_yaml_runs_a_config_end_to_end(mroot, tmp_path, monkeypatch, capsys):
    root, f32 = mroot
    p = _cfg(tmp_path, root, LINEAR)
    out = tmp_path / "out"
    # mergekit's argv: its flags, --no-X defaults, -vv, --out-shard-size with its suffixes
    assert _entry(monkeypatch, [p, out, "--no-cuda", "--copy-tokenizer", "--out-shard-size", "1B", "--no-quiet",
                                "--random-seed", "3", "-j", "1"]) == 0
    got = make_refs.load_dir(str(out))
    n = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_allclose(got[n], (f32["ft0"][n] + 3.0 * f32["ft1"][n]) / 4, rtol=1e-6, atol=1e-7)
    assert (out / "mergekit_config.yml").exists() and (out / "README.md").exists()
    assert "handing" not in capsys.readouterr().err


def test_the_console_script_runs_as_a_process(mroot, tmp_path):
    root, _ = mroot
    p = _cfg(tmp_path, root, LINEAR)
    code = "import sys, ame_merge_entry; sys.exit(ame_merge_entry.mergekit_yaml_main())"
    env = {**os.environ, "AME_NO_MERGEKIT_FALLBACK": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(p), str(tmp_path / "out"), "--quiet"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "config.json").exists()


UNSUPPORTED = [
    ("tokenizer_source: union\n", "union"),
    ("tokenizer: {tokens: {}}\n", "tokenizer.tokens"),
    ("modules: {}\n", "modules"),
    ("chat_template: chatml\n", "chatml"),
]


@pytest.mark.parametrize("extra,needle", UNSUPPORTED, ids=[u[1] for u in UNSUPPORTED])
def test_mergekit_only_configs_are_handed_to_mergekit(mroot, tmp_path, monkeypatch, capsys, fake_mergekit, extra,
                                                       needle):
    root, _ = mroot
    p = _cfg(tmp_path, root, LINEAR + extra)
    out = tmp_path / "out"
    argv = [str(p), str(out), "--no-cuda", "--out-shard-size", "5B"]
    assert _entry(monkeypatch, argv) == 0
    assert json.loads(fake_mergekit.read_text()) == ["mergekit-yaml", *argv]  # the same argv
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "handing the run to mergekit" in lines[0] and needle in lines[0], err
    assert not out.exists()


def test_other_mergekit_methods_and_dora_are_handed_over(mroot, tmp_path, monkeypatch, fake_mergekit):
    root, _ = mroot
    p = _cfg(tmp_path, root, "merge_method: nuslerp\nmodels: [{model: R/ft0}, {model: R/ft1}]\n")
    assert _entry(monkeypatch, [p, tmp_path / "o1"]) == 0 and fake_mergekit.exists()
    fake_mergekit.unlink()
    ad = tmp_path / "dora"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                        "use_dora": True}))
    (ad / "adapter_model.safetensors").write_bytes(
        open(os.path.join(REFS, "lora", "adapter", "adapter_model.safetensors"), "rb").read())
    p2 = _cfg(tmp_path, root, f"merge_method: linear\nmodels:\n  - model: R/base+{ad}\n    parameters: {{weight: 1}}\n",
              "d.yml")
    assert _entry(monkeypatch, [p2, tmp_path / "o2"]) == 0 and fake_mergekit.exists()
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_mergekit_only_flag_is_handed_over(mroot, tmp_path, monkeypatch, capsys, fake_mergekit):
    root, _ = mroot
    p = _cfg(tmp_path, root, LINEAR)
    argv = [str(p), str(tmp_path / "out"), "--transformers-cache", str(tmp_path / "c"), "--async-write"]
    assert _entry(monkeypatch, argv) == 0
    assert json.loads(fake_mergekit.read_text()) == ["mergekit-yaml", *argv]
    assert "--transformers-cache, --async-write" in capsys.readouterr().err


def test_no_hand_over_with_the_env_var(mroot, tmp_path, monkeypatch, capsys, fake_mergekit):
    root, _ = mroot
    monkeypatch.setenv("AME_NO_MERGEKIT_FALLBACK", "1")
    p = _cfg(tmp_path, root, LINEAR + "tokenizer_source: union\n")
    assert _entry(monkeypatch, [p, tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert "ame-merge: error:" in err and "union" in err and str(p) in err and "handing" not in err
    assert not fake_mergekit.exists() and not (tmp_path / "out").exists()
    assert _entry(monkeypatch, [p, tmp_path / "out", "--gpu-rich"]) == 2
    assert "--gpu-rich" in capsys.readouterr().err and not fake_mergekit.exists()


def test_no_hand_over_for_an_invalid_config(mroot, tmp_path, monkeypatch, capsys, fake_mergekit):
    root, _ = mroot
    for i, text in enumerate(["merge_method: linear\nmodles: []\n", LINEAR.replace("weight: 3", "wieght: 3"),
                              "merge_method: linera\nmodels: [{model: R/ft0}]\n"]):
        p = _cfg(tmp_path, root, text, f"bad{i}.yml")
        assert _entry(monkeypatch, [p, tmp_path / "out"]) == 2
        err = capsys.readouterr().err
        assert str(p) in err and "handing" not in err, err
    assert _entry(monkeypatch, [_cfg(tmp_path, root, LINEAR), tmp_path / "out", "--no-such-flag"]) == 2
    assert "--no-such-flag" in capsys.readouterr().err
    assert not fake_mergekit.exists() and not (tmp_path / "out").exists()


def test_no_hand_over_with_ame_merge_only_flags(mroot, tmp_path, monkeypatch, capsys, fake_mergekit):
    root, _ = mroot
    p = _cfg(tmp_path, root, LINEAR + "tokenizer_source: union\n")
    assert _entry(monkeypatch, [p, tmp_path / "out", "--force"]) == 2  # mergekit has no --force
    err = capsys.readouterr().err
    assert "union" in err and "--force" in err and not fake_mergekit.exists()


def test_without_mergekit_it_is_the_usual_error(mroot, tmp_path, monkeypatch, capsys):
    import importlib.util

    if importlib.util.find_spec("mergekit") is not None:
        pytest.skip("mergekit is installed in this environment")
    root, _ = mroot
    p = _cfg(tmp_path, root, LINEAR + "tokenizer_source: union\n")
    assert _entry(monkeypatch, [p, tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ame-merge: error:") and "union" in err and "handing" not in err


def test_classify():
    from ame_kernels.cli import build_parser
    from ame_kernels.mergekit_yaml import classify

    ours = list(build_parser()._option_string_actions)
    mine, mk, only = classify(["c.yml", "o", "--cuda", "--no-cuda", "-vv", "--lora-merge-cache", "x", "--force",
                               "--device", "cpu"], ours)
    assert mine == ["c.yml", "o", "-v", "--force", "--device", "cpu"]  # --no-cuda after --cuda: off
    assert mk == ["--lora-merge-cache"] and only == ["--force"]


@pytest.mark.skipif(not os.path.exists(MKVENV_PYTHON), reason="no mergekit venv (AME_MERGEKIT_PYTHON)")
def test_the_flag_tables_match_mergekit():
    from ame_kernels.mergekit_yaml import MK_SWITCHES, MK_VALUE_FLAGS

    code = ("import json; from mergekit.scripts.run_yaml import main as m\n"
            "print(json.dumps([[o, p.is_flag or p.count] for p in m.params if p.param_type_name == 'option' "
            "for o in p.opts + p.secondary_opts]))")
    r = subprocess.run([MKVENV_PYTHON, "-c", code], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"mergekit not importable there: {r.stderr[-300:]}")
    opts = dict(json.loads(r.stdout.strip().splitlines()[-1]))
    assert {o for o, switch in opts.items() if switch} | {"--help"} == set(MK_SWITCHES)
    assert {o for o, switch in opts.items() if not switch} == set(MK_VALUE_FLAGS)
