"""An output folder that appears complete or not at all.

Everything is written into ``.NAME.tmp-<pid>`` beside the target and renamed
into place at the end (``os.rename`` within one folder is atomic). An error, a
Ctrl-C (KeyboardInterrupt) or SIGTERM (turned into ``Terminated`` by
``terminate_as_exception``) removes the temporary folder; a SIGKILL cannot be
caught, so a later run removes temporary folders whose process is gone. The
target itself is never touched until the new folder is complete; an existing
target is refused unless ``force``, and then replaced only at the commit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import threading
from typing import Iterator, Optional, Set

from ..errors import MergeError

_live: Set[str] = set()  # temp folders of this process not yet committed or removed


class Terminated(BaseException):
    """SIGTERM/SIGHUP, raised in the main thread so cleanup handlers run (BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@atexit.register
def _remove_live() -> None:
    for path in list(_live):
        shutil.rmtree(path, ignore_errors=True)
        _live.discard(path)


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``Terminated`` (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: str) -> None:
    """Remove ``.NAME.tmp-<pid>`` folders beside ``target`` left by processes that no longer exist (a SIGKILL)."""
    parent, name = os.path.split(target)
    prefix = f".{name}.tmp-"
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return
    for entry in entries:
        if entry.startswith(prefix):
            pid = entry[len(prefix) :].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def check_target(target: str, force: bool) -> str:
    """The absolute target path; MergeError if it exists and ``force`` is off, or cannot be replaced."""
    target = os.path.abspath(os.path.expanduser(str(target)))
    if os.path.lexists(target):
        if not force:
            raise MergeError(f"{target}: output already exists (pass --force to replace it)")
        if not os.path.isdir(target) or os.path.islink(target):
            raise MergeError(f"{target}: exists and is not a folder; refusing to replace it even with --force")
    return target


class AtomicDir:
    """``with AtomicDir(target, force) as tmp: ...write into tmp...; commit()`` (see module docstring)."""

    def __init__(self, target: str, force: bool = False, tag: Optional[str] = None):
        self.target = check_target(target, force)
        self.force = force
        parent, name = os.path.split(self.target)
        # ``tag`` lets several processes agree on one temp name (distributed ranks use rank 0's pid).
        self.tmp = os.path.join(parent, f".{name}.tmp-{tag or os.getpid()}")
        self.committed = False

    def create(self) -> str:
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(self.target)
        os.mkdir(self.tmp)
        _live.add(self.tmp)
        return self.tmp

    def __enter__(self) -> str:
        return self.create()

    def commit(self) -> None:
        old = None
        if os.path.lexists(self.target):
            if not self.force:  # appeared while we were merging
                raise MergeError(f"{self.target}: output appeared during the merge (pass --force to replace it)")
            old = f"{self.tmp}.old"
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        _live.discard(self.tmp)
        self.committed = True
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
            _live.discard(self.tmp)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()
