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
from typing import Iterator, List, Optional, Sequence, Set

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
            pid = entry[len(prefix) :].split("-")[0].split(".")[0]  # also '<pid>.old', a replaced target
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or inside it (both real, absolute paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_target(target: str, force: bool, protect: Sequence[str] = ()) -> str:
    """The absolute target path, checked before any work; MergeError when it cannot be (re)placed.

    Refused: an existing target without ``force``; with ``force``, one that is not a folder or
    that is or holds one of the ``protect`` paths (the inputs: replacing it would delete them);
    a target whose parent cannot be created or written (a file in the way, no permission).
    """
    target = os.path.abspath(os.path.expanduser(str(target)))
    if os.path.lexists(target):
        forms = {target, os.path.realpath(target)}
        for p in protect:
            ap = os.path.abspath(str(p))
            hit = [(q, t) for q in (ap, os.path.realpath(ap)) for t in forms if _within(q, t)]
            if hit:
                what = "is" if any(q == t for q, t in hit) else "holds"
                raise MergeError(
                    f"{target}: the output folder {what} an input ({p}); replacing it would delete that input "
                    "(choose another OUT_DIR)"
                )
        if not force:
            raise MergeError(f"{target}: output already exists (pass --force to replace it)")
        if not os.path.isdir(target) or os.path.islink(target):
            raise MergeError(f"{target}: exists and is not a folder; refusing to replace it even with --force")
    # the temporary folder is made beside the target: the nearest existing ancestor must be a writable folder
    parent = os.path.dirname(target)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise MergeError(f"{target}: cannot create the output folder: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MergeError(f"{target}: cannot create the output folder: {parent} is not writable (permission denied)")
    return target


class AtomicDir:
    """``with AtomicDir(target, force) as tmp: ...write into tmp...; commit()`` (see module docstring).

    ``protect``: paths (the inputs) that the target must not be or hold, even with ``force``.
    Folders made for the target's parent are removed again when the merge does not commit.
    """

    def __init__(self, target: str, force: bool = False, tag: Optional[str] = None, protect: Sequence[str] = ()):
        self.target = check_target(target, force, protect)
        self.force = force
        parent, name = os.path.split(self.target)
        # ``tag`` lets several processes agree on one temp name (distributed ranks use rank 0's pid).
        self.tmp = os.path.join(parent, f".{name}.tmp-{tag or os.getpid()}")
        self.committed = False
        self._made: List[str] = []  # parent folders this object created, outermost first

    def create(self) -> str:
        parent = os.path.dirname(self.target)
        missing = []
        p = parent
        while not os.path.lexists(p):
            missing.append(p)
            p = os.path.dirname(p)
        for p in reversed(missing):
            os.mkdir(p)
            self._made.append(p)
        remove_stale_temps(self.target)
        os.mkdir(self.tmp)
        _live.add(self.tmp)
        return self.tmp

    def __enter__(self) -> str:
        return self.create()

    def commit(self) -> None:
        old = None
        # no signal between the two renames: an interrupt there would leave neither the old folder nor the new one
        blocked = _block_signals()
        try:
            if os.path.lexists(self.target):
                if not self.force:  # appeared while we were merging
                    raise MergeError(f"{self.target}: output appeared during the merge (pass --force to replace it)")
                old = f"{self.tmp}.old"
                os.rename(self.target, old)
            try:
                os.rename(self.tmp, self.target)
            except BaseException:
                if old is not None:
                    os.rename(old, self.target)  # put the old folder back
                raise
            _live.discard(self.tmp)
            self.committed = True
            if old:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            _unblock_signals(blocked)

    def abort(self) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
            _live.discard(self.tmp)
            for p in reversed(self._made):  # innermost first; only while empty
                try:
                    os.rmdir(p)
                except OSError:
                    break
            self._made = []

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _block_signals():
    """Block SIGINT/SIGTERM/SIGHUP in this thread (delivered at unblock); None where unsupported."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def _unblock_signals(previous) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
