"""Running a merge where a SIGBUS cannot take the process down without a word.

The kernels read the inputs straight from memory-mapped files. If another process
truncates an input while it is mapped, touching a page past the new end raises SIGBUS,
which no Python code can catch (the handler would return to the faulting instruction).
``run_guarded`` therefore runs the merge in a forked child; the parent only waits,
forwarding SIGINT, SIGTERM and SIGHUP. When the child dies of a signal instead of
exiting, the parent names the input that changed under it (comparing each file's size
with what the plan needs), removes the child's temporary folder and returns 1.

POSIX only; the callers fall back to running in-process where ``fork`` is missing, on
a GPU device (CUDA cannot be used across a fork) or when stdio is not a real file (an
in-process test capturing output).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Callable, Dict, List, Optional, Tuple

from .atomic import remove_stale_temps

_FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DISABLE_ENV = "AME_NO_FORK_GUARD"


def guard_available() -> bool:
    """Whether ``run_guarded`` can fork here (POSIX, real stdio, not disabled by ``$AME_NO_FORK_GUARD``)."""
    if not hasattr(os, "fork") or os.environ.get(DISABLE_ENV):
        return False
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False


def _set_pdeathsig() -> None:
    """Linux: the child gets SIGKILL when the parent dies (a SIGKILL of the parent ends the merge too)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def changed_inputs(needed: Dict[str, int]) -> List[Tuple[str, str]]:
    """(file, what changed) for each input now shorter than the plan needs, or gone."""
    out = []
    for path, size in needed.items():
        try:
            now = os.stat(path).st_size
        except OSError as e:
            out.append((path, f"cannot be read any more ({e.strerror})"))
            continue
        if now < size:
            out.append((path, f"was truncated while being merged (now {now} bytes, the merge needs {size})"))
    return out


def run_guarded(fn: Callable[[], int], needed: Dict[str, int], target: Optional[str]) -> int:
    """``fn()`` (an exit code) in a forked child; its exit code, or 1 with an error naming the input
    when it dies of a signal (see the module docstring). ``needed``: input file -> bytes the plan reads."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    parent = os.getpid()
    child: List[int] = []
    early: List[int] = []

    def forward(signum, frame):
        if child:
            try:
                os.kill(child[0], signum)
            except ProcessLookupError:
                pass
        else:  # before the fork returned: delivered to the child right after
            early.append(signum)

    # the forwarding handlers are in place before the fork: no signal finds the parent without them
    old = {s: signal.signal(s, forward) for s in _FORWARD}
    try:
        pid = os.fork()
    except BaseException:
        for s, h in old.items():
            signal.signal(s, h)
        raise
    if pid == 0:  # the child: the merge, then straight out (the parent's atexit handlers are not ours)
        code = 1
        try:
            for s, h in old.items():  # the parent forwards what arrived before the fork returned
                signal.signal(s, h)
            os.setpgid(0, 0)  # terminal signals go to the parent, which forwards each once
            _set_pdeathsig()
            if os.getppid() != parent:  # the parent died before the death signal was armed
                os._exit(1)
            code = fn()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 (fn reports its own errors; this is a bug)
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    child.append(pid)
    try:
        os.setpgid(pid, pid)
    except OSError:  # the child did it first, or has exited already
        pass
    for s in early:
        forward(s, None)
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    sig = os.WTERMSIG(status)
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
    changed = changed_inputs(needed)
    notes = remove_stale_temps(target) if target else []
    complete = any(n.startswith("completed") for n in notes)
    where = f"; nothing was written to {target}" if target and not complete else ""
    if sig in _FORWARD and not changed:  # stopped by a forwarded signal before its handlers were in place
        print(f"ame-merge: error: interrupted ({name}){where}", file=sys.stderr)
        code = 128 + sig
    elif changed:
        for path, what in changed:
            print(f"ame-merge: error: {path}: {what} ({name}){where}", file=sys.stderr)
        code = 1
    elif sig in (signal.SIGBUS, signal.SIGSEGV):
        print(
            f"ame-merge: error: the merge stopped with {name}: an input file changed while it was being read"
            f" (rewritten or truncated by another process?){where}",
            file=sys.stderr,
        )
        code = 1
    else:
        print(f"ame-merge: error: the merge process was killed by {name}{where}", file=sys.stderr)
        code = 1
    for note in notes:
        print(f"ame-merge: note: {note}", file=sys.stderr)
    return code
