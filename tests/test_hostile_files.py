"""Hostile checkpoint files: deep JSON, FIFOs, overlaps hidden by zero-size tensors, files truncated
after planning or while mapped (SIGBUS), disk errors that name no file (issue 17, defects 3, 7, 8, 11, 12)."""

import errno
import json
import os
import signal
import struct
import subprocess
import sys

import pytest

from ame_kernels.cli import main
from ame_kernels.errors import MergeError
from ame_kernels.io import open_checkpoint, read_header
from test_cli import REPO, assert_no_output, run_cli, write_config
from test_hostile_config import alarm  # noqa: F401 (fixture)
from test_io import make_family, tiny_state_dict, write_checkpoint


def _raw_safetensors(path, header: bytes, data: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("ame-merge: error:"), err
    return line


# ----------------------------------------------------------------------------- headers and indexes


def test_deeply_nested_header_is_a_corrupt_file(tmp_path):
    path = _raw_safetensors(tmp_path / "x.safetensors", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(MergeError, match="x.safetensors.*nested"):  # RecursionError before
        read_header(path)


def test_deeply_nested_index_is_a_usage_error(tmp_path, capsys):
    paths, _ = make_family(tmp_path, n=2, shards=2)
    index = os.path.join(paths[0], "model.safetensors.index.json")
    with open(index, "w") as f:
        f.write('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, _, err = run_cli(capsys, write_config(tmp_path, paths), "--dry-run")
    line = _error_line(err)
    assert code == 2 and "index.json" in line and "nested" in line, line


def test_overlap_hidden_behind_a_zero_size_tensor(tmp_path):
    # a [0, 8) and b [4, 12) overlap; z, of zero size at 4, sat between them in offset order
    header = json.dumps({
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }).encode()
    path = _raw_safetensors(tmp_path / "o.safetensors", header, b"\0" * 12)
    with pytest.raises(MergeError, match="'a' and 'b' overlap"):
        read_header(path)
    # zero-size tensors at the same offset as others are fine
    ok = json.dumps({
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "z": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
        "y": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
    }).encode()
    assert set(read_header(_raw_safetensors(tmp_path / "ok.safetensors", ok, b"\0" * 8))[0]) == {"a", "z", "y"}


# ----------------------------------------------------------------------------- FIFOs and devices


def test_fifo_model_file_does_not_block(tmp_path, capsys, alarm):  # noqa: F811
    paths, _ = make_family(tmp_path, n=2)
    os.unlink(os.path.join(paths[1], "model.safetensors"))
    os.mkfifo(os.path.join(paths[1], "model.safetensors"))  # every command blocked forever on it
    cfg = write_config(tmp_path, paths)
    alarm(20)
    code, _, err = run_cli(capsys, cfg, "--dry-run")
    line = _error_line(err)
    assert code == 2 and "model.safetensors" in line and "not a regular file" in line, line
    os.mkfifo(tmp_path / "w.safetensors")
    with pytest.raises(MergeError, match="not a regular file"):
        open_checkpoint(str(tmp_path / "w.safetensors"))
    os.mkfifo(tmp_path / "w.bin")
    with pytest.raises(MergeError, match="not a regular file"):
        open_checkpoint(str(tmp_path / "w.bin"))


# ----------------------------------------------------------------------------- truncated inputs


def test_input_truncated_after_planning_is_named(tmp_path, capsys, monkeypatch):
    """Cut between the checks and the merge: was 'ValueError: madvise start out of bounds', no file named."""
    import ame_kernels.cli as cli

    paths, _ = make_family(tmp_path, n=2)
    victim = os.path.join(paths[1], "model.safetensors")
    real = cli.prepare

    def prepare_then_truncate(args):
        plan = real(args)
        os.truncate(victim, os.path.getsize(victim) // 2)
        return plan

    monkeypatch.setattr(cli, "prepare", prepare_then_truncate)
    code, _, err = run_cli(capsys, write_config(tmp_path, paths), tmp_path / "out", "--quiet")
    line = _error_line(err)
    assert code == 1 and victim in line and "truncated" in line, line
    assert_no_output(tmp_path, ("m0", "m1", "merge.yaml"))


def _big_pair(tmp_path):
    """Two float32 models of 4 MiB each: many chunks at --chunk-mb 0.25."""
    import torch

    paths = [write_checkpoint({"w": torch.full((1 << 20,), float(i))}, str(tmp_path / f"m{i}")) for i in range(2)]
    return paths, write_config(tmp_path, paths)


def _pause_run(cfg, out, stage, *extra, env=None):
    env = {**os.environ, "AME_TEST_PAUSE_AT": stage, **(env or {})}
    env.pop("AME_NO_FORK_GUARD", None)
    return subprocess.Popen(
        [sys.executable, "-m", "ame_kernels", cfg, str(out), "--quiet", *extra],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def wait_for_pause(proc, stage, timeout=60):
    """Read stderr until the pause line of ``stage``: (the pid of the paused process, or None when the
    process ended without pausing, the stderr read so far)."""
    import re
    import selectors
    import time

    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    seen = b""
    marker = re.compile(rb"ame-test-pause: " + re.escape(stage.encode()) + rb" (\d+)\n")
    deadline = time.monotonic() + timeout
    while True:
        m = marker.search(seen)
        if m:
            return int(m.group(1)), seen
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            return None, seen
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            return None, seen
        seen += chunk


def resume(proc):
    proc.stdin.write(b"x")
    proc.stdin.flush()


def test_input_truncated_while_mapped_is_an_error_not_sigbus(tmp_path):
    """Cut while the kernels read it: the process died of SIGBUS (exit 135, no message, temp folder left)."""
    paths, cfg = _big_pair(tmp_path)
    victim = os.path.join(paths[1], "model.safetensors")
    proc = _pause_run(cfg, tmp_path / "out", "chunk", "--chunk-mb", "0.25")
    paused, _ = wait_for_pause(proc, "chunk")
    try:
        assert paused is not None, "the merge never reached the 'chunk' test hook"
        os.truncate(victim, 4096)  # the views of this chunk are made; its pages are gone now
        resume(proc)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode == 1, (proc.returncode, err)
    line = _error_line(err)
    assert victim in line and "truncated" in line, line
    assert_no_output(tmp_path, ("m0", "m1", "merge.yaml"))


# ----------------------------------------------------------------------------- messages


def test_disk_full_while_writing_metadata_names_the_output(tmp_path, capsys, monkeypatch):
    import ame_kernels.engine as engine

    def full(plan, folder, extra=None):
        raise OSError(errno.ENOSPC, "No space left on device")  # as f.write/close raise it: no file name

    monkeypatch.setattr(engine, "write_metadata", full)
    paths, _ = make_family(tmp_path, n=2)
    code, _, err = run_cli(capsys, write_config(tmp_path, paths), tmp_path / "out", "--quiet")
    line = _error_line(err)
    assert code == 1 and "No space left" in line and str(tmp_path / ".out.tmp-") in line, line
    assert_no_output(tmp_path, ("m0", "m1", "merge.yaml"))


@pytest.mark.parametrize("check_finite", [True, False])
def test_float64_beyond_float32_is_named_without_stray_warnings(tmp_path, capsys, check_finite):
    """A finite float64 value of 1e300 became Inf in the fp32 cast: numpy's 'overflow encountered in
    cast' warning (naming nothing), then 'NaN or Inf in ingredient 0', which the file does not hold."""
    import numpy as np

    sys.path.insert(0, os.path.join(REPO, "tools"))
    from fuzz_hostile import safetensors_bytes

    for i in range(2):
        os.makedirs(tmp_path / f"m{i}")
        (tmp_path / f"m{i}" / "model.safetensors").write_bytes(safetensors_bytes({"h": ("F64", np.full(4, 1e300, "<f8"))}))
    cfg = write_config(tmp_path, [str(tmp_path / "m0"), str(tmp_path / "m1")], check_finite=check_finite)
    code, _, err = run_cli(capsys, cfg, tmp_path / "out", "--quiet")
    assert "overflow" not in err, err
    if check_finite:
        line = _error_line(err)
        assert code == 1 and "float32 range" in line and "m0" in line, line
        assert_no_output(tmp_path, ("m0", "m1", "merge.yaml"))
    else:
        assert code == 0, err
