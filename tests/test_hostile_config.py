"""Hostile config files: each is refused in well under a second with one short line and exit 2, never a
hang, a traceback, a MemoryError or a message that prints an unbounded value (issue 17, defects 1, 7, 8)."""

import os
import signal
import time

import pytest

from ame_kernels.cli import main
from ame_kernels.config import read_yaml
from ame_kernels.errors import MergeError


class Blocked(BaseException):
    """Raised by the ``alarm`` fixture (a BaseException: no ``except OSError`` or ``except Exception`` eats it)."""


@pytest.fixture
def alarm():
    """Fail (instead of hanging the suite) when a call blocks for more than ``seconds``."""

    def on_alarm(signum, frame):
        raise Blocked("blocked: the call did not return in time")

    old = signal.signal(signal.SIGALRM, on_alarm)
    yield lambda seconds: signal.alarm(seconds)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _bomb(levels: int, width: int = 9) -> str:
    """``lr:`` holding ``levels`` of anchors, each a list of ``width`` aliases of the previous one
    (width**levels leaves), as in the issue."""
    items = ["&a0 [" + ", ".join(["x"] * width) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "models: [a, b]\nlr: [" + ", ".join(items) + "]\n"


def _one_line(capsys, path, *extra):
    t0 = time.perf_counter()
    code = main([str(path), *map(str, extra), "--dry-run"])
    secs = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ame-merge: error:"), (code, err[:2000])
    assert len(lines[0]) < 400, f"an unbounded value in the message ({len(lines[0])} characters)"
    return lines[0], secs


def test_alias_bomb_is_refused_fast_with_a_short_message(tmp_path, capsys):
    # 6 levels of 9: 531441 leaves (the 539-byte bomb had 9 levels: 80 s, 3.4 GB, a MemoryError);
    # before the fix this printed the expanded value: a 1.6 MB error line
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(6))
    assert path.stat().st_size < 600
    line, secs = _one_line(capsys, path)
    assert "alias" in line and "bomb.yaml" in line, line
    assert secs < 5, secs


def test_the_full_nine_level_bomb_costs_nothing(tmp_path):
    path = tmp_path / "bomb9.yaml"
    path.write_text(_bomb(9))  # 387 million leaves
    t0 = time.perf_counter()
    with pytest.raises(MergeError, match="alias bomb"):
        read_yaml(str(path))
    assert time.perf_counter() - t0 < 2


def test_merge_key_bomb_and_recursive_alias(tmp_path):
    merge = "a0: &a0 {k: 1, j: 2}\n" + "".join(
        f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 10)}]}}\n" for i in range(1, 6)
    ) + "models: [a]\n"
    (tmp_path / "merge.yaml").write_text(merge)
    with pytest.raises(MergeError, match="alias bomb"):
        read_yaml(str(tmp_path / "merge.yaml"))
    (tmp_path / "rec.yaml").write_text("models: [a]\nlr: &r [1, *r]\n")
    with pytest.raises(MergeError, match="recursive alias"):
        read_yaml(str(tmp_path / "rec.yaml"))


@pytest.mark.parametrize(
    "text, needle",
    [
        ("models: [a]\nlr: " + "[" * 1200 + "]" * 1200 + "\n", "nested"),  # RecursionError before
        ("models: [a]\nlr: " + "{a: " * 1200 + "1" + "}" * 1200 + "\n", "nested"),
        ("models: [a]\nepochs: " + "9" * 5000 + "\n", "integer of 5000"),  # int()'s 4300-digit ValueError before
    ],
    ids=["deep-list", "deep-map", "huge-int"],
)
def test_deep_or_huge_values_are_usage_errors(tmp_path, capsys, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    line, _ = _one_line(capsys, path)
    assert needle in line, line


def test_non_utf8_config_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"models: [a]\nlr: \xff\xfe0.1\n")  # UnicodeDecodeError traceback before
    line, _ = _one_line(capsys, path)
    assert "UTF-8" in line and "line 2" in line, line


def test_fifo_config_does_not_block(tmp_path, capsys, alarm):
    path = tmp_path / "c.yaml"
    os.mkfifo(path)  # opening it for reading blocked every command forever
    alarm(10)
    line, _ = _one_line(capsys, path)
    assert "not a regular file" in line, line


def test_oversized_config_file_is_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("models: [a]\n# " + "x" * (5 * 2**20) + "\n")
    line, _ = _one_line(capsys, path)
    assert "bytes" in line, line


def test_a_normal_config_still_loads(tmp_path):
    text = "models:\n" + "".join(f"  - {{path: m{i}, score: 0.{i}}}\n" for i in range(2000)) + "betas: &b [0.9, 0.99]\nx: *b\n"
    (tmp_path / "c.yaml").write_text(text)
    doc = read_yaml(str(tmp_path / "c.yaml"))
    assert len(doc["models"]) == 2000 and doc["x"] == [0.9, 0.99]


def test_many_values_are_refused_while_parsing(tmp_path):
    """A flat list of 60,000 values (no alias): PyYAML needs ~1 KB and ~35 us a node, so a 4 MB list took
    47 s and 1.5 GB; the composer now stops at the node limit."""
    (tmp_path / "c.yaml").write_text("models: [" + ",".join(["1"] * 60_000) + "]\n")
    t0 = time.perf_counter()
    with pytest.raises(MergeError, match="more than 50000 values"):
        read_yaml(str(tmp_path / "c.yaml"))
    assert time.perf_counter() - t0 < 10
