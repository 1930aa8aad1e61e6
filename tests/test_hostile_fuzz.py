"""Fuzzing ame-merge in the suite: hostile safetensors headers, shard indexes and YAML configs
(tools/fuzz_hostile.py's generators, driven by hypothesis), each through a merge, a --dry-run or
``inspect`` in-process. For every input: exit 0, 1 or 2; no traceback; no hang; bounded memory; no
output (or hidden temporary folder) after a failure. A bounded number of cases per ``make test``;
set AME_FUZZ_EXAMPLES for more (tools/fuzz_hostile.py runs each case in its own process, under a
memory limit)."""

import contextlib
import io
import os
import resource
import signal
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import fuzz_hostile  # noqa: E402

from ame_kernels.cli import main  # noqa: E402
from test_hostile_config import Blocked  # noqa: E402

EXAMPLES = int(os.environ.get("AME_FUZZ_EXAMPLES", "12"))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_case(rng, kind):
    with tempfile.TemporaryDirectory(prefix="ame-fuzz-") as root:
        argv, _ = fuzz_hostile.make_case(rng, root, kind)
        out, err = io.StringIO(), io.StringIO()

        def on_alarm(signum, frame):
            raise Blocked(f"no answer in 30 s: {argv}")

        old = signal.signal(signal.SIGALRM, on_alarm)
        before = _peak_rss()
        signal.alarm(30)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as e:  # noqa: PERF203 (a path that exits instead of returning)
                    code = e.code
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        grew = _peak_rss() - before
        bad = fuzz_hostile.problems(code, err.getvalue(), root, argv)
        if grew > 1 << 30:
            bad.append(f"peak RSS grew by {grew >> 20} MiB")
        assert not bad, f"{argv}: {bad}\n{err.getvalue()[-3000:]}"


_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.mark.parametrize("kind", ["header", "index", "yaml"])
def test_fuzzed_inputs_end_cleanly(kind):
    @_SETTINGS
    @given(rng=st.randoms(use_true_random=False))
    def run(rng):
        _run_case(rng, kind)

    run()


def test_fuzz_script_runs(tmp_path):
    """tools/fuzz_hostile.py itself (two cases, each in its own process)."""
    assert fuzz_hostile.main(["-n", "2", "--seed", "3", "--timeout", "60"]) == 0
