"""mergekit configs run unchanged (issue 16): the schema, per-tensor parameters, errors, inputs.

The models are the tiny Llama checkpoints of benchmarks/mergekit_refs (models.py, bitwise
reproducible); the exact configs there are mergekit's own YAML (MANIFEST.json "yaml"), run here
through ``ame-merge CONFIG OUT`` unchanged but for the model folder, and compared with the
stored mergekit outputs (ATOL as tests/test_mergekit_parity.py).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFS = os.path.join(ROOT, "benchmarks", "mergekit_refs")
sys.path.insert(0, REFS)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_refs  # noqa: E402
import models as mkmodels  # noqa: E402

ATOL = 5e-7
with open(os.path.join(REFS, "MANIFEST.json")) as _f:
    MANIFEST = json.load(_f)
CONFIGS = {c["name"]: c for c in MANIFEST["configs"]}


@pytest.fixture(scope="module")
def mroot(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mkmodels"))
    f32 = mkmodels.models_f32()
    make_refs.write_models(root, f32)
    with open(os.path.join(root, "ft1", "tokenizer.json"), "w") as f:
        f.write('{"model": "ft1 tokenizer"}')
    return root, f32


def _cli(argv):
    from ame_kernels.cli import main

    return main([str(a) for a in argv])


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def _out(d):
    return make_refs.load_dir(str(d))


# ---- mergekit's own configs, unchanged, through the CLI ------------------------------------

@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c["kind"] == "exact"])
def test_mergekit_config_runs_unchanged_and_matches_mergekit(mroot, tmp_path, name):
    root, _ = mroot
    cfg = CONFIGS[name]
    p = _write(tmp_path, "merge.yml", cfg["yaml"].replace("MODELS/", root + "/"))
    out = tmp_path / "out"
    assert _cli([p, out, "-q"]) == 0
    from safetensors.numpy import load_file

    ref = load_file(os.path.join(REFS, cfg["file"]))
    got = _out(out)
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].dtype == np.float32, (name, n)  # dtype: float32 is the output dtype
        d = np.abs(got[n].astype(np.float64) - ref[n])
        assert d.max() <= ATOL, (name, n, float(d.max()))
    assert (out / "mergekit_config.yml").read_text() == p.read_text()  # the config as run
    assert (out / "config.json").exists()


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c["kind"] == "random"])
def test_mergekit_random_configs_run_unchanged(mroot, tmp_path, name):
    from test_mergekit_parity import _check_masks

    root, f32 = mroot
    cfg = CONFIGS[name]
    text = cfg["yaml"].replace("MODELS/", root + "/")
    p = _write(tmp_path, "merge.yml", text + "random_seed: 3\n")
    out = tmp_path / "out"
    assert _cli([p, out, "-q"]) == 0
    got = _out(out)
    base = f32["base"]
    kept = {n: (got[n].astype(np.float64) - base[n]) != 0 for n, _ in mkmodels.shapes()}
    scaled = {n: got[n].astype(np.float64) - base[n] for n, _ in mkmodels.shapes()}
    _check_masks(f"ame-merge {name}", cfg, f32, kept, scaled)
    # random_seed is the seed: another seed, another mask
    p2 = _write(tmp_path, "merge2.yml", text + "random_seed: 4\n")
    assert _cli([p2, tmp_path / "out2", "-q"]) == 0
    n = "model.embed_tokens.weight"
    assert not np.array_equal(_out(tmp_path / "out2")[n], got[n])


def test_dry_run_names_the_schema(mroot, tmp_path, capsys):
    root, _ = mroot
    p = _write(tmp_path, "m.yml", CONFIGS["ties_raw"]["yaml"].replace("MODELS/", root + "/"))
    assert _cli([p, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "schema: mergekit (merge_method: ties)" in text
    ame = _write(tmp_path, "a.yml", f"method: linear\nmodels: [{root}/ft0, {root}/ft1]\n")
    assert _cli([ame, "--dry-run"]) == 0
    assert "schema: ame" in capsys.readouterr().out


# ---- per-tensor parameters: gradients, filters, precedence ---------------------------------

GRADIENT_FILTERS = """\
merge_method: linear
models:
  - model: {root}/ft0
    parameters:
      weight:
        - filter: self_attn
          value: [1.0, 3.0]
        - filter: mlp
          value: 0.5
  - model: {root}/ft1
    parameters:
      weight: 2.0
parameters:
  weight: 1.0
  normalize: false
dtype: float32
"""


def _hand_weight0(name):
    """ft0's weight by hand: self_attn of layer i (of 3) at x = i/2 on [1, 3] -> 1 + i; mlp 0.5;
    anything else (embeddings, norms, lm_head) matches no rule -> the top-level 1.0."""
    li = mkmodels.layer_index(name)
    if "self_attn" in name:
        return 1.0 + li
    if "mlp" in name:
        return 0.5
    return 1.0


def test_gradients_and_filters_against_a_hand_computation(mroot, tmp_path):
    root, f32 = mroot
    p = _write(tmp_path, "g.yml", GRADIENT_FILTERS.format(root=root))
    assert _cli([p, tmp_path / "out", "-q"]) == 0
    got = _out(tmp_path / "out")
    seen = set()
    for n, _ in mkmodels.shapes():
        w0 = _hand_weight0(n)
        seen.add(w0)
        want = w0 * f32["ft0"][n].astype(np.float64) + 2.0 * f32["ft1"][n]
        np.testing.assert_allclose(got[n], want, rtol=1e-6, atol=1e-6, err_msg=n)
    assert seen == {1.0, 2.0, 3.0, 0.5}


def test_rule_params_for_tensor(mroot, tmp_path):
    from ame_kernels.spec import check_call, load_spec

    root, _ = mroot
    spec = load_spec(str(_write(tmp_path, "g.yml", GRADIENT_FILTERS.format(root=root))))
    params = check_call(spec).params
    params.bind([n for n, _ in mkmodels.shapes()])
    assert params.for_tensor("model.layers.1.self_attn.q_proj.weight")["weight"] == (2.0, 2.0)
    assert params.for_tensor("model.layers.2.self_attn.o_proj.weight")["weight"] == (3.0, 2.0)
    assert params.for_tensor("model.layers.0.mlp.up_proj.weight")["weight"] == (0.5, 2.0)
    assert params.for_tensor("lm_head.weight")["weight"] == (1.0, 2.0)
    assert params.for_tensor("model.norm.weight")["normalize"] is False


def test_model_parameters_take_precedence_and_gradients_are_per_layer(mroot, tmp_path):
    """ties: density per model overrides the top-level one; a top-level gradient of lambda."""
    from ame_kernels.spec import check_call, load_spec

    root, _ = mroot
    text = f"""\
merge_method: ties
base_model: {root}/base
models:
  - model: {root}/base
  - model: {root}/ft0
    parameters: {{weight: 1.0, density: 0.3}}
  - model: {root}/ft1
    parameters: {{weight: 1.0}}
parameters:
  density: [0.2, 0.6]
  lambda: [1.0, 0.5, 0.0]
"""
    spec = load_spec(str(_write(tmp_path, "t.yml", text)))
    assert spec.base.endswith("base") and len(spec.models) == 2  # the base is not a task vector
    params = check_call(spec).params
    params.bind([n for n, _ in mkmodels.shapes()])
    p = params.for_tensor("model.layers.1.mlp.up_proj.weight")  # x = 0.5
    assert p["density"] == pytest.approx((0.3, 0.4))
    assert p["lambda"] == pytest.approx(0.5)
    e = params.for_tensor("model.embed_tokens.weight")  # x = 0
    assert e["density"] == pytest.approx((0.3, 0.2)) and e["lambda"] == pytest.approx(1.0)
    assert params.for_tensor("model.layers.2.mlp.up_proj.weight")["lambda"] == pytest.approx(0.0)


def test_a_filter_without_default_is_an_error_naming_the_tensor(mroot, tmp_path, capsys):
    root, _ = mroot
    text = f"""\
merge_method: linear
models:
  - model: {root}/ft0
    parameters:
      weight: [{{filter: mlp, value: 1.0}}]
  - model: {root}/ft1
    parameters: {{weight: 1.0}}
"""
    p = _write(tmp_path, "f.yml", text)
    assert _cli([p, tmp_path / "out", "-q"]) == 2
    err = capsys.readouterr().err
    assert "models[0]" in err and "no weight for tensor '" in err and "mlp" not in err.split("tensor ")[1], err
    assert not (tmp_path / "out").exists()


def test_a_per_tensor_value_out_of_range_names_the_tensor(mroot, tmp_path, capsys):
    """della: density - epsilon must be > 0; the gradient reaches 0.1 at the last layer only."""
    root, _ = mroot
    text = f"""\
merge_method: della
base_model: {root}/base
models:
  - model: {root}/ft0
    parameters: {{weight: 1.0, density: [0.5, 0.1], epsilon: 0.15}}
"""
    p = _write(tmp_path, "d.yml", text)
    assert _cli([p, tmp_path / "out", "-q"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.2." in err and "epsilon" in err, err
    assert not (tmp_path / "out").exists()


# ---- errors: each names the file and the key; exit 2; nothing written ----------------------

ERRORS = [
    ("merge_method: linear\nmodles: []\n", ["unknown key 'modles'", "'models'"]),
    ("merge_method: tie\nmodels: [{model: R/ft0}]\n", ["merge_method", "'ties'"]),
    ("merge_method: nuslerp\nmodels: [{model: R/ft0}]\n", ["merge_method", "nuslerp", "not supported"]),
    ("merge_method: linear\nmodels: [{path: R/ft0}]\n", ["models[0]", "unknown key 'path'"]),
    ("merge_method: linear\nmodels: [{model: R/ft0, parameters: {wieght: 1}}]\n", ["models[0].parameters.wieght", "'weight'"]),
    ("merge_method: linear\nmodels: [{model: R/ft0}, {model: R/ft1, parameters: {weight: 1}}]\n", ["models[0]", "no weight"]),
    ("merge_method: ties\nbase_model: R/base\nmodels: [{model: R/ft0, parameters: {weight: 1, lambda: 2}}]\n",
     ["models[0].parameters.lambda", "shared"]),
    ("merge_method: ties\nbase_model: R/base\nmodels: [{model: R/ft0, parameters: {weight: 1}}]\nparameters: {densty: 0.5}\n",
     ["parameters.densty", "'density'"]),
    ("merge_method: ties\nmodels: [{model: R/ft0, parameters: {weight: 1}}]\n", ["base_model", "needs a base_model"]),
    ("merge_method: slerp\nbase_model: R/base\nmodels: [{model: R/ft0}]\n", ["parameters.t"]),
    ("merge_method: linear\nmodels: [{model: R/ft0, parameters: {weight: 1}}]\ndtype: float64\n", ["dtype", "float64"]),
    ("merge_method: linear\nmodels: [{model: R/ft0, parameters: {weight: 1}}]\ntokenizer_source: union\n",
     ["tokenizer_source", "union"]),
    ("merge_method: linear\nmodels: [{model: R/ft0, parameters: {weight: 1}}]\nchat_template: chatml\n",
     ["chat_template", "named templates", "Jinja text"]),
    ("merge_method: linear\nmodels: [{model: R/ft0, parameters: {weight: 1}}]\ntokenizer: {source: base, tokens: {}}\n",
     ["tokenizer.tokens"]),
    ("merge_method: linear\nmodels: [{model: R/ft0+R/lora, parameters: {weight: 1}}]\n", ["models[0].model", "base+lora"]),
    ("merge_method: linear\nmodules: {}\nmodels: [{model: R/ft0, parameters: {weight: 1}}]\n", ["modules"]),
    ("merge_method: linear\nmodels: [{model: nobody/no-such-model, parameters: {weight: 1}}]\n",
     ["models[0].model", "not in the Hugging Face cache", "download"]),
    ("merge_method: ties\nbase_model: R/base\nmodels: [{model: R/ft0, parameters: {weight: 1, density: [0.5, 1.5]}}]\n",
     ["models[0].density", "entry 1"]),
    ("merge_method: linear\nmodels: [{model: R/ft0, parameters: {weight: 1}}]\nslices: []\n", ["models", "slices"]),
    ("merge_method: ame\nmodels: [{model: R/ft0}, {model: R/ft1}]\nparameters: {optimiser: adam}\n",
     ["parameters.optimiser", "'optimizer'"]),
    ("merge_method: linear\nmodels: [{model: R/ft0, parameters: {weight: 1}}]\nrandom_seed: -1\n", ["random_seed"]),
]


@pytest.mark.parametrize("text,needles", ERRORS, ids=[f"e{i}" for i in range(len(ERRORS))])
def test_errors_name_file_and_key(mroot, tmp_path, capsys, monkeypatch, text, needles):
    root, _ = mroot
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no download attempt where huggingface_hub is installed
    p = _write(tmp_path, "bad.yml", text.replace("R/", root + "/"))
    out = tmp_path / "out"
    assert _cli([p, out, "-q"]) == 2
    err = capsys.readouterr().err
    assert str(p) in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()


def test_an_ame_schema_file_with_mergekit_keys_says_so(tmp_path, capsys):
    p = _write(tmp_path, "x.yml", "models: [a/, b/]\nbase_model: c/\n")
    assert _cli([p, "--dry-run"]) == 2
    assert "merge_method" in capsys.readouterr().err


# ---- inputs and outputs: Hub IDs from the cache, tokenizer_source, shard sizes, AME ---------

def _lay_out_cache(cache, repo, folder, rev_hash, refs):
    d = cache / ("models--" + repo.replace("/", "--"))
    snap = d / "snapshots" / rev_hash
    snap.mkdir(parents=True)
    for f in os.listdir(folder):
        (snap / f).write_bytes(open(os.path.join(folder, f), "rb").read())
    (d / "refs").mkdir(exist_ok=True)
    for r in refs:
        (d / "refs" / r).write_text(rev_hash)
    return snap


def test_hub_ids_resolve_through_the_local_cache(mroot, tmp_path, monkeypatch, capsys):
    root, f32 = mroot
    cache = tmp_path / "hub"
    _lay_out_cache(cache, "org/ft0", os.path.join(root, "ft0"), "a" * 40, ["main"])
    _lay_out_cache(cache, "org/ft1", os.path.join(root, "ft1"), "b" * 40, ["v1"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = ("merge_method: linear\nmodels:\n  - model: org/ft0\n    parameters: {weight: 1}\n"
            "  - model: org/ft1@v1\n    parameters: {weight: 3}\ndtype: float32\n")
    p = _write(tmp_path, "hub.yml", text)
    assert _cli([p, tmp_path / "out", "-q"]) == 0
    got = _out(tmp_path / "out")
    n = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_allclose(got[n], (f32["ft0"][n] + 3.0 * f32["ft1"][n]) / 4, rtol=1e-6, atol=1e-7)
    # an unknown revision: a clear error, no network
    p2 = _write(tmp_path, "hub2.yml", text.replace("org/ft1@v1", "org/ft1@v2"))
    assert _cli([p2, tmp_path / "out2", "-q"]) == 2
    err = capsys.readouterr().err
    assert "revision 'v2'" in err and "org/ft1" in err and "download" in err


def test_tokenizer_source_copies_that_models_tokenizer(mroot, tmp_path):
    root, _ = mroot
    text = (f"merge_method: linear\nmodels:\n  - model: {root}/ft0\n    parameters: {{weight: 1}}\n"
            f"  - model: {root}/ft1\n    parameters: {{weight: 1}}\ntokenizer_source: {root}/ft1\n")
    p = _write(tmp_path, "tok.yml", text)
    assert _cli([p, tmp_path / "out", "-q"]) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"model": "ft1 tokenizer"}'


def test_shard_sizes_read_as_mergekit_reads_them(mroot, tmp_path, capsys):
    from ame_kernels.cli_common import mergekit_size

    assert mergekit_size("5B", "x") == 5 * 10**9
    assert mergekit_size("500M", "x") == 5 * 10**8
    assert mergekit_size("20K", "x") == 20000
    assert mergekit_size("1.5B", "x") == 1.5e9
    root, _ = mroot
    p = _write(tmp_path, "s.yml", CONFIGS["linear_raw"]["yaml"].replace("MODELS/", root + "/"))
    assert _cli([p, "--dry-run", "--shard-size", "5B"]) == 0
    assert "of at most 5 GB" in capsys.readouterr().out  # 5e9 bytes, not 5
    assert _cli([p, tmp_path / "out", "-q", "--out-shard-size", "20K"]) == 0
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 3
    # the AME schema keeps its own reading: 5B = 5 bytes
    ame = _write(tmp_path, "a.yml", f"method: linear\nmodels: [{root}/ft0, {root}/ft1]\n")
    assert _cli([ame, "--dry-run", "--shard-size", "5B"]) == 0
    assert "of at most 5e-09 GB" in capsys.readouterr().out


def test_merge_method_ame(mroot, tmp_path, capsys):
    root, _ = mroot
    text = (f"merge_method: ame\nmodels:\n  - model: {root}/ft0\n  - model: {root}/ft1\n  - model: {root}/ft2\n"
            "parameters: {optimizer: sgd, lr: 1.0, epochs: 1}\ndtype: float32\n")
    p = _write(tmp_path, "ame.yml", text)
    assert _cli([p, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "method: ame" in out and "optimizer: sgd" in out
    assert _cli([p, tmp_path / "out", "-q"]) == 0


# ---- slices: frankenmerges and slices merged by a method (stored mergekit outputs) ----------

with open(os.path.join(REFS, "SLICES.json")) as _f:
    SLICES = {c["name"]: c for c in json.load(_f)["configs"]}


@pytest.mark.parametrize("name", sorted(SLICES))
def test_slices_match_mergekit(mroot, tmp_path, name):
    from safetensors.numpy import load_file

    root, _ = mroot
    c = SLICES[name]
    text = open(os.path.join(REFS, c["config"])).read().replace("MODELS/", root + "/")
    p = _write(tmp_path, "s.yml", text)
    out = tmp_path / "out"
    assert _cli([p, out, "-q"]) == 0
    ref = load_file(os.path.join(REFS, c["file"]))
    got = _out(out)
    assert set(got) == set(ref)
    for n in ref:
        d = np.abs(got[n].astype(np.float64) - ref[n])
        assert d.max() <= ATOL, (name, n, float(d.max()))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == c["num_hidden_layers"]


def test_passthrough_renames_layers(mroot, tmp_path):
    root, f32 = mroot
    text = open(os.path.join(REFS, SLICES["passthrough"]["config"])).read().replace("MODELS/", root + "/")
    assert _cli([_write(tmp_path, "p.yml", text), tmp_path / "out", "-q"]) == 0
    got = _out(tmp_path / "out")
    # ft0 layers [0, 2) then ft1 layers [1, 3): output layers 0, 1 from ft0, 2, 3 = ft1's 1, 2
    n = "model.layers.{}.mlp.down_proj.weight"
    assert np.array_equal(got[n.format(1)], f32["ft0"][n.format(1)])
    assert np.array_equal(got[n.format(2)], f32["ft1"][n.format(1)])
    assert np.array_equal(got[n.format(3)], f32["ft1"][n.format(2)])
    assert np.array_equal(got["model.embed_tokens.weight"], f32["ft0"]["model.embed_tokens.weight"])
    assert np.array_equal(got["lm_head.weight"], f32["ft1"]["lm_head.weight"])


SLICE_ERRORS = [
    ("merge_method: passthrough\nslices:\n  - sources: [{model: R/ft0, layer_range: [0, 9]}]\n",
     ["slices[0].sources[0].layer_range", "beyond the 3 layers"]),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: R/ft0, layer_range: [2, 1]}]\n",
     ["slices[0].sources[0].layer_range"]),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: R/ft0, layer_range: [0, 1]}, {model: R/ft1, layer_range: [0, 1]}]\n",
     ["slices[0].sources", "one source"]),
    ("merge_method: linear\nslices:\n  - sources: [{model: R/ft0, layer_range: [0, 1]}, {model: R/ft1, layer_range: [0, 2]}]\n",
     ["slices[0].sources", "same number of layers"]),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: R/ft0, layer_rang: [0, 1]}]\n",
     ["slices[0].sources[0]", "'layer_range'"]),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: R/ft0, layer_range: [0, 1]}]\n    residual_weight: 0.5\n",
     ["slices[0]", "residual_weight"]),
    ("merge_method: ties\nbase_model: R/base\nslices:\n  - sources: [{model: R/ft0, layer_range: [0, 1], parameters: {weight: 1}}]\n",
     ["slices[0].sources", "base_model", "not among"]),
]


@pytest.mark.parametrize("text,needles", SLICE_ERRORS, ids=[f"s{i}" for i in range(len(SLICE_ERRORS))])
def test_slice_errors_name_file_and_key(mroot, tmp_path, capsys, text, needles):
    root, _ = mroot
    p = _write(tmp_path, "bad.yml", text.replace("R/", root + "/"))
    assert _cli([p, tmp_path / "out", "-q"]) == 2
    err = capsys.readouterr().err
    assert str(p) in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()


# ---- base+lora: a PEFT adapter applied on the fly, against PEFT's merge_and_unload ---------

def test_base_plus_lora_matches_peft_merge_and_unload(mroot, tmp_path):
    from safetensors.numpy import load_file

    root, f32 = mroot
    adapter = os.path.join(REFS, "lora", "adapter")
    text = f"merge_method: linear\nmodels:\n  - model: {root}/base+{adapter}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
    assert _cli([_write(tmp_path, "l.yml", text), tmp_path / "out", "-q"]) == 0
    ref = load_file(os.path.join(REFS, "out", "lora_merged.safetensors"))
    got = _out(tmp_path / "out")
    changed = 0
    for n in ref:
        np.testing.assert_allclose(got[n], ref[n], rtol=0, atol=2e-6, err_msg=n)
        changed += not np.array_equal(ref[n], f32["base"][n])
    assert changed == 3 * 3 + 1  # q_proj, v_proj, down_proj of 3 layers, and lm_head (modules_to_save)
    # the same adapter in a task-vector merge: base+lora is one more fine-tune
    text2 = (f"merge_method: task_arithmetic\nbase_model: {root}/base\nmodels:\n"
             f"  - model: {root}/base+{adapter}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    assert _cli([_write(tmp_path, "l2.yml", text2), tmp_path / "out2", "-q"]) == 0
    got2 = _out(tmp_path / "out2")
    n = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_allclose(got2[n], f32["base"][n] + 0.5 * (ref[n] - f32["base"][n]), atol=2e-6)


def test_lora_rank_mismatch_is_an_error(mroot, tmp_path, capsys):
    root, _ = mroot
    ad = tmp_path / "ad"
    ad.mkdir()
    src = os.path.join(REFS, "lora", "adapter")
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    cfg["r"] = 8
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    (ad / "adapter_model.safetensors").write_bytes(open(os.path.join(src, "adapter_model.safetensors"), "rb").read())
    text = f"merge_method: linear\nmodels:\n  - model: {root}/base+{ad}\n    parameters: {{weight: 1.0}}\n"
    assert _cli([_write(tmp_path, "l.yml", text), tmp_path / "out", "-q"]) == 2
    err = capsys.readouterr().err
    assert "rank 4" in err and "r = 8" in err
    assert not (tmp_path / "out").exists()


def test_tied_lm_head_merges_with_untied_ones(mroot, tmp_path, capsys):
    from safetensors.numpy import save_file

    root, f32 = mroot
    tied = tmp_path / "tied"
    tied.mkdir()
    sd = {n: v for n, v in f32["ft1"].items() if n != "lm_head.weight"}
    save_file(sd, str(tied / "model.safetensors"))
    cfg = {**mkmodels.llama_config(), "tie_word_embeddings": True}
    (tied / "config.json").write_text(json.dumps(cfg))
    text = (f"merge_method: linear\nmodels:\n  - model: {root}/ft0\n    parameters: {{weight: 1}}\n"
            f"  - model: {tied}\n    parameters: {{weight: 1}}\ndtype: float32\n")
    p = _write(tmp_path, "t.yml", text)
    assert _cli([p, tmp_path / "out", "-q"]) == 0
    got = _out(tmp_path / "out")
    want = (f32["ft0"]["lm_head.weight"].astype(np.float64) + f32["ft1"]["model.embed_tokens.weight"]) / 2
    np.testing.assert_allclose(got["lm_head.weight"], want, rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    # without the tie in its config, the missing lm_head is the engine's structure error
    cfg["tie_word_embeddings"] = False
    (tied / "config.json").write_text(json.dumps(cfg))
    assert _cli([p, tmp_path / "out2", "-q"]) == 2
    assert "lm_head.weight" in capsys.readouterr().err


def test_model_card_is_written_as_mergekit_does(mroot, tmp_path):
    root, _ = mroot
    p = _write(tmp_path, "m.yml", CONFIGS["ties_raw"]["yaml"].replace("MODELS/", root + "/"))
    assert _cli([p, tmp_path / "out", "-q"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nbase_model:\n") and "- mergekit" in card and "`ties`" in card
    assert "merge_method: ties" in card  # the config as run
    assert _cli([p, tmp_path / "out2", "-q", "--no-write-model-card"]) == 0
    assert not (tmp_path / "out2" / "README.md").exists()


def test_a_buffer_missing_in_some_models_is_copied_with_a_warning(mroot, tmp_path, capsys):
    from safetensors.numpy import save_file

    root, f32 = mroot
    old = tmp_path / "old"
    old.mkdir()
    pos = np.arange(16, dtype=np.int64).reshape(1, 16)
    save_file({**f32["ft0"], "embeddings.position_ids": pos}, str(old / "model.safetensors"))
    (old / "config.json").write_text(json.dumps(mkmodels.llama_config()))
    (old / "modules.json").write_text("[]")
    (old / "1_Pooling").mkdir()
    (old / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    text = (f"merge_method: linear\nmodels:\n  - model: {old}\n    parameters: {{weight: 1}}\n"
            f"  - model: {root}/ft1\n    parameters: {{weight: 1}}\n")
    assert _cli([_write(tmp_path, "b.yml", text), tmp_path / "out"]) == 0
    err = capsys.readouterr().err
    assert "embeddings.position_ids" in err and "copied from" in err
    got = _out(tmp_path / "out")
    assert np.array_equal(got["embeddings.position_ids"], pos)
    # sentence-transformers files come along (modules.json and the module folders)
    assert (tmp_path / "out" / "modules.json").exists()
    assert (tmp_path / "out" / "1_Pooling" / "config.json").exists()


def test_different_vocabularies_are_refused_naming_the_sizes(mroot, tmp_path, capsys):
    from safetensors.numpy import save_file

    root, f32 = mroot
    big = tmp_path / "big"
    big.mkdir()
    sd = dict(f32["ft1"])
    sd["model.embed_tokens.weight"] = np.concatenate([sd["model.embed_tokens.weight"]] * 2)
    sd["lm_head.weight"] = np.concatenate([sd["lm_head.weight"]] * 2)
    save_file(sd, str(big / "model.safetensors"))
    text = (f"merge_method: linear\nmodels:\n  - model: {root}/ft0\n    parameters: {{weight: 1}}\n"
            f"  - model: {big}\n    parameters: {{weight: 1}}\n")
    assert _cli([_write(tmp_path, "v.yml", text), tmp_path / "out", "-q"]) == 2
    err = capsys.readouterr().err
    assert "vocabularies differ" in err and ": 256" in err and ": 512" in err and "union" in err


def test_chat_template_text_and_auto(mroot, tmp_path):
    root, _ = mroot
    tpl = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for name in ("ft0", "ft1"):
        (tmp_path / name).mkdir()
        for f in os.listdir(os.path.join(root, name)):
            (tmp_path / name / f).write_bytes(open(os.path.join(root, name, f), "rb").read())
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps({"chat_template": tpl + name}))
    head = (f"merge_method: linear\nmodels:\n  - model: {tmp_path}/ft0\n    parameters: {{weight: 1}}\n"
            f"  - model: {tmp_path}/ft1\n    parameters: {{weight: 1}}\n")
    p = _write(tmp_path, "c.yml", head + "chat_template: \"" + tpl + "\"\n")
    assert _cli([p, tmp_path / "out", "-q"]) == 0
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == tpl
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == tpl
    (tmp_path / "ft1" / "tokenizer_config.json").write_text(json.dumps({"chat_template": tpl + "ft0"}))
    p2 = _write(tmp_path, "c2.yml", head + "chat_template: auto\n")
    assert _cli([p2, tmp_path / "out2", "-q"]) == 0  # both models now carry tpl + 'ft0'
    assert (tmp_path / "out2" / "chat_template.jinja").read_text() == tpl + "ft0"


def test_mergekit_yaml_flags(mroot, tmp_path, capsys):
    root, f32 = mroot
    text = (f"merge_method: linear\nmodels:\n  - model: {root}/ft0\n    parameters: {{weight: 1}}\n"
            f"  - model: {root}/ft1\n    parameters: {{weight: 1}}\ntokenizer_source: {root}/ft1\n")
    p = _write(tmp_path, "f.yml", text)
    assert _cli([p, tmp_path / "out", "-q", "--no-copy-tokenizer"]) == 2  # it names a tokenizer_source
    assert "--no-copy-tokenizer" in capsys.readouterr().err
    p2 = _write(tmp_path, "f2.yml", text.replace(f"tokenizer_source: {root}/ft1\n", ""))
    # ft0 has no tokenizer; ft1's is not copied from ingredient 0 either way: use ft1 first
    p3 = _write(tmp_path, "f3.yml", text.replace(f"tokenizer_source: {root}/ft1\n", "").replace("ft0", "TMP")
                .replace("ft1", "ft0").replace("TMP", "ft1"))
    assert _cli([p3, tmp_path / "o3", "-q"]) == 0 and (tmp_path / "o3" / "tokenizer.json").exists()
    assert _cli([p3, tmp_path / "o4", "-q", "--no-copy-tokenizer", "--allow-crimes", "-j", "1"]) == 0
    assert not (tmp_path / "o4" / "tokenizer.json").exists() and (tmp_path / "o4" / "config.json").exists()
    assert _cli([p2, tmp_path / "o5", "--allow-crimes", "--lazy-unpickle"]) == 0
    err = capsys.readouterr().err
    assert "note: --allow-crimes has no effect" in err and "note: --lazy-unpickle has no effect" in err
