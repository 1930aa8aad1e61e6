"""Distributed merges: 2 gloo processes under torchrun write the single-process output byte for byte."""

import filecmp
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from ame_kernels.distributed import split_work, world_from_env
from ame_kernels.engine import close_plan, plan_merge
from test_io import make_family, tiny_state_dict, write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--quiet", "--chunk-mb", "0.01", "--shard-size", "12kB"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cfg, out, nproc=2, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc-per-node={nproc}",
           "--rdzv-backend", "c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
           "-m", "ame_kernels", str(cfg), str(out), *FLAGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def write_config(tmp_path, paths, **fields):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"models": paths, **fields}))
    return path


def test_two_processes_equal_one_byte_for_byte(tmp_path):
    paths, _ = make_family(tmp_path, n=3)
    cfg = write_config(tmp_path, paths, optimizer="adam", lr="1e-2", epochs=2)
    single = subprocess.run([sys.executable, "-m", "ame_kernels", str(cfg), str(tmp_path / "one"), *FLAGS],
                            cwd=REPO, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    dist = torchrun(cfg, tmp_path / "two")
    assert dist.returncode == 0, dist.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    files = sorted(f for f in os.listdir(one) if f != "ame_merge.yaml")
    assert sorted(f for f in os.listdir(two) if f != "ame_merge.yaml") == files
    assert sum(f.endswith(".safetensors") for f in files) > 2  # several shards, written by both ranks
    _, mismatch, errors = filecmp.cmpfiles(one, two, files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    prov = yaml.safe_load((two / "ame_merge.yaml").read_text())
    assert prov["distributed"]["world_size"] == 2
    assert sorted(os.listdir(tmp_path)) == ["m0", "m1", "m2", "merge.yaml", "one", "two"]


def test_a_failing_rank_fails_the_run(tmp_path):
    sds = [tiny_state_dict(i) for i in range(3)]
    paths = [write_checkpoint(sd, str(tmp_path / f"m{i}")) for i, sd in enumerate(sds)]
    plan = plan_merge(paths, chunk_mb=0.01, shard_size="12kB")
    shares = split_work(plan, 2)
    rank0 = {plan.tensors[it.job].name for it in shares[0]}
    victim = [plan.tensors[it.job].name for it in shares[1] if plan.tensors[it.job].merge and plan.tensors[it.job].name not in rank0][-1]
    close_plan(plan)
    sds[2][victim].view(-1)[3] = float("nan")  # only rank 1 reads it
    write_checkpoint(sds[2], paths[2])
    res = torchrun(write_config(tmp_path, paths), tmp_path / "out")
    assert res.returncode != 0
    assert f"ame-merge: error: rank 1: tensor '{victim}': NaN or Inf in ingredient 2" in res.stderr
    assert "m2/model.safetensors" in res.stderr and "nothing was written" in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["m0", "m1", "m2", "merge.yaml"]


def test_a_bad_shard_stops_every_rank_before_work(tmp_path):
    paths, _ = make_family(tmp_path, n=2, shards=2)
    shard = os.path.join(paths[1], "model-00002-of-00002.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 64)
    res = torchrun(write_config(tmp_path, paths), tmp_path / "out")
    assert res.returncode != 0
    assert "m1/model-00002-of-00002.safetensors: truncated file" in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["m0", "m1", "merge.yaml"]


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_split_work_is_contiguous_and_balanced(tmp_path, k):
    paths, _ = make_family(tmp_path, n=2)
    plan = plan_merge(paths, chunk_mb=0.01)
    shares = split_work(plan, k)
    assert [it for s in shares for it in s] == plan.work  # disjoint, in order, complete
    total = sum(plan.item_bytes(it) for it in plan.work)
    biggest = max(plan.item_bytes(it) for it in plan.work)
    for s in shares:
        assert abs(sum(plan.item_bytes(it) for it in s) - total / k) <= biggest
    close_plan(plan)


def test_world_from_env():
    assert world_from_env({}) is None
    assert world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    w = world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert w == {"rank": 3, "world_size": 4, "local_rank": 1, "local_world_size": 2}
