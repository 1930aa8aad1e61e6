"""Writing files front to back from two aligned staging buffers, with O_DIRECT where the filesystem allows.

The single-process engine produces every output shard in file order (header, then
each tensor's chunks), so the kernels can write their results straight into a
staging buffer (``reserve_array``) that a writer thread hands to the disk while
the next chunk computes. With ``O_DIRECT`` the output bypasses the page cache: no
page-cache pages are allocated for it (on virtual machines whose free memory goes
back to the host, allocating fresh pages is the slowest part of writing) and the
inputs' cached pages are not evicted by it. Direct IO needs 4 KiB-aligned offsets,
lengths and addresses: each flush writes the aligned part of the buffer and carries
the unaligned tail over to the other buffer; the last write is padded and the file
truncated to its exact size. Filesystems without O_DIRECT (tmpfs) get buffered writes.
"""

from __future__ import annotations

import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import List, Optional

import numpy as np

ALIGN = 4096


def _round_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


class ShardStream:
    """Sequential writer for one file at a time: ``open``, then ``reserve_array``/``commit`` or ``append``, ``close_file``."""

    def __init__(self, max_reserve: int, direct: bool = True):
        self.cap = _round_up(max(max_reserve, ALIGN) + ALIGN)
        self.bufs = [mmap.mmap(-1, self.cap) for _ in range(2)]  # anonymous maps are page aligned
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ame-stream")
        self.pending: List[Optional[Future]] = [None, None]
        self.want_direct = direct and hasattr(os, "O_DIRECT")
        self.fd: Optional[int] = None
        self.cur = self.fill = self.pos = self.size = 0
        self.path = ""

    # -- file lifecycle ------------------------------------------------------
    def open(self, path: str, size: int) -> None:
        """Start ``path``, which will hold exactly ``size`` bytes once closed."""
        assert self.fd is None, "close_file() the previous file first"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = None
        if self.want_direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError:  # the filesystem has no direct IO: buffered writes
                fd = None
        self.fd = fd if fd is not None else os.open(path, flags, 0o644)
        self.path, self.size = path, size
        self.pos = self.fill = 0

    def tell(self) -> int:
        """Bytes of the file produced so far."""
        return self.pos + self.fill

    def close_file(self) -> None:
        """Write what is left (padded to the alignment), wait for every write, cut the file to its size."""
        if self.tell() != self.size:
            raise RuntimeError(f"{self.path}: produced {self.tell()} bytes, expected {self.size}")
        buf = self.bufs[self.cur]
        n = _round_up(self.fill)
        if n:
            self.pending[self.cur] = self.pool.submit(self._write_named, self.path, self.fd, memoryview(buf)[:n], self.pos)
        self._wait(0)
        self._wait(1)
        try:
            os.ftruncate(self.fd, self.size)
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from None
        os.close(self.fd)
        self.fd = None

    def abort(self) -> None:
        """Stop without finishing the current file (the caller removes it)."""
        for k in (0, 1):
            try:
                self._wait(k)
            except OSError:
                pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def shutdown(self) -> None:
        self.abort()
        self.pool.shutdown(wait=True)

    # -- producing bytes -----------------------------------------------------
    def reserve_array(self, count: int, dtype: np.dtype) -> np.ndarray:
        """A writable array of ``count`` elements at the current end of the file; ``commit`` it once filled."""
        nbytes = count * np.dtype(dtype).itemsize
        if self.fill + nbytes > self.cap:
            self._flush()
        return np.frombuffer(self.bufs[self.cur], dtype=dtype, count=count, offset=self.fill)

    def commit(self, nbytes: int) -> None:
        self.fill += nbytes

    def append(self, data) -> None:
        """Copy ``data`` (bytes-like or array) to the end of the file."""
        mv = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data).cast("B")
        while len(mv):
            if self.fill == self.cap:
                self._flush()
            n = min(len(mv), self.cap - self.fill)
            self.bufs[self.cur][self.fill : self.fill + n] = mv[:n]
            self.fill += n
            mv = mv[n:]

    # -- internals -----------------------------------------------------------
    def _wait(self, k: int) -> None:
        fut, self.pending[k] = self.pending[k], None
        if fut is not None:
            fut.result()

    def _flush(self) -> None:
        """Hand the aligned part of the current buffer to the writer; carry the tail to the other buffer."""
        buf, other = self.bufs[self.cur], 1 - self.cur
        aligned = self.fill - self.fill % ALIGN
        self._wait(other)  # the other buffer's previous write is done: it can be refilled
        tail = self.fill - aligned
        if tail:
            self.bufs[other][:tail] = buf[aligned : self.fill]
        if aligned:
            self.pending[self.cur] = self.pool.submit(self._write_named, self.path, self.fd, memoryview(buf)[:aligned], self.pos)
        self.pos += aligned
        self.cur, self.fill = other, tail

    @classmethod
    def _write_named(cls, path: str, fd: int, mv: memoryview, off: int) -> None:
        """``_write``, an OSError naming ``path`` (a pwrite error carries no file name)."""
        try:
            cls._write(fd, mv, off)
        except OSError as e:
            if e.filename is not None:
                raise
            raise OSError(e.errno, e.strerror, path) from None

    @staticmethod
    def _write(fd: int, mv: memoryview, off: int) -> None:
        while len(mv):
            try:
                n = os.pwrite(fd, mv, off)
            except OSError as e:
                flags = _fcntl_flags(fd)
                if e.errno != errno.EINVAL or flags is None or not flags & getattr(os, "O_DIRECT", 0):
                    raise
                _set_flags(fd, flags & ~os.O_DIRECT)  # the filesystem refused direct IO here: buffered from now on
                continue
            mv = mv[n:]
            off += n


def _fcntl_flags(fd: int) -> Optional[int]:
    try:
        import fcntl

        return fcntl.fcntl(fd, fcntl.F_GETFL)
    except (ImportError, OSError):
        return None


def _set_flags(fd: int, flags: int) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, flags)
