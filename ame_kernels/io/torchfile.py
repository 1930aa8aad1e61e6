"""PyTorch ``.bin`` / ``.pt`` checkpoints, loaded with ``weights_only=True`` only.

torch is imported here and nowhere else on the file path, so merging
safetensors never pays for it.

Zip-format files (``torch.save``'s default since torch 1.6) are memory-mapped
(``torch.load(mmap=True)``, one private read-only mapping of the whole file):
tensors stay on disk until a chunk touches them, and ``release`` drops the
pages of a finished range from this process with ``madvise(MADV_DONTNEED)``,
as ``SafetensorsFile`` does, so the resident set stays bounded by the chunk
size. The pages are never written (a private mapping would then hold the only
copy), except by torch's byte swap of a file saved on a machine of the other
byte order: such a file is not released.

Legacy (non-zip) files cannot be mapped: they are loaded whole into memory
when opened (``in_memory`` is True; the engine warns, naming the file and its
size), so peak memory grows with them. Re-save them with ``torch.save`` or
convert them to safetensors.
"""

from __future__ import annotations

import mmap
import os
import sys
import warnings
import zipfile
from typing import Dict, Optional

import numpy as np

from ..errors import MergeError
from .madvise import madvise
from .safetensors import TensorInfo

_TORCH_TO_NAME = {
    "torch.float64": "float64",
    "torch.float32": "float32",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
    "torch.int64": "int64",
    "torch.int32": "int32",
    "torch.int16": "int16",
    "torch.int8": "int8",
    "torch.uint8": "uint8",
    "torch.bool": "bool",
}
PAGE = mmap.PAGESIZE




def _foreign_byte_order(path: str) -> bool:
    """True when the zip records a byte order other than this machine's (torch swaps the mapped bytes in place)."""
    try:
        with zipfile.ZipFile(path) as z:
            rec = next((n for n in z.namelist() if n.endswith("/byteorder")), None)
            return rec is not None and z.read(rec).decode().strip() != sys.byteorder
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError):
        return True  # cannot tell: do not release


class TorchFile:
    """A state dict file read with ``torch.load(weights_only=True, mmap=True)`` (whole, for the legacy format)."""

    def __init__(self, path: str):
        import torch

        self.path = path
        if not os.path.exists(path):
            raise MergeError(f"{path}: no such file")
        from .safetensors import open_regular

        open_regular(path).close()  # a FIFO or device would block torch.load forever
        self.in_memory = False  # legacy format: every tensor loaded into this process
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) format cannot be mapped
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
                self.in_memory = True
        except Exception as e:  # noqa: BLE001 (torch raises many kinds for a bad file)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "weights only load failed" in msg.lower():
                # torch's own advice (weights_only=False) would run the file's pickled code
                msg = ("it holds Python objects other than tensors, which a weights-only load refuses; "
                       "ame-merge never unpickles arbitrary code: save its state dict (or safetensors) "
                       "from a trusted environment")
            raise MergeError(f"{path}: cannot be loaded as a weights-only PyTorch checkpoint ({msg})") from None
        if isinstance(sd, dict) and not all(isinstance(v, torch.Tensor) for v in sd.values()):
            # training checkpoints wrap the weights: {"state_dict": {...}} or {"model": {...}, "optimizer": ...}
            for key in ("state_dict", "model"):
                if isinstance(sd.get(key), dict):
                    sd = sd[key]
                    break
        if not isinstance(sd, dict):
            raise MergeError(f"{path}: expected a state dict (name -> tensor), found a {type(sd).__name__}")
        # pages of the mapping may be dropped only when they hold the file's bytes unchanged
        self._releasable = not self.in_memory and madvise is not None and not _foreign_byte_order(path)
        self._tensors: Dict[str, "torch.Tensor"] = {}
        self._flat: Dict[str, "torch.Tensor"] = {}  # contiguous copies of non-contiguous tensors being read
        self.tensors: Dict[str, TensorInfo] = {}
        #: name -> the earlier name whose storage it shares exactly (tied weights, e.g. lm_head/embeddings)
        self.tied: Dict[str, str] = {}
        seen: Dict[tuple, str] = {}
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise MergeError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
            dtype = _TORCH_TO_NAME.get(str(t.dtype))
            if dtype is None:
                raise MergeError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
            self._tensors[name] = t
            self.tensors[name] = TensorInfo(name, dtype, tuple(t.shape), path, -1)
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), str(t.dtype))
            if t.numel() and key in seen:
                self.tied[name] = seen[key]
            else:
                seen.setdefault(key, name)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def _flat_tensor(self, name: str):
        t = self._tensors[name]
        if t.is_contiguous():
            return t.reshape(-1)
        flat = self._flat.get(name)
        if flat is None:  # one copy per tensor (not per chunk), dropped after its last chunk
            flat = self._flat[name] = t.reshape(-1)
            self._advise(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(), mmap.MADV_DONTNEED if self._releasable else None)
        return flat

    def view(self, info: TensorInfo, start: int, count: int) -> np.ndarray:
        import torch

        t = self._flat_tensor(info.name)[start : start + count]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return t.numpy()

    def _range(self, info: TensorInfo, start: int, count: int):
        """(address, bytes) of elements [start, start+count) in the mapping, or None when not contiguous there."""
        t = self._tensors[info.name]
        if not t.is_contiguous():
            return None
        size = t.element_size()
        return t.data_ptr() + start * size, count * size

    @staticmethod
    def _advise(addr: int, nbytes: int, advice: Optional[int], inner: bool = True) -> None:
        """madvise the whole pages inside [addr, addr+nbytes) (inner) or covering it; best effort."""
        if advice is None or nbytes <= 0 or madvise is None:
            return
        b = -(-addr // PAGE) * PAGE if inner else addr - addr % PAGE
        e = (addr + nbytes) - (addr + nbytes) % PAGE if inner else addr + nbytes
        if e > b:
            madvise(b, e - b, advice)

    def prefetch(self, info: TensorInfo, start: int, count: int) -> None:
        """Ask the kernel to start reading the range now (asynchronous readahead)."""
        r = self._range(info, start, count) if count and not self.in_memory else None
        if r is not None and hasattr(mmap, "MADV_WILLNEED"):
            self._advise(*r, mmap.MADV_WILLNEED, inner=False)

    def release(self, info: TensorInfo, start: int, count: int) -> None:
        """Drop the mapped pages of a finished range from this process (they stay in the page cache).

        Whole pages inside the range only, so pages shared with a range still to come stay mapped
        (and a page dropped too early is read back from the file on its next touch).
        """
        if start + count >= info.numel:
            self._flat.pop(info.name, None)
        if count and self._releasable:
            r = self._range(info, start, count)
            if r is not None:
                self._advise(*r, mmap.MADV_DONTNEED)

    def release_all(self) -> None:
        self._flat.clear()
        if self._releasable:
            for t in self._tensors.values():
                s = t.untyped_storage()
                self._advise(s.data_ptr(), s.nbytes(), mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._tensors = {}
        self._flat = {}
