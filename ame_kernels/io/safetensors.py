"""safetensors without the safetensors package: header parsing, lazy mapped reads, planned writes.

File layout: 8-byte little-endian header length H, H bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data; offsets are relative to the end of the header.

Reading maps the whole file read-only and hands out numpy views of element
ranges (bf16 as uint16: numpy has no bfloat16), so nothing is loaded whole;
``release`` drops the pages of a finished range from this process (they stay
in the page cache), which keeps the resident set bounded by the chunk size.
Everything a merge needs from the file (header, offsets, sizes) is checked
when the file is opened: a truncated or corrupt file is named before any work.

Writing (``ShardWriter``) takes the full tensor list up front, computes the
header, preallocates the file and places each chunk with ``pwrite`` at its
final offset, so an output shard is never assembled in memory.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import MergeError

# name used throughout ame_kernels -> (safetensors code, itemsize, numpy storage dtype)
DTYPES: Dict[str, Tuple[str, int, str]] = {
    "float64": ("F64", 8, "<f8"),
    "float32": ("F32", 4, "<f4"),
    "float16": ("F16", 2, "<f2"),
    "bfloat16": ("BF16", 2, "<u2"),  # numpy has no bfloat16: its bits as uint16
    "float8_e4m3fn": ("F8_E4M3", 1, "u1"),
    "float8_e5m2": ("F8_E5M2", 1, "u1"),
    "int64": ("I64", 8, "<i8"),
    "int32": ("I32", 4, "<i4"),
    "int16": ("I16", 2, "<i2"),
    "int8": ("I8", 1, "i1"),
    "uint64": ("U64", 8, "<u8"),
    "uint32": ("U32", 4, "<u4"),
    "uint16": ("U16", 2, "<u2"),
    "uint8": ("U8", 1, "u1"),
    "bool": ("BOOL", 1, "?"),
}
CODE_TO_NAME = {code: name for name, (code, _, _) in DTYPES.items()}
#: float dtypes the merge reads (fp64 is read through an fp32 copy of the chunk).
MERGE_DTYPES = ("float32", "bfloat16", "float16", "float64")
#: float dtypes a kernel reads and writes directly.
KERNEL_DTYPES = ("float32", "bfloat16", "float16")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors package's own limit
PAGE = mmap.PAGESIZE


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][1]


def np_dtype(dtype: str) -> np.dtype:
    return np.dtype(DTYPES[dtype][2])


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file`` and the absolute byte ``offset`` of its data."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    file: str
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], dict]:
    """Parse and check the header of ``path``: ({name: TensorInfo} in file order, metadata).

    Raises MergeError naming the file on: a missing/unreadable file, a header
    that is not valid safetensors JSON, an unknown dtype, a byte range that does
    not match its shape, overlapping ranges, or data past the end of the file
    (a truncated download).
    """
    try:
        f = open_regular(path)
        size = os.fstat(f.fileno()).st_size
        with f:
            head = f.read(8)
            if len(head) < 8:
                raise MergeError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise MergeError(
                    f"{path}: corrupt or truncated safetensors file (header claims {hlen} bytes, file has {size})"
                )
            raw = f.read(hlen)
    except FileNotFoundError:
        raise MergeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MergeError(f"{path}: is a folder, expected a .safetensors file") from None
    except PermissionError:
        raise MergeError(f"{path}: permission denied") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise MergeError(f"{path}: corrupt safetensors header ({_cut(str(e))})") from None
    except RecursionError:
        raise MergeError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    data_start = 8 + hlen
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    tensors: Dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not (isinstance(shape, list) and all(_is_int(s) for s in shape) and _is_int(begin) and _is_int(end)):
                raise TypeError("shape and data_offsets must hold integers")
            shape = tuple(shape)
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{path}: corrupt header entry for tensor {_brief(name)}: {_brief(entry)}") from None
        if not isinstance(code, str) or code not in CODE_TO_NAME:
            raise MergeError(f"{path}: tensor {_brief(name)} has unknown dtype {_brief(code)}")
        info = TensorInfo(name, CODE_TO_NAME[code], shape, path, data_start + begin)
        if any(s < 0 for s in shape) or end - begin != info.nbytes or begin < 0:
            raise MergeError(
                f"{path}: tensor {name!r} has byte range [{begin}, {end}) but shape {list(shape)} x {code} "
                f"needs {info.nbytes} bytes (corrupt header)"
            )
        if end > data_size:
            raise MergeError(
                f"{path}: truncated file: tensor {name!r} needs data up to byte {data_start + end}, "
                f"the file has {size} bytes"
            )
        tensors[name] = info
        spans.append((begin, end, name))
    # overlaps among the tensors that hold bytes (a zero-size tensor between two overlapping ones
    # must not hide them from the adjacent-pairs check)
    spans = sorted(s for s in spans if s[1] > s[0])
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise MergeError(f"{path}: corrupt header: tensors {n0!r} and {n1!r} overlap")
    return tensors, metadata


def open_regular(path: str):
    """``path`` opened for binary reading without blocking (a FIFO would block the open forever);
    MergeError naming it when it is not a regular file (a FIFO, socket or device)."""
    return os.fdopen(open_regular_fd(path), "rb")


def open_regular_fd(path: str) -> int:
    """``open_regular``, as a file descriptor."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise MergeError(f"{path}: is a folder, expected a .safetensors file")
        if not stat.S_ISREG(mode):
            raise MergeError(f"{path}: not a regular file (a FIFO, socket or device); expected a checkpoint file")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _cut(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _brief(value, limit: int = 120) -> str:
    """repr of a value from a file, cut to ``limit`` characters (a hostile header can hold anything)."""
    return _cut(repr(value), limit)


def _is_int(v) -> bool:
    """A JSON integer (not a bool, float or string: the safetensors format has only integers there)."""
    return isinstance(v, int) and not isinstance(v, bool)


class SafetensorsFile:
    """A safetensors file mapped read-only; ``view`` returns zero-copy element ranges."""

    def __init__(self, path: str):
        self.path = path
        self.tensors, self.metadata = read_header(path)
        #: bytes of the file a merge reads (the end of the last tensor's data)
        self.needed = max((t.offset + t.nbytes for t in self.tensors.values()), default=0)
        self._fd: Optional[int] = None
        self._mm: Optional[mmap.mmap] = None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            fd = open_regular_fd(self.path)
            try:
                size = os.fstat(fd).st_size
                if size < self.needed:  # truncated since the header was read
                    raise MergeError(self._shrunk(size))
                self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        return self._mm

    def _shrunk(self, size: int, info: Optional[TensorInfo] = None) -> str:
        what = f"tensor {info.name!r} needs" if info is not None else "the tensors need"
        return f"{self.path}: truncated while being merged (now {size} bytes; {what} data up to byte {self.needed})"

    def check_size(self, info: Optional[TensorInfo] = None) -> None:
        """MergeError naming the file when it is now shorter than its tensors need (cut by another
        process while merging: reading the lost pages would raise SIGBUS)."""
        if self._fd is not None:
            size = os.fstat(self._fd).st_size
            if size < self.needed:
                raise MergeError(self._shrunk(size, info))

    def view(self, info: TensorInfo, start: int, count: int) -> np.ndarray:
        """Elements [start, start+count) of ``info`` as a read-only numpy view of the mapped file."""
        if count == 0:
            return np.empty(0, dtype=np_dtype(info.dtype))
        mm = self._map()
        self.check_size(info)
        return np.frombuffer(mm, dtype=np_dtype(info.dtype), count=count, offset=info.offset + start * itemsize(info.dtype))

    def _range(self, info: TensorInfo, start: int, count: int) -> Tuple[int, int]:
        b = info.offset + start * itemsize(info.dtype)
        e = b + count * itemsize(info.dtype)
        return b, e

    def prefetch(self, info: TensorInfo, start: int, count: int) -> None:
        """Ask the kernel to start reading the range now (asynchronous readahead)."""
        if count and hasattr(mmap, "MADV_WILLNEED"):
            b, e = self._range(info, start, count)
            b0 = b - b % PAGE
            self._map().madvise(mmap.MADV_WILLNEED, b0, e - b0)

    def release(self, info: TensorInfo, start: int, count: int) -> None:
        """Drop the mapped pages of a finished range from this process (not from the page cache).

        Whole pages inside the range only, so pages shared with a range still to come stay mapped.
        """
        if count and self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            b, e = self._range(info, start, count)
            b0 = -(-b // PAGE) * PAGE
            e0 = e - e % PAGE
            if e0 > b0:
                self._mm.madvise(mmap.MADV_DONTNEED, b0, e0 - b0)

    def release_all(self) -> None:
        if self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED, 0, len(self._mm))

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the map goes with it
                pass
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def header_bytes(entries: Sequence[Tuple[str, str, Tuple[int, ...]]], metadata: Optional[dict] = None) -> Tuple[bytes, List[int]]:
    """(8-byte length + JSON header padded to 8 bytes, byte offset of each entry's data in the file)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    rel = []
    for name, dtype, shape in entries:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * itemsize(dtype)
        header[name] = {"dtype": DTYPES[dtype][0], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        rel.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the safetensors package writes
    blob = struct.pack("<Q", len(raw)) + raw
    return blob, [len(blob) + r for r in rel]


class ShardWriter:
    """One output safetensors file whose header is fixed up front; chunks land with pwrite.

    ``create`` writes the header and sizes the file (every byte is then placed by
    ``write``); ``open_existing`` lets another process (a distributed rank) write its
    own ranges into a file created elsewhere. ``written`` counts bytes placed, so
    the caller can check that every byte was written before the folder is committed.
    """

    def __init__(self, path: str, entries: Sequence[Tuple[str, str, Tuple[int, ...]]], metadata: Optional[dict] = None):
        self.path = path
        self.entries = list(entries)
        self.header, offsets = header_bytes(self.entries, metadata)
        self.offsets = {name: off for (name, _, _), off in zip(self.entries, offsets)}
        self.dtypes = {name: dtype for name, dtype, _ in self.entries}
        self.data_bytes = sum(_nbytes(dtype, shape) for _, dtype, shape in self.entries)
        self.size = len(self.header) + self.data_bytes
        self.written = 0
        self._fd: Optional[int] = None

    def create(self) -> "ShardWriter":
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self._fd, self.size)
            _pwrite_all(self._fd, memoryview(self.header), 0)
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from None
        return self

    def open_existing(self) -> "ShardWriter":
        self._fd = os.open(self.path, os.O_RDWR)
        if os.fstat(self._fd).st_size != self.size:
            raise MergeError(f"{self.path}: expected a preallocated shard of {self.size} bytes")
        return self

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        """Place ``data`` (contiguous, the tensor's storage dtype) at element ``start`` of ``name``."""
        off = self.offsets[name] + start * itemsize(self.dtypes[name])
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        try:
            _pwrite_all(self._fd, buf, off)
        except OSError as e:  # pwrite's error names no file
            raise OSError(e.errno, e.strerror, self.path) from None
        self.written += len(buf)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _nbytes(dtype: str, shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * itemsize(dtype)


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf = buf[n:]
        offset += n
