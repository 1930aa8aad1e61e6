"""ame-merge under a demanding user: odd folders, inconsistent indexes, corrupt headers, hostile
output targets, disk errors and bad config values. Each case: a clear one-line error naming the
file / tensor / key, found before any work where the input is at fault, and nothing left behind."""

import errno
import json
import os
import signal
import struct
import types

import pytest
import torch
from safetensors.torch import save_file

import ame_kernels as ak
from ame_kernels.engine import close_plan, merge_checkpoints, plan_merge
from ame_kernels.errors import MergeError
from ame_kernels.io import open_checkpoint, read_header
from test_cli import assert_no_output, run_cli, write_config
from test_engine import BACKENDS, assert_same
from test_io import load_folder, make_family, tiny_state_dict, write_checkpoint


def _last_error(err: str) -> str:
    line = err.strip().splitlines()[-1]
    assert line.startswith("ame-merge: error:"), err
    assert "Traceback" not in err
    return line


# ----------------------------------------------------------------------------- the output target


def test_force_never_replaces_an_input(tmp_path, capsys):
    """--force on an input folder, or on a folder holding the inputs, would delete the user's checkpoints."""
    paths, _ = make_family(tmp_path, n=2)
    cfg = write_config(tmp_path, paths)
    before = {p: sorted(os.listdir(p)) for p in paths}
    for target in (paths[1], tmp_path, os.path.join(paths[0], "model.safetensors")):
        code, _, err = run_cli(capsys, cfg, target, "--quiet", "--force")
        line = _last_error(err)
        assert code == 2, line
        assert "input" in line and str(target) in line, line
    assert {p: sorted(os.listdir(p)) for p in paths} == before
    assert os.path.exists(cfg)
    assert_no_output(tmp_path, ("m0", "m1", "merge.yaml"))
    # the Python API refuses too
    with pytest.raises(MergeError, match="input"):
        merge_checkpoints(paths, paths[0], force=True)
    assert {p: sorted(os.listdir(p)) for p in paths} == before
    # a new folder inside an input folder is fine (nothing of the input is replaced)
    code, _, err = run_cli(capsys, cfg, os.path.join(paths[0], "merged"), "--quiet", "--backend", BACKENDS[0])
    assert code == 0, err


def test_out_dir_below_a_file_is_a_usage_error(tmp_path, capsys):
    paths, _ = make_family(tmp_path, n=2)
    cfg = write_config(tmp_path, paths)
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, cfg, tmp_path / "afile" / "out", "--quiet")
    line = _last_error(err)
    assert code == 2 and "afile" in line and "not a folder" in line, line
    assert (tmp_path / "afile").read_text() == "x"
    assert_no_output(tmp_path, ("m0", "m1", "merge.yaml", "afile"))


def test_unwritable_output_parent_is_a_usage_error(tmp_path, capsys, monkeypatch):
    paths, _ = make_family(tmp_path, n=2)
    cfg = write_config(tmp_path, paths)
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path / "ro") else real_access(p, mode, **kw))
    code, _, err = run_cli(capsys, cfg, tmp_path / "ro" / "out", "--quiet")
    line = _last_error(err)
    assert code == 2 and "ro" in line and "not writable" in line, line
    assert os.listdir(tmp_path / "ro") == []


def test_failed_merge_removes_the_parent_folders_it_made(tmp_path, capsys):
    sds = [tiny_state_dict(i) for i in range(2)]
    sds[1]["lm_head.weight"][0, 0] = float("nan")
    paths = [write_checkpoint(sd, str(tmp_path / f"m{i}")) for i, sd in enumerate(sds)]
    cfg = write_config(tmp_path, paths)
    code, _, err = run_cli(capsys, cfg, tmp_path / "new" / "deeper" / "out", "--quiet", "--backend", BACKENDS[0])
    assert code == 1 and "NaN or Inf" in _last_error(err)
    assert_no_output(tmp_path, ("m0", "m1", "merge.yaml"))


def test_dry_run_checks_the_target(tmp_path, capsys):
    paths, _ = make_family(tmp_path, n=2)
    cfg = write_config(tmp_path, paths)
    (tmp_path / "out").mkdir()
    code, out, err = run_cli(capsys, cfg, tmp_path / "out", "--dry-run")
    assert code == 2 and "already exists" in _last_error(err) and out == ""
    code, out, err = run_cli(capsys, cfg, tmp_path / "out", "--dry-run", "--force")
    assert code == 0 and "models (2):" in out, err
    code, out, err = run_cli(capsys, cfg, paths[0], "--dry-run", "--force")
    assert code == 2 and "input" in _last_error(err)


def test_disk_error_names_the_file_and_a_rerun_works(tmp_path, capsys, monkeypatch):
    from ame_kernels.io import stream

    paths = [write_checkpoint({"w": torch.randn(70_000, generator=torch.Generator().manual_seed(i))}, str(tmp_path / f"m{i}"))
             for i in range(2)]
    cfg = write_config(tmp_path, paths)
    real = stream.ShardStream._write
    calls = []

    def failing(fd, mv, off):
        calls.append(off)
        if len(calls) == 2:  # mid-file: the header and the first chunk are out
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, mv, off)

    monkeypatch.setattr(stream.ShardStream, "_write", staticmethod(failing))
    code, _, err = run_cli(capsys, cfg, tmp_path / "out", "--quiet", "--chunk-mb", "0.05", "--backend", BACKENDS[0])
    line = _last_error(err)
    assert code == 1 and len(calls) >= 2
    assert "model.safetensors" in line and "No space left on device" in line and "nothing was written" in line, line
    assert_no_output(tmp_path)
    monkeypatch.setattr(stream.ShardStream, "_write", staticmethod(real))
    code, _, err = run_cli(capsys, cfg, tmp_path / "out", "--quiet", "--chunk-mb", "0.05", "--backend", BACKENDS[0])
    assert code == 0, err
    assert sorted(load_folder(str(tmp_path / "out"))) == ["w"]


def test_a_failed_final_rename_keeps_the_old_target(tmp_path, monkeypatch):
    from ame_kernels.io import AtomicDir

    monkeypatch.setenv("AME_NO_RENAME_EXCHANGE", "1")  # the two-rename (journal) fallback

    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("old")
    d = AtomicDir(str(target), force=True)
    tmp = d.create()
    (tmp_path / os.path.basename(tmp) / "f").write_text("new")
    real = os.rename

    def rename(src, dst):
        if str(src) == tmp:
            raise OSError(errno.EIO, "I/O error", src)
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        d.commit()
    d.abort()
    assert (target / "keep").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_huge_chunk_is_clamped_to_the_largest_tensor(tmp_path, capsys):
    paths, sds = make_family(tmp_path, n=2)
    plan = plan_merge(paths, chunk_mb=1e9)  # 1 PB chunks: the staging buffers would not fit anywhere
    try:
        assert plan.chunk_elems <= 8192 and plan.chunk_elems % 4096 == 0
    finally:
        close_plan(plan)
    cfg = write_config(tmp_path, paths)
    code, _, err = run_cli(capsys, cfg, tmp_path / "out", "--quiet", "--chunk-mb", "1e9", "--backend", BACKENDS[0])
    assert code == 0, err
    assert_same(load_folder(str(tmp_path / "out")), ak.merge(sds, backend=BACKENDS[0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_overflow_is_an_error_not_inf(tmp_path, capsys, backend):
    """Finite bf16/fp32 ingredients whose merge exceeds float16's range (65504) were written as Inf, silently."""
    sds = [{"w": torch.full((10,), 1e5 * (i + 1)), "ok": torch.ones(3)} for i in range(2)]
    paths = [write_checkpoint(sd, str(tmp_path / f"m{i}")) for i, sd in enumerate(sds)]
    cfg = write_config(tmp_path, paths)
    code, _, err = run_cli(capsys, cfg, tmp_path / "out", "--quiet", "--out-dtype", "float16", "--backend", backend)
    line = _last_error(err)
    assert code == 1 and "'w'" in line and "float16" in line and "--out-dtype" in line, line
    assert_no_output(tmp_path)
    code, _, err = run_cli(capsys, cfg, tmp_path / "out", "--quiet", "--out-dtype", "bfloat16", "--backend", backend)
    assert code == 0, err


def test_remote_code_and_tokenizer_files_are_copied(tmp_path, capsys):
    """A folder whose config.json maps classes to its own modules (trust_remote_code) loads only with them."""
    paths, _ = make_family(tmp_path, n=2)
    extra = ["configuration_tiny.py", "modeling_tiny.py", "tokenization_tiny.py", "sentencepiece.bpe.model", "special_tokens_map.json"]
    for f in extra:
        (tmp_path / "m0" / f).write_text(f"# {f}\n")
    (tmp_path / "m0" / "train.py").write_text("# not part of the model\n")
    code, _, err = run_cli(capsys, write_config(tmp_path, paths), tmp_path / "out", "--quiet", "--backend", BACKENDS[0])
    assert code == 0, err
    got = set(os.listdir(tmp_path / "out"))
    assert set(extra) <= got and "train.py" not in got, got
    assert (tmp_path / "out" / "modeling_tiny.py").read_text() == "# modeling_tiny.py\n"


def test_ctrl_c_while_planning_is_one_line(tmp_path, capsys, monkeypatch):
    """Opening many .bin files can take a while: a Ctrl-C then gave a traceback instead of exit 130."""
    from ame_kernels import engine

    paths, _ = make_family(tmp_path, n=2)
    cfg = write_config(tmp_path, paths)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "plan_merge", interrupted)
    code, _, err = run_cli(capsys, cfg, tmp_path / "out", "--quiet")
    assert code == 130 and "interrupted" in _last_error(err) and "nothing was written" in err
    assert_no_output(tmp_path)


# ----------------------------------------------------------------------------- inputs


def _sharded(tmp_path, name="m"):
    sd = tiny_state_dict(4)
    folder = write_checkpoint(sd, str(tmp_path / name), shards=2)
    index = os.path.join(folder, "model.safetensors.index.json")
    return sd, folder, index, json.load(open(index))


def test_shard_holding_a_tensor_the_index_does_not_list(tmp_path):
    sd, folder, index, data = _sharded(tmp_path)
    name, shard = next(iter(data["weight_map"].items()))
    del data["weight_map"][name]
    json.dump(data, open(index, "w"))
    with pytest.raises(MergeError) as e:
        open_checkpoint(folder)
    msg = str(e.value)
    assert shard in msg and repr(name) in msg and "model.safetensors.index.json" in msg and "does not list" in msg, msg


def test_tensor_in_two_shards(tmp_path):
    sd, folder, index, data = _sharded(tmp_path)
    names = list(sd)
    dup = names[1]  # listed in shard 2
    save_file({n: sd[n].contiguous() for n in names[0::2] + [dup]}, os.path.join(folder, "model-00001-of-00002.safetensors"))
    with pytest.raises(MergeError) as e:
        open_checkpoint(folder)
    msg = str(e.value)
    assert "model-00001-of-00002.safetensors" in msg and repr(dup) in msg and "model-00002-of-00002.safetensors" in msg, msg


def test_index_naming_a_folder_or_nothing(tmp_path):
    sd, folder, index, data = _sharded(tmp_path)
    shard = os.path.join(folder, "model-00002-of-00002.safetensors")
    os.remove(shard)
    os.mkdir(shard)
    with pytest.raises(MergeError, match=r"model-00002-of-00002.safetensors.*is a folder"):
        open_checkpoint(folder)
    json.dump({"weight_map": {}}, open(index, "w"))
    with pytest.raises(MergeError, match=r"model.safetensors.index.json: lists no tensors"):
        open_checkpoint(folder)


def test_checkpoint_with_no_tensors(tmp_path):
    path = str(tmp_path / "empty.safetensors")
    header = b"{}      "
    open(path, "wb").write(struct.pack("<Q", len(header)) + header)
    with pytest.raises(MergeError, match=r"empty.safetensors: holds no tensors"):
        open_checkpoint(path)


def _rewrite_header(path, edit):
    raw = open(path, "rb").read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    open(path, "wb").write(struct.pack("<Q", len(h)) + h + raw[8 + hlen :])


@pytest.mark.parametrize(
    "edit",
    [
        lambda e: e.update(shape=[e["shape"][0] + 0.5]),  # was read as int(48.5) = 48
        lambda e: e.update(shape=e["shape"] + [True]),  # was read as a trailing dim of 1
        lambda e: e.update(shape=str(e["shape"][0])),  # was read digit by digit
        lambda e: e.update(data_offsets=[str(o) for o in e["data_offsets"]]),
        lambda e: e.update(data_offsets=e["data_offsets"] + [0]),
    ],
    ids=["float-dim", "bool-dim", "string-shape", "string-offsets", "three-offsets"],
)
def test_header_fields_must_be_integers(tmp_path, edit):
    path = str(tmp_path / "x.safetensors")
    save_file({"a": torch.zeros(48), "b": torch.ones(3, dtype=torch.int64)}, path)
    _rewrite_header(path, lambda h: edit(h["a"]))
    with pytest.raises(MergeError, match=r"x.safetensors: corrupt header entry for tensor 'a'"):
        read_header(path)


def test_non_float_dtype_mismatch_is_named_plainly(tmp_path):
    sds = [tiny_state_dict(i) for i in range(2)]
    sds[1]["model.position_ids"] = sds[1]["model.position_ids"].int()
    paths = [write_checkpoint(sd, str(tmp_path / f"m{i}")) for i, sd in enumerate(sds)]
    with pytest.raises(MergeError) as e:
        plan_merge(paths)
    msg = str(e.value)
    assert "'model.position_ids' is int32 in ingredient 1" in msg and "int64 in ingredient 0" in msg
    assert "floating and non-floating" not in msg, msg  # both are integer tensors


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    "text, needles",
    [
        ("models:\n  - {path: m0, score: .nan}\n  - {path: m1, score: 1}\n", ["models[0].score", "finite", "nan"]),
        ("models: [m0, m1]\nscores: [1, .nan]\n", ["scores", "finite"]),
        ("models: [m0, m1]\nweight_decay: .nan\n", ["weight_decay", "finite"]),
        ("models: [m0, m1]\noptimizer: adagrad\nlr_decay: .inf\n", ["lr_decay", "finite"]),
        ("models: [m0, m1]\nchunk_mb: true\n", ["chunk_mb", "expected a number", "True"]),
        ("models: [m0, m1]\nlr: 1\noptimizer: adam\nlr: 2\n", ["duplicate key 'lr'", "line 4"]),
        ("models:\n  - {path: m0, path: m1}\n", ["duplicate key 'path'"]),
    ],
    ids=["nan-score", "nan-scores", "nan-weight-decay", "inf-lr-decay", "bool-chunk", "duplicate-key", "duplicate-model-key"],
)
def test_bad_config_values_are_named_before_work(tmp_path, capsys, text, needles):
    make_family(tmp_path, n=2)
    (tmp_path / "merge.yaml").write_text(text)
    code, _, err = run_cli(capsys, tmp_path / "merge.yaml", tmp_path / "out", "--quiet", "--backend", BACKENDS[0])
    line = _last_error(err)
    assert code == 2, line
    assert "merge.yaml" in line
    for needle in needles:
        assert needle in line, line
    assert_no_output(tmp_path, ("m0", "m1", "merge.yaml"))


# ----------------------------------------------------------------------------- distributed


def test_distributed_sigterm_exits_143(monkeypatch):
    """Under torchrun a SIGTERM is reported as 128 + 15, as in a single process (not 130, Ctrl-C's code)."""
    from ame_kernels import cli_common, distributed
    from ame_kernels.io.atomic import Terminated

    class OneRank:
        def __init__(self, device):
            pass

        def gather(self, obj):
            return [obj]

        def close(self):
            pass

    def prepare(args):
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr(distributed, "_Group", OneRank)
    monkeypatch.setattr(cli_common, "prepare", prepare)
    args = types.SimpleNamespace(device="cpu", threads="1", out_dir="out", force=False, quiet=True, verbose=False)
    world = {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1}
    assert distributed.main_distributed(args, world) == 128 + signal.SIGTERM


def test_out_dtype_is_written_into_the_copied_hf_config(tmp_path, capsys):
    """--out-dtype bfloat16 on float32 checkpoints: the copied config.json says bfloat16 too
    (loaders with torch_dtype='auto' read it); without --out-dtype the config is copied as is."""
    paths, _ = make_family(tmp_path, n=2, dtype=torch.float32)
    for p in paths:
        with open(os.path.join(p, "config.json"), "w") as f:
            json.dump({"model_type": "tiny", "torch_dtype": "float32"}, f)
    cfg = write_config(tmp_path, paths)
    assert run_cli(capsys, cfg, tmp_path / "bf", "--out-dtype", "bfloat16", "--quiet")[0] == 0
    assert json.load(open(tmp_path / "bf" / "config.json")) == {"model_type": "tiny", "torch_dtype": "bfloat16"}
    assert run_cli(capsys, cfg, tmp_path / "same", "--quiet")[0] == 0
    assert json.load(open(tmp_path / "same" / "config.json"))["torch_dtype"] == "float32"


def test_a_folder_with_a_single_file_and_an_index_loads_the_single_file(tmp_path):
    """As transformers does: model.safetensors is preferred over model.safetensors.index.json."""
    folder = tmp_path / "m"
    os.makedirs(folder)
    save_file({"a": torch.ones(3)}, str(folder / "model.safetensors"))
    save_file({"b": torch.ones(2)}, str(folder / "shard-1.safetensors"))
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"b": "shard-1.safetensors"}}')
    ck = open_checkpoint(str(folder))
    try:
        assert sorted(ck.tensors) == ["a"]
    finally:
        ck.close()
