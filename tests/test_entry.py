"""The ame-merge console entry (ame_merge_entry.py): a signal while the package is still
importing is one line and the signal's exit code, not a traceback or a silent -15."""

import os
import signal
import subprocess
import sys

import pytest

from test_hostile_files import wait_for_pause

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = "import sys, ame_merge_entry; sys.exit(ame_merge_entry.main())"


@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C"),
                                             (signal.SIGHUP, 129, "SIGHUP")])
def test_a_signal_while_importing_is_one_line(tmp_path, sig, code, name):
    env = {**os.environ, "AME_TEST_PAUSE_AT": "import"}
    proc = subprocess.Popen([sys.executable, "-c", ENTRY, "merge.yaml", str(tmp_path / "out")], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        paused, seen = wait_for_pause(proc, "import")
        assert paused is not None, seen
        os.kill(paused, sig)  # before 'import ame_kernels': was a KeyboardInterrupt traceback / a silent -15
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (seen + err).decode()
    lines = [ln for ln in err.splitlines() if not ln.startswith("ame-test-pause")]
    assert proc.returncode == code, err
    assert lines == [f"ame-merge: error: interrupted ({name}) while starting; nothing was written"], err


def test_the_entry_runs_the_cli():
    out = subprocess.run([sys.executable, "-c", ENTRY, "--version"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ame-merge "), out


def test_a_strategy_config_without_evaluate_fails_the_dry_run(tmp_path, capsys):
    """It passed --dry-run, then failed (issue 17, defect 9)."""
    import yaml

    from ame_kernels.cli import main
    from test_io import make_family

    paths, _ = make_family(tmp_path, n=2)
    for strategy in ("greedy_soup", "greedy"):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({"strategy": strategy, "models": paths}))
        assert main([str(cfg), "--dry-run"]) == 2
        assert f"strategy '{strategy}' needs 'evaluate: module:function'" in capsys.readouterr().err
