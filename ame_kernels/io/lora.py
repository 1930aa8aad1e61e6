"""A PEFT LoRA adapter applied to its base on the fly: mergekit's ``base+lora`` model form.

``open_lora(base, adapter)`` is a Checkpoint with the base's tensor names whose LoRA-adapted
tensors are W + (alpha / r) * B @ A (alpha / sqrt(r) with ``use_rslora``; transposed for
``fan_in_fan_out`` and for embedding adapters, as PEFT's ``merge_and_unload``), computed in
float32 one tensor at a time when the engine first reads it (memory: one tensor) and rounded
to the base tensor's dtype; ``modules_to_save`` tensors replace the base's. ``lora_dropout``
plays no part in a merge. Refused, naming them: DoRA, rank/alpha patterns, an adapter tensor
with no base tensor, a rank other than the config's ``r``, a B @ A shape that is not W's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, Optional, Tuple

import numpy as np

from ..errors import MergeError
from .checkpoint import Checkpoint, open_checkpoint
from .safetensors import SafetensorsFile, np_dtype

PREFIX = "base_model.model."


def _f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def _round(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        return r
    return a.astype(np_dtype(dtype))


class LoraFile:
    """The adapted tensors of one base + adapter pair, as a reader the engine views by range."""

    in_memory = False

    def __init__(self, base: Checkpoint, adapter: SafetensorsFile, pairs: Dict[str, Tuple[str, str, bool]],
                 replace: Dict[str, str], scale: float, path: str):
        self.base, self.adapter, self.pairs, self.replace, self.scale = base, adapter, pairs, replace, scale
        self.path = path
        self.nbytes = 0
        self._cache: Tuple[Optional[str], Optional[np.ndarray]] = (None, None)

    def _full(self, name: str, dtype: str) -> np.ndarray:
        if self._cache[0] == name:
            return self._cache[1]
        if name in self.replace:
            info = self.adapter.tensors[self.replace[name]]
            out = _round(_f32(self.adapter.view(info, 0, info.numel), info.dtype), dtype)
        else:
            a_key, b_key, transpose = self.pairs[name]
            w_info = self.base.tensors[name]
            a_i, b_i = self.adapter.tensors[a_key], self.adapter.tensors[b_key]
            A = _f32(self.adapter.view(a_i, 0, a_i.numel), a_i.dtype).reshape(a_i.shape)
            B = _f32(self.adapter.view(b_i, 0, b_i.numel), b_i.dtype).reshape(b_i.shape)
            delta = B @ A
            if transpose:
                delta = delta.T
            W = _f32(self.base.view(name, 0, w_info.numel), w_info.dtype).reshape(w_info.shape)
            out = _round((W + delta * np.float32(self.scale)).reshape(-1), dtype)
        self._cache = (name, out)
        return out

    def view(self, info, start: int, count: int) -> np.ndarray:
        return self._full(info.name, info.dtype)[start:start + count]

    def release(self, info, start: int, count: int) -> None:
        if self._cache[0] == info.name and start + count >= info.numel:
            self._cache = (None, None)

    def prefetch(self, info, start: int, count: int) -> None:
        pass

    def release_all(self) -> None:
        self._cache = (None, None)

    def close(self) -> None:
        self._cache = (None, None)
        self.adapter.close()


def _base_name(key: str) -> str:
    k = key[len(PREFIX):] if key.startswith(PREFIX) else key
    return k


def open_lora(base_path: str, adapter_path: str, what: str = "model") -> Checkpoint:
    """Checkpoint of ``base_path`` with the PEFT adapter at ``adapter_path`` applied (module docstring)."""
    cfg_path = os.path.join(adapter_path, "adapter_config.json")
    st_path = os.path.join(adapter_path, "adapter_model.safetensors")
    if not os.path.isfile(cfg_path) or not os.path.isfile(st_path):
        raise MergeError(f"{what}: {adapter_path} is not a PEFT LoRA adapter folder (needs adapter_config.json and "
                         "adapter_model.safetensors)")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    from ..spec import MergekitOnly  # mergekit applies any adapter through PEFT

    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise MergekitOnly(f"{what}: {adapter_path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "lora_bias", "layer_replication", "target_parameters"):
        if cfg.get(key):
            raise MergekitOnly(f"{what}: {adapter_path}: adapter_config.json {key} is not supported"
                               f"{' (DoRA)' if key == 'use_dora' else ''}")
    r = int(cfg.get("r", 8))
    alpha = float(cfg.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    fan = bool(cfg.get("fan_in_fan_out", False))
    base = open_checkpoint(base_path)
    adapter = SafetensorsFile(st_path)
    try:
        pairs: Dict[str, Tuple[str, str, bool]] = {}
        replace: Dict[str, str] = {}
        for key in adapter.tensors:
            name = _base_name(key)
            for a_mark, b_mark, emb in ((".lora_A.weight", ".lora_B.weight", False),
                                        (".lora_embedding_A", ".lora_embedding_B", True)):
                if name.endswith(a_mark):
                    stem = name[: -len(a_mark)]
                    target = stem + ".weight"
                    b_key = key[: -len(a_mark)] + b_mark
                    if b_key not in adapter.tensors:
                        raise MergeError(f"{what}: {st_path}: {key} has no {b_mark.strip('.')} partner")
                    if target not in base.tensors:
                        raise MergeError(f"{what}: {st_path}: adapter tensor {key} targets {target!r}, which "
                                         f"{base.path} does not have")
                    a_i, b_i, w = adapter.tensors[key], adapter.tensors[b_key], base.tensors[target]
                    if a_i.shape[0] != r or b_i.shape[-1] != r:
                        raise MergeError(f"{what}: {st_path}: {key} has rank {a_i.shape[0]}, adapter_config.json "
                                         f"says r = {r}")
                    transpose = emb or fan
                    out = (a_i.shape[1], b_i.shape[0]) if transpose else (b_i.shape[0], a_i.shape[1])
                    if tuple(w.shape) != out:
                        raise MergeError(f"{what}: {key}: B @ A is {list(out)}, the base tensor {target} is "
                                         f"{list(w.shape)}")
                    pairs[target] = (key, b_key, transpose)
                    break
            else:
                if ".lora_B" in name or ".lora_embedding_B" in name:
                    continue
                if name not in base.tensors:
                    raise MergeError(f"{what}: {st_path}: tensor {key} (modules_to_save) has no base tensor {name!r}")
                if tuple(adapter.tensors[key].shape) != tuple(base.tensors[name].shape):
                    raise MergeError(f"{what}: {key}: shape {list(adapter.tensors[key].shape)}, the base's "
                                     f"{name} is {list(base.tensors[name].shape)}")
                replace[name] = key
        label = f"{base.path}+{adapter_path}"
        lf = LoraFile(base, adapter, pairs, replace, scale, label)
        tensors = {}
        for name, info in base.tensors.items():
            tensors[name] = dataclasses.replace(info, file=label, offset=0) if name in pairs or name in replace else info
        files = dict(base.files)
        files[label] = lf
        return Checkpoint(label, base.kind, tensors, files, base.folder)
    except BaseException:
        adapter.close()
        base.close()
        raise
