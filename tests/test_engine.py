"""The checkpoint engine against the in-memory ak.merge on the same state dicts (bitwise, same backend)."""

import json
import os

import numpy as np
import pytest
import torch

import ame_kernels as ak
from ame_kernels.backends import available
from ame_kernels.engine import close_plan, merge_checkpoints, plan_merge, run_merge
from ame_kernels.errors import MergeError
from test_io import load_folder, make_family, tiny_state_dict, write_checkpoint

BACKENDS = [b for b in ("reference", "cpu") if available()[b][0]]

CONFIGS = [
    dict(optimizer="sgd"),  # the soup
    dict(optimizer="adam", lr=1e-2, epochs=2),
    dict(optimizer="adamw", lr=1e-2, weight_decay=0.1, pivot=1, adaptive_pivot=False),
    dict(optimizer="adagrad", lr=0.1, batch_size=2, scores=[0.3, 0.9, 0.5]),
    dict(optimizer="sgd", lr=0.5, momentum=0.9, lr_schedule="constant", out_dtype="float32"),
]


def assert_same(got: dict, expected: dict):
    assert list(got) == list(expected) or set(got) == set(expected)
    for name, e in expected.items():
        g = got[name]
        assert g.dtype == e.dtype and g.shape == e.shape, name
        assert torch.equal(g, e), f"{name}: {(g.float() != e.float()).sum().item()} elements differ"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_engine_equals_in_memory_merge(tmp_path, backend, cfg):
    paths, sds = make_family(tmp_path, n=3)
    # a tiny chunk splits every big tensor into several element ranges
    result = merge_checkpoints(paths, str(tmp_path / "out"), backend=backend, chunk_mb=0.016, **cfg)
    expected = ak.merge(sds, backend=backend, **cfg)
    assert_same(load_folder(result.out_dir), expected)
    assert result.tensors == len(expected)


def test_sharded_inputs_and_outputs(tmp_path):
    paths, sds = make_family(tmp_path, n=3, shards=3)
    plan = plan_merge(paths, optimizer="adam", shard_size=4000, chunk_mb=0.01, backend=BACKENDS[0])
    assert len(plan.shard_files) > 3
    run_merge(plan, str(tmp_path / "out"))
    close_plan(plan)
    out = tmp_path / "out"
    index = json.load(open(out / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(sds[0])
    assert sorted(set(index["weight_map"].values())) == sorted(plan.shard_files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sds[0].values())
    big = max(t.numel() * t.element_size() for t in sds[0].values())
    for fname in plan.shard_files:
        data = os.path.getsize(out / fname)
        assert data < max(4000, big) + 4096  # a shard holds one oversized tensor or fits the limit (+ header)
    assert_same(load_folder(str(out)), ak.merge(sds, optimizer="adam", backend=BACKENDS[0]))
    assert json.load(open(out / "config.json"))["source"] == paths[0]
    assert sorted(os.listdir(tmp_path)) == ["m0", "m1", "m2", "out"]


@pytest.mark.parametrize("fmt", ["bin", "legacy"])
def test_bin_inputs(tmp_path, fmt):
    paths, sds = make_family(tmp_path, n=2, fmt=fmt, shards=2)
    result = merge_checkpoints(paths, str(tmp_path / "out"), optimizer="adam", backend=BACKENDS[0], chunk_mb=0.01)
    assert_same(load_folder(result.out_dir), ak.merge(sds, optimizer="adam", backend=BACKENDS[0]))
    legacy = [w for w in result.warnings if "legacy (non-zip) PyTorch checkpoint, loaded whole into memory" in w]
    assert len(legacy) == (4 if fmt == "legacy" else 0), result.warnings  # one per shard file


def test_pivot_checkpoint_path(tmp_path):
    paths, sds = make_family(tmp_path, n=3)
    pivot_sd = tiny_state_dict(7, torch.float16)
    pivot_sd["model.position_ids"] = torch.arange(17) * 2
    ppath = write_checkpoint(pivot_sd, str(tmp_path / "pivot"))
    with pytest.warns(UserWarning, match="'model.position_ids': ingredients \\[0, 1, 2\\] differ from the pivot checkpoint"):
        result = merge_checkpoints(
            paths, str(tmp_path / "out"), pivot_path=ppath, optimizer="adam", adaptive_pivot=False, backend=BACKENDS[0]
        )
    fp32 = ak.merge(sds, optimizer="adam", adaptive_pivot=False, pivot=pivot_sd, backend=BACKENDS[0], out_dtype="float32")
    got = load_folder(result.out_dir)
    for name, e in fp32.items():  # each output tensor takes the pivot's dtype (rounded once from fp32)
        if e.dtype.is_floating_point:
            assert got[name].dtype == pivot_sd[name].dtype, name
            assert torch.equal(got[name], e.to(pivot_sd[name].dtype)), name
    assert torch.equal(got["model.position_ids"], pivot_sd["model.position_ids"])
    assert json.load(open(os.path.join(result.out_dir, "config.json")))["source"] == ppath


def test_non_float_difference_is_reported(tmp_path):
    sds = [tiny_state_dict(i) for i in range(2)]
    sds[1]["model.position_ids"] = torch.arange(17) + 1
    paths = [write_checkpoint(sd, str(tmp_path / f"m{i}")) for i, sd in enumerate(sds)]
    with pytest.warns(UserWarning, match=r"non-floating tensor 'model.position_ids': ingredients \[1\] differ from ingredient 0"):
        result = merge_checkpoints(paths, str(tmp_path / "out"), backend=BACKENDS[0])
    assert torch.equal(load_folder(result.out_dir)["model.position_ids"], sds[0]["model.position_ids"])


def test_nan_stops_the_merge_and_leaves_nothing(tmp_path):
    sds = [tiny_state_dict(i) for i in range(3)]
    sds[2]["model.layers.1.mlp.up_proj.weight"][5, 7] = float("nan")
    paths = [write_checkpoint(sd, str(tmp_path / f"m{i}")) for i, sd in enumerate(sds)]
    with pytest.raises(MergeError, match=r"tensor 'model.layers.1.mlp.up_proj.weight': NaN or Inf in ingredient 2 \(.*m2/model.safetensors\)"):
        merge_checkpoints(paths, str(tmp_path / "out"), backend=BACKENDS[0])
    assert sorted(os.listdir(tmp_path)) == ["m0", "m1", "m2"]


def test_plan_checks_structure(tmp_path):
    sds = [tiny_state_dict(i) for i in range(3)]
    del sds[1]["lm_head.weight"]
    sds[2]["extra.bias"] = torch.zeros(3)
    paths = [write_checkpoint(sd, str(tmp_path / f"m{i}")) for i, sd in enumerate(sds)]
    with pytest.raises(MergeError) as e:
        plan_merge(paths)
    msg = str(e.value)
    assert "m1" in msg and "missing ['lm_head.weight']" in msg
    assert "m2" in msg and "extra ['extra.bias']" in msg


def test_plan_checks_shapes_and_dtypes(tmp_path):
    a, b = tiny_state_dict(0), tiny_state_dict(1)
    b["model.norm.weight"] = torch.zeros(49)
    paths = [write_checkpoint(sd, str(tmp_path / f"m{i}")) for i, sd in enumerate((a, b))]
    with pytest.raises(MergeError, match=r"tensor 'model.norm.weight' has shape \[49\] in ingredient 1"):
        plan_merge(paths)
    b = tiny_state_dict(1)
    b["model.position_ids"] = torch.arange(17).float()
    write_checkpoint(b, str(tmp_path / "m1"))
    with pytest.raises(MergeError, match=r"'model.position_ids' is float32 in ingredient 1 .* but int64"):
        plan_merge(paths)


def test_mixed_input_dtypes(tmp_path):
    sds = [tiny_state_dict(0, torch.bfloat16), tiny_state_dict(1, torch.float32), tiny_state_dict(2, torch.float16)]
    paths = [write_checkpoint(sd, str(tmp_path / f"m{i}")) for i, sd in enumerate(sds)]
    result = merge_checkpoints(paths, str(tmp_path / "out"), optimizer="adam", backend=BACKENDS[0], chunk_mb=0.01)
    assert_same(load_folder(result.out_dir), ak.merge(sds, optimizer="adam", backend=BACKENDS[0]))


def test_chunks_cover_every_element_once(tmp_path):
    paths, sds = make_family(tmp_path, n=2)
    plan = plan_merge(paths, chunk_mb=0.016)
    assert plan.chunk_elems == 4096
    covered = {}
    for it in plan.work:
        job = plan.tensors[it.job]
        assert 0 < it.count <= plan.chunk_elems
        covered.setdefault(job.name, []).append((it.start, it.count))
    for job in plan.tensors:
        spans = sorted(covered[job.name])
        assert spans[0][0] == 0 and all(s0 + c0 == s1 for (s0, c0), (s1, _) in zip(spans, spans[1:]))
        assert spans[-1][0] + spans[-1][1] == job.numel
    close_plan(plan)


def _bf16_model(folder, numel, seed):
    """One safetensors file holding a single bf16 tensor of ``numel`` elements (finite random values)."""
    from ame_kernels.io import ShardWriter

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = ShardWriter(os.path.join(folder, "model.safetensors"), [("w", "bfloat16", (numel,))]).create()
    step = 1 << 22
    for s in range(0, numel, step):
        c = min(step, numel - s)
        w.write("w", s, (rng.standard_normal(c, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16))
    w.close()
    return folder


def test_peak_memory_does_not_grow_with_model_size(tmp_path):
    """Peak RSS of ame-merge with 2 x 16 MiB and 2 x 256 MiB inputs, 4 MiB chunks: the same within 48 MiB
    (a reader or writer that held whole tensors would add >= 512 MiB)."""
    import subprocess
    import sys

    import yaml

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    peaks = {}
    for label, numel in (("small", 8 << 20), ("big", 128 << 20)):
        paths = [_bf16_model(str(tmp_path / f"{label}{i}"), numel, i) for i in range(2)]
        cfg = tmp_path / f"{label}.yaml"
        cfg.write_text(yaml.safe_dump({"models": paths, "optimizer": "adam", "backend": BACKENDS[-1]}))
        proc = subprocess.Popen([sys.executable, "-m", "ame_kernels", str(cfg), str(tmp_path / f"out_{label}"), "--quiet", "--chunk-mb", "4"],
                                cwd=repo, stderr=subprocess.PIPE)
        _, status, ru = os.wait4(proc.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()
        proc.stderr.close()
        peaks[label] = ru.ru_maxrss * 1024
        assert os.path.getsize(tmp_path / f"out_{label}" / "model.safetensors") > numel * 2
    assert peaks["big"] - peaks["small"] < 48 * 2**20, {k: v / 2**20 for k, v in peaks.items()}
