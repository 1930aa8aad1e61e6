"""PyTorch ``.bin`` / ``.pt`` checkpoints, loaded with ``weights_only=True`` only.

torch is imported here and nowhere else on the file path, so merging
safetensors never pays for it. Files in the zip format are memory-mapped
(``mmap=True``): tensors stay on disk until a chunk touches them.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict

import numpy as np

from ..errors import MergeError
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


class TorchFile:
    """A state dict file read with ``torch.load(weights_only=True, mmap=True)``."""

    def __init__(self, path: str):
        import torch

        self.path = path
        if not os.path.exists(path):
            raise MergeError(f"{path}: no such file")
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) format cannot be mapped
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (torch raises many kinds for a bad file)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MergeError(f"{path}: cannot be loaded as a weights-only PyTorch checkpoint ({msg})") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise MergeError(f"{path}: expected a state dict (name -> tensor), found a {type(sd).__name__}")
        self._tensors: Dict[str, "torch.Tensor"] = {}
        self.tensors: Dict[str, TensorInfo] = {}
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise MergeError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
            dtype = _TORCH_TO_NAME.get(str(t.dtype))
            if dtype is None:
                raise MergeError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
            self._tensors[name] = t
            self.tensors[name] = TensorInfo(name, dtype, tuple(t.shape), path, -1)

    def view(self, info: TensorInfo, start: int, count: int) -> np.ndarray:
        import torch

        t = self._tensors[info.name].reshape(-1)[start : start + count]
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
            return t.contiguous().numpy().view(np.uint16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return t.contiguous().numpy()

    def prefetch(self, info: TensorInfo, start: int, count: int) -> None:
        pass

    def release(self, info: TensorInfo, start: int, count: int) -> None:
        pass

    def release_all(self) -> None:
        pass

    def close(self) -> None:
        self._tensors = {}

