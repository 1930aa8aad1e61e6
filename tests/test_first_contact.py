"""What a new user meets first (issue 20): the install's CUDA decision, --version, ``ame-merge help``,
the demo without its extra, the demo's table and its explanation. All fast: no build, no training."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

import ame_kernels as ak
from ame_kernels import cli, demo, help_topics
from ame_kernels.config import FIELD_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_module():
    spec = importlib.util.spec_from_file_location("ame_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() runs only as __main__
    return mod


# --------------------------------------------------------------------------- the CUDA build decision


def test_cuda_built_only_where_it_can_run():
    s = _setup_module()
    decide = s.cuda_build_decision
    # auto: a CPU-only torch and no driver (this machine, CI's): no CUDA module, whatever nvcc says
    cuda, why = decide(None, torch_cuda=None, driver=None)
    assert cuda == "OFF" and "AME_BUILD_CUDA=1" in why
    assert decide("auto", None, None)[0] == "OFF"
    # auto where CUDA can run: CMake builds it if nvcc is found (and skips it quietly if not)
    assert decide("auto", torch_cuda="12.8", driver=None) == ("auto", decide("auto", "12.8", None)[1])
    assert "12.8" in decide("auto", "12.8", None)[1]
    assert decide(None, None, "/proc/driver/nvidia/version")[0] == "auto"
    # forced either way, whatever the machine
    for v in ("1", "ON", "yes"):
        assert decide(v, None, None)[0] == "ON"
    for v in ("0", "off", "no"):
        assert decide(v, "12.8", "/dev/nvidiactl")[0] == "OFF"
    with pytest.raises(SystemExit, match="auto, 0 or 1"):
        decide("maybe", None, None)


def test_torch_cuda_version_read_without_importing_torch():
    s = _setup_module()
    assert s.parse_torch_cuda("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n") is None
    assert s.parse_torch_cuda("__version__ = '2.9.0+cu128'\ncuda: Optional[str] = '12.8'\nhip = None\n") == "12.8"
    assert s.parse_torch_cuda("cuda = \"11.8\"\n") == "11.8"
    assert s.parse_torch_cuda("cudnn = '9'\n") is None
    import torch

    # the real lookup (a `python -I` subprocess, as under pip's build isolation) agrees with torch
    assert s._torch_cuda_version() == torch.version.cuda
    assert s._torch_cuda_version(python=os.path.join(ROOT, "no-such-python")) is None


def test_nvidia_driver_probe(tmp_path, monkeypatch):
    s = _setup_module()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert s._nvidia_driver(str(tmp_path)) is None
    (tmp_path / "proc" / "driver" / "nvidia").mkdir(parents=True)
    (tmp_path / "proc" / "driver" / "nvidia" / "version").write_text("NVRM version: 550\n")
    assert s._nvidia_driver(str(tmp_path)) == "/proc/driver/nvidia/version"
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert s._nvidia_driver(str(tmp_path / "empty")) == "/usr/bin/nvidia-smi"


def test_make_keeps_compiling_cuda_where_nvcc_exists():
    """`make build` / `make test` (CI's .ci/run) still compile the CUDA sources wherever nvcc is: the
    Makefile exports AME_BUILD_CUDA=1 there (auto elsewhere); AME_BUILD_CUDA=0 in the environment wins."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make here")
    env = {k: v for k, v in os.environ.items() if k != "AME_BUILD_CUDA"}
    probe = ["--eval", "probe-cuda: ; @echo $$AME_BUILD_CUDA", "probe-cuda"]
    r = subprocess.run([make, "-s", "-C", ROOT, *probe], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("1" if shutil.which("nvcc", path=env.get("PATH")) else "auto")
    r = subprocess.run([make, "-s", "-C", ROOT, *probe], capture_output=True, text=True, env={**env, "AME_BUILD_CUDA": "0"})
    assert r.stdout.strip() == "0"


def test_pyproject_demo_extra_and_version():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        proj = tomllib.load(f)["project"]
    assert any(d.startswith("scikit-learn") for d in proj["optional-dependencies"]["demo"])
    assert proj["version"] == ak.__version__


# --------------------------------------------------------------------------- --version and help


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"ame-merge {ak.__version__} (")
    info = ak.build_info()
    if info["native"]:
        assert info["simd_best"] in out and ("CUDA module built" if info["cuda_compiled"] else "CUDA module not built") in out


def test_help_points_to_what_an_installed_package_has(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "ame-merge help config" in out and "--version" in out
    assert "docs/" not in out  # an installed package has no docs/ folder


def test_help_topics(capsys):
    assert cli.main(["help"]) == 0
    listing = capsys.readouterr().out
    for topic in help_topics.TOPICS:
        assert topic in listing
    for topic in help_topics.TOPICS:
        assert cli.main(["help", topic]) == 0
        assert capsys.readouterr().out.strip()
    assert cli.main(["help", "confg"]) == 2
    err = capsys.readouterr().err
    assert "unknown topic 'confg'" in err and "did you mean 'config'" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["help", "config", "inspect"]) == 2


def test_help_config_lists_every_key():
    text = help_topics.topic_text("config")
    from ame_kernels.spec import ENGINE_KEYS

    for key in FIELD_NAMES + ("models", "pivot") + ENGINE_KEYS:  # every AMEConfig field (with its default), AME's keys
        assert f"\n  {key} " in text or f"\n{key}:" in text, key
    assert "  lr                         null" in text and "  optimizer                  sgd" in text
    from ame_kernels.strategies import STRATEGIES

    strategies = help_topics.topic_text("strategies")
    for name in STRATEGIES:
        assert f"strategy: {name}" in strategies, name
    from ame_kernels.methods import METHODS

    methods = help_topics.topic_text("methods")
    for name, m in METHODS.items():  # every method and every parameter, from the registry
        assert f"\n{name} (" in methods, name
        for q in m.params:
            assert f"    {q.name} (" in methods, (name, q.name)


def test_help_does_not_import_torch():
    code = ("import sys; from ame_kernels.cli import main; main(['help', 'config']); main(['help', 'install']);\n"
            "assert 'torch' not in sys.modules, 'help imported torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- the demo


def test_demo_without_its_extra_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError
    assert demo.main(["--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'ame-kernels[demo]'" in err and "scikit-learn" in err
    assert not captured.out and not (tmp_path / "out").exists()  # nothing trained, nothing written


def _fake_result(root, via="cli"):
    setting = demo.Setting(n_ingredients=3, excluded=1)
    res = demo.RunResult(setting, via=via, soup_identity_maxdiff=3e-8, train_s=1.0)
    nan = float("nan")
    for j in range(3):
        res.rows.append(dict(method=f"ingredient {j}", kind="ingredient", val=0.5 + j / 100, test=0.48, excluded=[j],
                             wall_s=nan, merge_s=nan, output=os.path.join(root, f"ingredient_{j:02d}")))

    def out(name):
        return demo.merged_dir(root, name) if via == "cli" else None

    res.rows.append(dict(method="uniform soup", kind="soup", val=0.66, test=0.674, wall_s=0.3, merge_s=0.03, output=out("uniform soup")))
    for name in demo.DEFAULT_AME:
        res.rows.append(dict(method=name, kind="ame", val=0.67, test=0.654, wall_s=1.8, merge_s=0.02, output=out(name)))
    for name in ("greedy soup", "greedy soup (asc)"):
        res.rows.append(dict(method=name, kind="greedy", val=0.7, test=0.756, members=2, wall_s=nan, merge_s=0.01,
                             output=out(name)))
    res.rows.append(dict(method="best ingredient (by val)", kind="best", val=0.52, test=0.48, index=2, wall_s=nan,
                         merge_s=nan, output=res.rows[2]["output"]))
    return res


def test_demo_table_says_where_each_output_is(tmp_path):
    root = str(tmp_path)
    table = demo.format_table(_fake_result(root), root)
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["method", "val", "acc", "test", "acc", "merge"] and f"(in {root})" in lines[0]
    by_name = {name: next(l for l in lines[1:] if l.startswith(name + " ")) for name in
               ["best ingredient (by val)", "uniform soup", "greedy soup", "greedy soup (asc)", *demo.DEFAULT_AME]}
    assert by_name["best ingredient (by val)"].rstrip().endswith("ingredient_02/")
    assert "merged/uniform_soup/" in by_name["uniform soup"] and "merged/Adam-AME/" in by_name["Adam-AME"]
    assert "merged/greedy_soup_asc/" in by_name["greedy soup (asc)"] and "(2 of 3 kept)" in by_name["greedy soup (asc)"]
    assert all("nan" not in l for l in lines)  # no blank-or-nan cells: '-' where a column does not apply
    assert by_name["greedy soup"].split()[5] == "-"  # no CLI command for the greedy soups
    # in memory (--via api): no folders, and it says so
    mem = demo.format_table(_fake_result(root, via="api"), root)
    assert "(in memory)" in mem and "merged/" not in mem


def test_demo_legend_explains_every_row_and_column(tmp_path):
    res = _fake_result(str(tmp_path))
    legend = demo.format_legend(res)
    for label in ("best ingredient", "uniform soup", "greedy soup", "greedy soup (asc)", "*-AME",
                  "val acc, test acc", "merge s", "CLI s"):
        assert f"\n  {label} " in "\n" + legend, label
    assert all(len(l) <= 100 for l in legend.splitlines())
    flat = " ".join(legend.split())
    assert "Greedy Soup (Asc)" in flat and "not tuned on this run" in flat
    reading = demo.format_reading(res)
    assert "+19.4 points against the best ingredient" in reading.replace("\n", " ")
    assert "Adam-AME -2.0" in reading.replace("\n", " ") and "greedy soup" in reading


def test_demo_next_steps_are_commands_a_pip_user_has(tmp_path, monkeypatch, capsys):
    """The demo's closing lines name commands of the installed package, not `make repro`."""
    monkeypatch.setattr(demo, "run_setting", lambda setting, out, **kw: _fake_result(os.path.abspath(out)))
    assert demo.main(["--out", str(tmp_path), "--ingredients", "3", "--excluded", "1"]) == 0
    out = capsys.readouterr().out
    assert "make repro" not in out
    tail = out[out.index("\nnext:\n"):].splitlines()
    assert tail[-1].startswith("done in ")
    cmds = [l.split("#")[0].strip() for l in tail if l.startswith("  ")]
    assert any(c.endswith("help config") for c in cmds) and any(" inspect " in c for c in cmds)
    for c in cmds:  # each names this environment's ame-merge: on PATH, or this Python with -m
        assert c.startswith("ame-merge ") or " -m ame_kernels " in c, c


# --------------------------------------------------------------------------- inspect


def _folders(tmp_path, n=3, zero_bias=True):
    import torch
    from safetensors.torch import save_file

    base = torch.randn(40, 30)
    paths = []
    for i in range(n):
        sd = {"w": base + 0.05 * torch.randn(40, 30), "b": torch.randn(30)}
        if zero_bias:
            sd["pooler.bias"] = torch.zeros(30)  # MiniLM's pooler.dense.bias: zero in every model
        d = tmp_path / f"model_{i}"
        d.mkdir()
        save_file(sd, str(d / "model.safetensors"))
        paths.append(str(d))
    return paths


def test_inspect_takes_model_folders(tmp_path, capsys, monkeypatch):
    paths = _folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["inspect", "model_0", "model_1", "model_2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 models") and str(tmp_path / "model_2") in out
    assert cli.main(["inspect", *paths, "--base", paths[0], "--json"]) == 0
    assert '"relative_to": "task vectors"' in capsys.readouterr().out
    # one model, a config among folders, a missing folder: one line each, exit 2
    for argv, msg in ((["model_0"], "at least 2 models"), (["c.yaml", "model_0"], "not both"),
                      (["model_0", "nope"], "nope")):
        assert cli.main(["inspect", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_inspect_zero_norm_tensor_is_not_least_similar_nor_nan(tmp_path, capsys):
    paths = _folders(tmp_path)
    from ame_kernels.diagnostics import diagnostics

    d = diagnostics(paths)
    assert d.summary["zero_norm_tensors"] == ["pooler.bias"]
    assert [r["name"] for r in d.summary["least_similar_tensors"]] == ["b", "w"]  # ranked by cosine, finite only
    table = d.table()
    assert "nan" not in table.split("least similar tensors")[1]
    assert "zero in some model, no cosine" in table and "pooler.bias" in table


def test_inspect_gives_numbers_not_a_verdict(tmp_path, capsys):
    import torch

    from ame_kernels.diagnostics import diagnostics

    d = diagnostics([torch.randn(2000) for _ in range(3)])  # independent: crosses the cosine threshold
    table = d.table()
    assert "verdict" not in table and "unlikely to soup well" not in table and "threshold checks (heuristics" in table
    assert "low_similarity: lowest whole-model cosine" in table
    assert not d.soupable  # the API's summary keeps its flag levels
    calm = diagnostics([torch.ones(50) + 0.01 * torch.randn(50) for _ in range(3)]).table()
    assert "threshold checks: none crossed" in calm


def test_provenance_records_the_lr_used_and_one_model_is_said(tmp_path, capsys):
    """lr: null was recorded when the lr was defaulted; a one-model merge ran without a word."""
    import yaml

    from test_io import make_family

    paths, _ = make_family(tmp_path, n=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"models": paths, "optimizer": "adam"}))
    assert cli.main([str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    prov = yaml.safe_load((tmp_path / "out" / "ame_merge.yaml").read_text())
    assert prov["config"]["lr"] == 1e-3 and prov["config"]["eps"] == 1e-8
    cfg.write_text(yaml.safe_dump({"models": paths[:1]}))
    assert cli.main([str(cfg), str(tmp_path / "one"), "--quiet"]) == 0
    assert "warning: one model" in capsys.readouterr().err


def test_a_misspelled_strategy_gets_did_you_mean(tmp_path, capsys):
    import yaml

    from test_io import make_family

    paths, _ = make_family(tmp_path, n=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"models": paths, "strategy": "greedy_sop", "evaluate": "x:y"}))
    assert cli.main([str(cfg), "--dry-run"]) == 2
    assert "(did you mean 'greedy_soup'?)" in capsys.readouterr().err
