"""Interruptions and hostile targets: a --force replacement killed between its renames, signals at the
commit, bind mounts inside OUT_DIR, SIGKILL leftovers, early signals, strategy configs (issue 17,
defects 2, 5, 6, 9, 10, 13), and the interruption matrix: SIGKILL, SIGINT and SIGTERM at points
across a merge, after each of which OUT_DIR is absent, the old complete output or the new one, and
the next run recovers."""

import errno
import os
import shutil
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import ame_kernels.cli as cli
from ame_kernels.io.atomic import check_target, remove_stale_temps
from test_cli import REPO, run_cli, write_config
from test_hostile_files import resume, wait_for_pause
from test_io import make_family


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _hidden(tmp_path):
    return sorted(e for e in os.listdir(tmp_path) if e.startswith(".out."))


def _old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "OLD").write_text("the old output")
    return out


def _state(out) -> str:
    """'absent', 'old' or 'new' (a complete merge: every shard readable, provenance written); else fails."""
    if not os.path.lexists(out):
        return "absent"
    names = set(os.listdir(out))
    if names == {"OLD"}:
        return "old"
    assert {"model.safetensors", "ame_merge.yaml", "config.json"} <= names and "OLD" not in names, names
    load_file(os.path.join(out, "model.safetensors"))  # complete: the safetensors package reads it whole
    return "new"


# ----------------------------------------------------------------------------- the commit window


def test_leftovers_of_a_replacement_killed_between_the_renames_are_recovered(tmp_path):
    """The state a SIGKILL between the two renames left: OUT_DIR gone, both copies hidden. The next run
    deleted both; now it puts a copy back (the new one when the journal vouches for it, else the old)."""
    pid = _dead_pid()
    new, old = tmp_path / f".out.tmp-{pid}", tmp_path / f".out.tmp-{pid}.old"
    new.mkdir()
    (new / "NEW").write_text("complete")
    old.mkdir()
    (old / "OLD").write_text("old")
    remove_stale_temps(str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["OLD"] and _hidden(tmp_path) == []
    # with the journal (written once the new folder is complete): the commit is completed
    new.mkdir()
    (new / "NEW").write_text("complete")
    shutil.move(str(tmp_path / "out"), str(old))
    (tmp_path / f".out.tmp-{pid}.commit").write_text(str(tmp_path / "out"))
    check_target(str(tmp_path / "out"), force=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["NEW"] and _hidden(tmp_path) == []


def _merge(tmp_path, *extra, stage=None, env=None):
    cfg = str(tmp_path / "merge.yaml")
    env = {**os.environ, **(env or {})}
    env.pop("AME_NO_FORK_GUARD", None)
    if stage:
        env["AME_TEST_PAUSE_AT"] = stage
    return subprocess.Popen(
        [sys.executable, "-m", "ame_kernels", cfg, str(tmp_path / "out"), "--quiet", *extra],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _interrupt(tmp_path, stage, sig, *extra, env=None):
    """Run a merge, stop it at ``stage``, send ``sig`` (then let it go on); (exit code, stderr)."""
    proc = _merge(tmp_path, *extra, stage=stage, env=env)
    try:
        paused, seen = wait_for_pause(proc, stage)
        assert paused is not None, f"the merge never reached the {stage!r} test hook: {seen.decode()}"
        if sig == signal.SIGKILL:
            # the merge runs in a child of the CLI (the SIGBUS guard), which dies with it (PR_SET_PDEATHSIG);
            # wait for the CLI to be gone before closing stdin, which would let a still-living child go on
            proc.kill()
            proc.wait()
        else:
            # to the process that merges (the CLI's child), so the signal has arrived before the merge
            # goes on (forwarded by the CLI, it could come after the end)
            os.kill(paused, sig)
            resume(proc)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, seen.decode() + err.decode()


def _wait_for_the_merge_child(tmp_path, timeout=30):
    """The CLI's merge child gets SIGKILL when the CLI dies (PR_SET_PDEATHSIG), a moment later: wait
    until the owner of every hidden folder is gone (or a zombie), as it is for any later run."""
    import time

    from ame_kernels.io.atomic import _pid_alive

    deadline = time.monotonic() + timeout
    pids = {int(e.split("tmp-")[1].split(".")[0]) for e in _hidden(tmp_path)}
    while any(_pid_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"processes {pids} outlived the CLI"
        time.sleep(0.01)


def _recovers(tmp_path, before):
    """The next run's target check (a merge or a --dry-run) cleans every leftover and keeps a complete OUT_DIR."""
    _wait_for_the_merge_child(tmp_path)
    check_target(str(tmp_path / "out"), force=True)
    assert _hidden(tmp_path) == [], _hidden(tmp_path)
    after = _state(tmp_path / "out")
    assert after == before or (before == "absent" and after == "new"), (before, after)
    return after


def test_force_killed_between_the_two_renames_recovers_the_new_output(tmp_path):
    """The journal fallback (no renameat2): SIGKILL with the old folder moved aside and the new one not in place."""
    paths, _ = make_family(tmp_path, n=2)
    write_config(tmp_path, paths)
    _old_output(tmp_path)
    code, err = _interrupt(tmp_path, "commit-moved", signal.SIGKILL, "--force", env={"AME_NO_RENAME_EXCHANGE": "1"})
    assert code == -signal.SIGKILL, err
    assert _state(tmp_path / "out") == "absent"  # the window: both copies hidden
    assert _recovers(tmp_path, "absent") == "new"  # completed, not deleted


@pytest.mark.parametrize("stage", ["commit", "commit-exchanged"])
def test_force_by_exchange_has_no_window(tmp_path, stage):
    paths, _ = make_family(tmp_path, n=2)
    write_config(tmp_path, paths)
    _old_output(tmp_path)
    code, err = _interrupt(tmp_path, stage, signal.SIGKILL, "--force")
    assert code == -signal.SIGKILL, err
    state = _state(tmp_path / "out")
    assert state == ("old" if stage == "commit" else "new")
    _recovers(tmp_path, state)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("force", [False, True], ids=["new", "force"])
def test_signal_at_the_commit_reports_the_complete_output(tmp_path, capsys, monkeypatch, sig, force):
    """A signal as the final rename happens: was 'interrupted ... nothing was written' (130/143) with the
    output complete. The signal is held while renaming and delivered after: the output is reported."""
    monkeypatch.setenv("AME_NO_RENAME_EXCHANGE", "1")  # os.rename, in the old and the new code
    paths, _ = make_family(tmp_path, n=2)
    cfg = write_config(tmp_path, paths)
    if force:
        _old_output(tmp_path)
    out = str(tmp_path / "out")
    real = os.rename

    def rename_then_signal(src, dst):
        real(src, dst)
        if str(dst) == out:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(os, "rename", rename_then_signal)
    code, _, err = run_cli(capsys, cfg, out, "--quiet", *(["--force"] if force else []))
    assert code == 0, err
    assert "nothing was written" not in err and "holds the merged model" in err, err
    assert _state(out) == "new" and _hidden(tmp_path) == []


# ----------------------------------------------------------------------------- the interruption matrix

# a few points by default (each case is a process start); every combination with $AME_HOSTILE_FULL
# (tools/fuzz_hostile.py sets it)
MATRIX = [
    ("chunk", signal.SIGKILL, True), ("chunk", signal.SIGTERM, False),
    ("metadata", signal.SIGINT, True), ("commit", signal.SIGTERM, True),
]
if os.environ.get("AME_HOSTILE_FULL"):
    MATRIX = [(s, g, f) for s in ("chunk", "metadata", "commit", "committed")
              for g in (signal.SIGKILL, signal.SIGINT, signal.SIGTERM) for f in (False, True)]


@pytest.mark.parametrize("stage, sig, force", MATRIX,
                         ids=lambda v: v if isinstance(v, str) else ("force" if v is True else "new" if v is False else signal.Signals(v).name))
def test_interrupted_anywhere_the_output_is_absent_old_or_new(tmp_path, stage, sig, force):
    paths, _ = make_family(tmp_path, n=2)
    write_config(tmp_path, paths)
    before = "absent"
    if force:
        _old_output(tmp_path)
        before = "old"
    code, err = _interrupt(tmp_path, stage, sig, *(["--force"] if force else []))
    state = _state(tmp_path / "out")
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert state in (before, "new")
    elif stage in ("commit", "committed"):  # delivered once the output is in place: reported as merged
        assert code == 0 and state == "new" and "holds the merged model" in err, (code, err)
    else:
        assert code == 128 + sig and state == before, (code, state, err)
        assert "interrupted" in err and "nothing was written" in err, err
        assert _hidden(tmp_path) == [], _hidden(tmp_path)
    _recovers(tmp_path, state)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_the_cli_forwards_signals_to_its_merge_process(tmp_path, sig):
    paths, _ = make_family(tmp_path, n=2)
    write_config(tmp_path, paths)
    proc = _merge(tmp_path, stage="chunk")
    try:
        paused, seen = wait_for_pause(proc, "chunk")
        assert paused is not None, seen
        proc.send_signal(sig)  # to the CLI only; the merge, paused, goes on only when the signal reaches it
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert b"nothing was written" in err
    assert not os.path.exists(tmp_path / "out") and _hidden(tmp_path) == []


# ----------------------------------------------------------------------------- hostile targets


def _unshare_works() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs a private mount namespace (unshare -m)")
def test_force_never_empties_an_input_bind_mounted_into_out_dir(tmp_path):
    paths, _ = make_family(tmp_path, n=2)
    cfg = write_config(tmp_path, paths)
    out = _old_output(tmp_path)
    (out / "mnt").mkdir()
    before = sorted(os.listdir(paths[0]))
    script = (
        f"mount --bind {paths[0]} {out / 'mnt'} && "
        f"{sys.executable} -m ame_kernels {cfg} {out} --force --quiet; echo rc=$?"
    )
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr
    assert "input" in proc.stderr or "mount point" in proc.stderr, proc.stderr
    assert sorted(os.listdir(paths[0])) == before  # the input is whole


def test_mount_points_are_never_crossed_when_removing(tmp_path, monkeypatch):
    import ame_kernels.io.atomic as atomic

    out = _old_output(tmp_path)
    (out / "mnt").mkdir()
    (out / "mnt" / "precious").write_text("x")
    monkeypatch.setattr(atomic, "_mount_points", lambda: {str(out / "mnt")})
    with pytest.raises(cli.MergeError, match="mount point"):
        check_target(str(out), force=True)
    assert atomic.remove_tree(str(out)) is False
    assert (out / "mnt" / "precious").read_text() == "x"


def test_sigkill_leftovers_are_cleaned_by_a_refused_rerun_and_a_dry_run(tmp_path, capsys):
    paths, _ = make_family(tmp_path, n=2)
    cfg = write_config(tmp_path, paths)
    _old_output(tmp_path)
    for extra in ([], ["--dry-run", "--force"]):
        stale = tmp_path / f".out.tmp-{_dead_pid()}"
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"\0" * 4096)  # up to the output's size
        code, _, err = run_cli(capsys, cfg, tmp_path / "out", "--quiet", *extra)
        assert code == (2 if not extra else 0), err
        assert _hidden(tmp_path) == []


# ----------------------------------------------------------------------------- the entry point


def test_ctrl_c_while_starting_is_one_line(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    code = cli.main(["merge.yaml", "out"])  # was a KeyboardInterrupt traceback
    err = capsys.readouterr().err
    assert code == 130 and err.strip().startswith("ame-merge: error: interrupted") and "Traceback" not in err


def test_sigterm_handler_is_installed_first(capsys, monkeypatch):
    seen = []

    def parser():
        seen.append(signal.getsignal(signal.SIGTERM))
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", parser)
    before = signal.getsignal(signal.SIGTERM)
    cli.main(["merge.yaml", "out"])
    assert seen and seen[0] not in (signal.SIG_DFL, signal.SIG_IGN, None, before)  # was the default: a silent -15
    assert signal.getsignal(signal.SIGTERM) == before  # restored


# ----------------------------------------------------------------------------- strategy configs


@pytest.mark.parametrize("failure", ["disk-full", "ctrl-c"])
def test_strategy_configs_share_the_error_and_signal_path(tmp_path, capsys, monkeypatch, failure):
    from ame_kernels.io.safetensors import ShardWriter

    paths, _ = make_family(tmp_path, n=2)
    cfg = write_config(tmp_path, paths, strategy="stew")  # in memory, written through engine.write_state_dict

    def write(*a, **k):
        if failure == "ctrl-c":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardWriter, "write", write)
    code, _, err = run_cli(capsys, cfg, tmp_path / "out", "--quiet")  # was a traceback out of main
    assert code == (1 if failure == "disk-full" else 130), err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("ame-merge: error:"), err
    assert not os.path.exists(tmp_path / "out") and _hidden(tmp_path) == []
