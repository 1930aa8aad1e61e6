"""An output folder that appears complete or not at all.

Everything is written into ``.NAME.tmp-<pid>`` beside the target and renamed
into place at the end (``os.rename`` within one folder is atomic). An error, a
Ctrl-C (KeyboardInterrupt) or SIGTERM (turned into ``Terminated`` by
``terminate_as_exception``) removes the temporary folder; a SIGKILL cannot be
caught, so a later run removes temporary folders whose process is gone. The
target itself is never touched until the new folder is complete; an existing
target is refused unless ``force``, and then replaced only at the commit.

Replacing (``force``) leaves no moment without a complete ``NAME``: on Linux the new
and the old folder are swapped with one ``renameat2(RENAME_EXCHANGE)`` and the old one,
now at the temporary name, is removed. Where the exchange is not supported, a journal
file ``.NAME.tmp-<pid>.commit`` is written before the old folder is moved aside
(``.NAME.tmp-<pid>.old``) and removed after; a run killed between the two renames
leaves the journal, and the next run beside the same target completes the commit (the
journal says the new folder is complete) instead of deleting both copies.

Removal never crosses a mount point, and ``check_target`` refuses (even with ``force``)
a target that is, holds or mounts an input, by path, by device and inode, and by the
mount table.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import shutil
import signal
import stat
import sys
import threading
from typing import Iterator, List, Optional, Sequence, Set, Tuple

from ..errors import MergeError, Terminated  # noqa: F401 (Terminated: re-exported, its historical home)

_live: Set[str] = set()  # temp folders of this process not yet committed or removed


@atexit.register
def _remove_live() -> None:
    for path in list(_live):
        remove_tree(path)
        _live.discard(path)


# --------------------------------------------------------------------------- test hook

PAUSE_ENV = "AME_TEST_PAUSE_AT"


def pause_point(stage: str) -> None:
    """A test hook: when ``$AME_TEST_PAUSE_AT`` names ``stage`` (comma-separated stages), write
    ``ame-test-pause: STAGE PID`` to stderr and wait for one byte on stdin (or its end), so a test can
    signal or kill the process at exactly that point. Stages: ``chunk`` (views of a chunk made,
    not yet read), ``metadata`` (shards written), ``commit`` (signals blocked, nothing renamed),
    ``commit-moved`` (journal fallback: the old folder moved aside, the new not yet in place),
    ``commit-exchanged`` (the exchange done, the old folder not yet removed), ``committed``."""
    want = os.environ.get(PAUSE_ENV)
    if not want or stage not in want.split(","):
        return
    os.write(2, f"ame-test-pause: {stage} {os.getpid()}\n".encode())
    try:
        os.read(0, 1)
    except OSError:
        pass


# --------------------------------------------------------------------------- removal and mounts


def _mount_points() -> Set[str]:
    """Every mount point of this process's mount namespace (Linux: /proc/self/mountinfo; else empty)."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    points = set()
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4:  # the 5th field; spaces and the like are octal escapes (\040)
            raw = fields[4].decode("utf-8", "surrogateescape")
            points.add(_unescape_octal(raw))
    return points


def _unescape_octal(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and all(c in "01234567" for c in s[i + 1 : i + 4]):
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts_inside(path: str) -> List[str]:
    """Mount points at or below ``path`` (by the mount table, and by a device change while walking it)."""
    real = os.path.realpath(path)
    found = sorted(m for m in _mount_points() if _within(m, real))
    try:
        dev = os.lstat(path).st_dev
    except OSError:
        return found
    for root, dirs, _ in os.walk(path, followlinks=False):
        for d in list(dirs):
            full = os.path.join(root, d)
            try:
                if os.lstat(full).st_dev != dev:
                    found.append(full)
                    dirs.remove(d)  # never walk into another filesystem
            except OSError:
                dirs.remove(d)
    return found


def remove_tree(path: str) -> bool:
    """``shutil.rmtree`` that never crosses a mount point: a folder holding one is left whole
    (returns False), so a bind-mounted input inside an old output is never emptied."""
    if not os.path.lexists(path):
        return True
    if os.path.isdir(path) and not os.path.islink(path) and mounts_inside(path):
        return False
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return not os.path.lexists(path)


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
    """Whether process ``pid`` exists and is not a zombie (a killed process its parent has not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def remove_stale_temps(target: str, keep: Sequence[str] = ()) -> List[str]:
    """Clean up after processes beside ``target`` that no longer exist (a SIGKILL); returns what was done.

    ``.NAME.tmp-<pid>`` folders (and ``.old`` copies of a replaced target) of dead processes are
    removed, except where a commit was cut short: with a journal ``.NAME.tmp-<pid>.commit`` and no
    ``NAME``, the new folder (complete: the journal is written only then) is renamed into place;
    without a journal, an ``.old`` copy is put back. Never removes across a mount point, nor a
    path in ``keep`` (the inputs, however they are named).
    """
    kept = {os.path.realpath(str(k)) for k in keep}
    parent, name = os.path.split(target)
    prefix = f".{name}.tmp-"
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return []
    groups = {}
    for entry in entries:
        if entry.startswith(prefix) and os.path.realpath(os.path.join(parent, entry)) not in kept:
            tag = entry[len(prefix) :].split(".")[0]
            pid = tag.split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                groups.setdefault(tag, []).append(entry)
    done = []
    for tag in sorted(groups):
        tmp = os.path.join(parent, f"{prefix}{tag}")
        old, journal = f"{tmp}.old", f"{tmp}.commit"
        if not os.path.lexists(target):
            if os.path.lexists(journal) and os.path.isdir(tmp) and not os.path.islink(tmp):
                os.rename(tmp, target)  # the interrupted commit, completed
                done.append(f"completed the interrupted replacement of {target} (process {tag} was killed mid-commit)")
            elif os.path.isdir(old) and not os.path.islink(old):
                os.rename(old, target)  # the old output, put back
                done.append(f"restored {target} (process {tag} was killed while replacing it)")
        for entry in sorted(groups[tag]):
            path = os.path.join(parent, entry)
            if os.path.lexists(path) and not remove_tree(path):
                done.append(f"left {path}: it holds a mount point")
    return done


def _within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or inside it (both real, absolute paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _dirs_under(path: str) -> Set[Tuple[int, int]]:
    """(device, inode) of ``path`` and every folder below it (symlinks not followed)."""
    ids = set()
    for root, dirs, _ in os.walk(path, followlinks=False):
        for d in [root] + [os.path.join(root, x) for x in dirs]:
            try:
                st = os.lstat(d)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                ids.add((st.st_dev, st.st_ino))
    return ids


def check_target(target: str, force: bool, protect: Sequence[str] = ()) -> str:
    """The absolute target path, checked before any work; MergeError when it cannot be (re)placed.

    Refused: an existing target without ``force``; with ``force``, one that is not a folder or
    that is or holds one of the ``protect`` paths (the inputs: replacing it would delete them),
    by path, by device and inode (a bind mount of an input folder) or that holds any mount point;
    a target whose parent cannot be created or written (a file in the way, no permission).
    First, temporary folders of dead processes beside the target are cleaned up (an interrupted
    ``--force`` commit is completed), whatever the outcome of the check.
    """
    target = os.path.abspath(os.path.expanduser(str(target)))
    for note in remove_stale_temps(target, keep=protect):
        print(f"ame-merge: note: {note}", file=sys.stderr)
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
        held = _dirs_under(target)
        for p in protect:
            try:
                st = os.stat(str(p))
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in held:
                raise MergeError(
                    f"{target}: the output folder holds an input ({p}) through a bind mount or another name; "
                    "replacing it would delete that input (choose another OUT_DIR)"
                )
        mounts = mounts_inside(target)
        if mounts:
            raise MergeError(
                f"{target}: the output folder holds a mount point ({mounts[0]}); refusing to replace it even "
                "with --force (unmount it or choose another OUT_DIR)"
            )
    # the temporary folder is made beside the target: the nearest existing ancestor must be a writable folder
    parent = os.path.dirname(target)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise MergeError(f"{target}: cannot create the output folder: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MergeError(f"{target}: cannot create the output folder: {parent} is not writable (permission denied)")
    return target


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347}


def exchange(a: str, b: str) -> bool:
    """Swap the folders ``a`` and ``b`` in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    False where that is not supported (another OS, an old kernel or libc, a filesystem without
    it, or ``$AME_NO_RENAME_EXCHANGE`` set); an OSError for any other failure."""
    if not sys.platform.startswith("linux") or os.environ.get("AME_NO_RENAME_EXCHANGE"):
        return False
    try:
        import ctypes
        import platform

        libc = ctypes.CDLL(None, use_errno=True)
        args = (ctypes.c_int(_AT_FDCWD), os.fsencode(a), ctypes.c_int(_AT_FDCWD), os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE))
        if hasattr(libc, "renameat2"):
            r = libc.renameat2(*args)
        elif platform.machine() in _SYS_RENAMEAT2:
            r = libc.syscall(ctypes.c_long(_SYS_RENAMEAT2[platform.machine()]), *args)
        else:
            return False
    except (OSError, AttributeError):
        return False
    if r == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


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
        """Move the complete temporary folder into place (see the module docstring for ``force``)."""
        # no signal while renaming: one arriving here is delivered after, when the output is in place
        with _signals_deferred():
            pause_point("commit")
            if not os.path.lexists(self.target):
                os.rename(self.tmp, self.target)
                self._committed()
            elif not self.force:  # appeared while we were merging
                raise MergeError(f"{self.target}: output appeared during the merge (pass --force to replace it)")
            elif exchange(self.tmp, self.target):
                # the new folder is in place; the old one is at the temporary name (a stale temp if we die now)
                self._committed()
                pause_point("commit-exchanged")
                remove_tree(self.tmp)
            else:
                self._replace_with_journal()

    def _committed(self) -> None:
        _live.discard(self.tmp)
        self.committed = True
        pause_point("committed")

    def _replace_with_journal(self) -> None:
        """Replace the target in two renames, recoverable between them (``remove_stale_temps``)."""
        old, journal = f"{self.tmp}.old", f"{self.tmp}.commit"
        with open(journal, "w", encoding="utf-8") as f:  # 'the new folder is complete': written before any rename
            f.write(f"{self.target}\n")
        try:
            os.rename(self.target, old)
        except BaseException:
            os.unlink(journal)
            raise
        try:
            pause_point("commit-moved")
            os.rename(self.tmp, self.target)
        except BaseException:
            os.rename(old, self.target)  # put the old folder back
            os.unlink(journal)
            raise
        self._committed()
        remove_tree(old)
        with contextlib.suppress(OSError):
            os.unlink(journal)

    def abort(self) -> None:
        if not self.committed:
            remove_tree(self.tmp)
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


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP arriving in the block take effect at its end (through the handlers in
    place before it: KeyboardInterrupt, ``Terminated``, or the default action).

    In the main thread the handlers are swapped for ones that only note the signal: blocking the
    signal in this thread alone would not do, since the kernel hands a process-directed signal to
    any thread that does not block it (the kernels' worker threads), and Python then runs the
    handler in the main thread at once. Elsewhere (Python handlers live in the main thread only)
    the signals are blocked in this thread."""
    if threading.current_thread() is not threading.main_thread():
        blocked = _block_signals()
        try:
            yield
        finally:
            _unblock_signals(blocked)
        return
    pending: List[int] = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)  # the restored handler runs now (raises, or ends the process)


def _block_signals():
    """Block SIGINT/SIGTERM/SIGHUP in this thread (delivered at unblock); None where unsupported."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def _unblock_signals(previous) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
