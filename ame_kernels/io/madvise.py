"""libc's madvise(2) through ctypes: the one lookup that the readers (dropping a finished range's
mapped pages) and ``ak.merge`` (asking for huge pages before a large output is first written) use.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Callable, Optional

MADV_HUGEPAGE = 14  # Linux only, every architecture


def _lookup() -> Optional[Callable[[int, int, int], int]]:
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


#: madvise(addr, length, advice) -> 0 on success; None where there is none (Windows, macOS)
madvise = _lookup()
