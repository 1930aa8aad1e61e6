"""benchmarks/bench_mergekit.py --corpus: every corpus config, pointed at a family, is a valid
mergekit config here (checked with --dry-run on the tiny models; the benchmark itself needs mergekit)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "mergekit_refs"))
import bench_mergekit  # noqa: E402
import make_refs  # noqa: E402
import models as mkmodels  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fam"))
    make_refs.write_models(root, mkmodels.models_f32())
    return root, [os.path.join(root, m) for m in ("base", "ft0", "ft1", "ft2")]


@pytest.mark.parametrize("name", list(bench_mergekit.CORPUS))
def test_corpus_configs_are_valid(family, name, capsys):
    from ame_kernels.cli import main

    root, models = family
    layers = sum(1 for n in mkmodels.models_f32()["base"] if n.endswith("input_layernorm.weight"))
    cfg = bench_mergekit.corpus_config(name, models, layers, root)
    assert main([cfg, "--dry-run"]) == 0, capsys.readouterr().err
    assert "schema: mergekit" in capsys.readouterr().out
