"""Shared benchmark plumbing: machine header, timing, same-run memcpy baseline, CSV rows.

Every figure a benchmark prints is measured in that run on that machine: timings are
medians over repeats (after warm-up) with 20th/80th percentiles, bandwidths are compared
with a memcpy measured in the same process, and every CSV row carries the machine and
the commit, so rows from different machines never mix silently.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import time
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclasses.dataclass
class Machine:
    cpu: str
    cores: int
    threads: int
    simd: str
    gpu: str
    python: str
    torch: str
    numpy: str
    commit: str
    loadavg: str

    def header(self) -> str:
        return (
            f"# machine: {self.cpu} | {self.cores} cores, {self.threads} threads used | SIMD {self.simd} | GPU {self.gpu}\n"
            f"# python {self.python}, torch {self.torch}, numpy {self.numpy} | commit {self.commit} | "
            f"load average at start {self.loadavg} (other processes share this machine when > 0)"
        )


def machine(threads: int) -> Machine:
    torch_v, gpu = "-", "none"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch_v = torch.__version__
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    simd = "-"
    try:
        from ame_kernels.backends.cpu import info, resolve_simd

        lvl = resolve_simd(None)
        simd = info().get("simd_best", "-") if lvl == "auto" else lvl
    except Exception:  # noqa: BLE001 (a header must never fail the benchmark)
        pass
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "-"
    return Machine(cpu_model(), os.cpu_count() or 1, threads, simd, gpu, platform.python_version(), torch_v,
                   np.__version__, commit(), load)


@dataclasses.dataclass
class Timing:
    median: float
    p20: float
    p80: float
    repeats: int

    def ms(self) -> str:
        return f"{self.median * 1e3:.1f} [{self.p20 * 1e3:.1f}-{self.p80 * 1e3:.1f}]"


def timeit(fn: Callable[[], object], warmup: int = 1, repeat: int = 5) -> Timing:
    """Wall time of fn() after `warmup` calls: median and 20th/80th percentiles of `repeat` runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    a = np.asarray(ts)
    return Timing(float(np.median(a)), float(np.percentile(a, 20)), float(np.percentile(a, 80)), len(ts))


# The launcher of run_child: a small process that forks and execs the command and reports its
# wall time (from the fork), CPU time and peak RSS as wait4 gives them.
_LAUNCHER = """import os, sys, time
fd = int(sys.argv[1]); t0 = time.perf_counter(); pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, st, ru = os.wait4(pid, 0)
os.write(fd, f"{time.perf_counter() - t0} {ru.ru_utime + ru.ru_stime} {ru.ru_maxrss} {os.waitstatus_to_exitcode(st)}".encode())
"""


@dataclasses.dataclass
class ChildRun:
    seconds: float   # wall, from the fork (the launcher's start-up excluded)
    cpu: float       # user + sys of the command and the descendants it waited for
    peak_rss: int    # bytes: the largest of the command and those descendants
    code: int        # exit status
    stderr: bytes    # with capture_stderr, else b""


def run_child(cmd: list, cwd=None, env=None, quiet: bool = False, capture_stderr: bool = False) -> ChildRun:
    """Run ``cmd`` as a fresh process and measure it.

    Linux keeps a process's peak RSS across exec, and a forked child starts with its parent's
    resident pages counted: a command forked from this (possibly large: generated models, loaded
    outputs) process would report this process's peak as its own. So a small launcher forks the
    command (its peak then starts at the launcher's ~10 MiB) and reports what wait4 says."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(w), *cmd], cwd=cwd, env=env, pass_fds=(w,),
                                stdout=subprocess.DEVNULL if quiet else None,
                                stderr=subprocess.PIPE if capture_stderr else None)
        os.close(w)
        w = -1
        err = proc.stderr.read() if capture_stderr else b""  # drained while it runs: a full pipe would block it
        proc.wait()
        report = os.read(r, 256).decode().split()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if proc.returncode != 0 or len(report) != 4:
        raise RuntimeError(f"the launcher of {cmd[0]} failed (exit {proc.returncode}): {err[-500:]!r}")
    secs, cpu, rss_kib, code = report
    return ChildRun(float(secs), float(cpu), int(rss_kib) * 1024, int(code), err)


def memcpy_bandwidth(nbytes: int, threads: int, repeat: int = 5) -> tuple:
    """(bytes/s, Timing) of copying nbytes between two preallocated buffers with torch's
    parallel copy on `threads` threads, counting bytes read + bytes written (2 x nbytes),
    as the kernels' effective bandwidth counts input read + output written."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = max(1, nbytes // 4)
        src = torch.ones(n, dtype=torch.float32)
        dst = torch.empty_like(src)
        t = timeit(lambda: dst.copy_(src), warmup=1, repeat=repeat)
    finally:
        torch.set_num_threads(old)
    return 2 * n * 4 / t.median, t


def append_csv(bench: str, rows: list) -> str:
    """Append dataclass rows to benchmarks/results/<bench>.csv (header written once)."""
    if not rows:
        return ""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{bench}.csv")
    fields = [f.name for f in dataclasses.fields(rows[0])]
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))
    return path


def regime_args(ap, regimes: dict) -> None:
    """The options of a benchmark by regime of input: --threads, --repeat, --regimes."""
    ap.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--regimes", default=",".join(regimes), help=f"comma-separated, of: {', '.join(regimes)}")


def chosen_regimes(spec: str, regimes: dict) -> list:
    """The regime names of a --regimes value, in its order; SystemExit naming any unknown one."""
    names = [r.strip() for r in spec.split(",") if r.strip()]
    unknown = [r for r in names if r not in regimes]
    if unknown:
        raise SystemExit(f"unknown regime(s) {unknown}; valid: {', '.join(regimes)}")
    return names


def report(bench: str, headers: list, table: list, rows: list) -> list:
    """The end of a kernel benchmark: its table printed, its rows appended to
    benchmarks/results/<bench>.csv (the path printed); returns the rows."""
    print()
    print_table(headers, table)
    path = append_csv(bench, rows)
    print(f"\n# rows appended to {os.path.relpath(path, ROOT)}")
    return rows


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def print_table(headers: list, rows: list, out=None) -> None:
    out = out or sys.stdout
    cols = [[str(h)] + [str(r[i]) for r in rows] for i, h in enumerate(headers)]
    widths = [max(len(c) for c in col) for col in cols]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    print(line, file=out)
    print("-" * len(line), file=out)
    for r in rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths)), file=out)
    out.flush()


def cpu_threads(threads) -> int:
    """The cpu backend's thread count for a benchmark (torch's default when None), set for torch
    too; 0 when the cpu backend is not built (the reason printed: the benchmark skips)."""
    import torch

    from ame_kernels.backends import available

    ok, why = available()["cpu"]
    if not ok:
        print(f"cpu backend not available: {why}: skipped")
        return 0
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


@dataclasses.dataclass
class RunFields:
    """The first columns of every kernel benchmark's CSV rows: when, on what, with which build."""

    time_utc: str
    cpu: str
    threads: int
    simd: str
    commit: str
    loadavg: str
