"""Finding the tensors of one checkpoint on disk, whatever its layout.

A checkpoint is a Hugging Face style model folder (``model.safetensors``, or
shards listed in ``model.safetensors.index.json``; ``pytorch_model.bin`` and
its sharded index as a fallback), a single ``.safetensors`` file, or a
``.bin`` / ``.pt`` / ``.pth`` file. ``open_checkpoint`` resolves the layout,
opens every file (headers only; data stays on disk) and checks that the index
and the shards agree, naming the file at fault otherwise.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..errors import MergeError
from .safetensors import SafetensorsFile, TensorInfo, open_regular

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")

#: files copied from the pivot (or first) ingredient into the output folder when present.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "sentencepiece.bpe.model",
    # sentence-transformers: the pipeline (Pooling, Normalize, ...) around the transformer
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
#: sentence-transformers module folders (``1_Pooling/``, ``2_Normalize/``): copied whole when
#: small and free of weights of their own (a Dense layer's weights cannot be merged here)
MODULE_DIR = re.compile(r"^\d+_[A-Za-z]\w*$")
#: remote-code modules (``config.json``'s ``auto_map`` names them; without them ``trust_remote_code`` fails).
AUX_PATTERNS = ("configuration_*.py", "modeling_*.py", "tokenization_*.py", "processing_*.py", "image_processing_*.py")


@dataclass
class Checkpoint:
    """The tensors of one checkpoint: name -> TensorInfo (in file order), and the open files."""

    path: str
    kind: str  # 'safetensors' or 'torch'
    tensors: Dict[str, TensorInfo]
    files: Dict[str, object] = field(default_factory=dict)  # file path -> SafetensorsFile | TorchFile
    folder: Optional[str] = None  # where config.json / tokenizer files are, if anywhere

    def reader(self, info: TensorInfo):
        return self.files[info.file]

    def view(self, name: str, start: int, count: int):
        info = self.tensors[name]
        return self.files[info.file].view(info, start, count)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def aux_files(self) -> List[str]:
        return [] if self.folder is None else aux_files_in(self.folder)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def aux_files_in(folder: str) -> List[str]:
    """The files of ``folder`` that a merged model folder should carry over (config, tokenizer,
    remote code: ``AUX_FILES`` and ``AUX_PATTERNS``)."""
    import fnmatch

    found = [os.path.join(folder, f) for f in AUX_FILES if os.path.isfile(os.path.join(folder, f))]
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        entries = []
    found += [
        os.path.join(folder, f)
        for f in entries
        if any(fnmatch.fnmatchcase(f, pat) for pat in AUX_PATTERNS) and os.path.isfile(os.path.join(folder, f))
    ]
    if os.path.isfile(os.path.join(folder, "modules.json")):
        found += [os.path.join(folder, f) for f in entries if MODULE_DIR.match(f) and os.path.isdir(os.path.join(folder, f))
                  and not any(g.endswith((".safetensors", ".bin", ".pt", ".pth")) for g in os.listdir(os.path.join(folder, f)))]
    return found


def copy_aux_files(paths: List[str], folder: str, out_dtype: Optional[str] = None) -> None:
    """Copy ``paths`` (``aux_files_in``) into the merged model ``folder``; an explicit
    ``out_dtype`` is also written into the copied ``config.json`` (``_set_config_dtype``)."""
    import shutil

    for path in paths:
        if os.path.isdir(path):  # a sentence-transformers module folder
            shutil.copytree(path, os.path.join(folder, os.path.basename(path)))
            continue
        shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
    if out_dtype and any(os.path.basename(p) == "config.json" for p in paths):
        _set_config_dtype(os.path.join(folder, "config.json"), out_dtype)


def _set_config_dtype(path: str, dtype: str) -> None:
    """An explicit out dtype is also the copied Hugging Face config's ``torch_dtype`` (and
    ``dtype``, its newer name), where the config has one: loaders with ``torch_dtype="auto"``
    read it. A config that is not a JSON object is left as copied."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return
    keys = [k for k in ("torch_dtype", "dtype") if isinstance(doc, dict) and k in doc]
    if not keys:
        return
    for k in keys:
        doc[k] = dtype
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def _open_file(path: str):
    if path.endswith(TORCH_SUFFIXES):
        from .torchfile import TorchFile  # imports torch: only for .bin/.pt inputs

        return TorchFile(path)
    return SafetensorsFile(path)


def _from_index(folder: str, index_name: str, kind: str) -> Checkpoint:
    index_path = os.path.join(folder, index_name)
    try:
        with open_regular(index_path) as f:
            weight_map = json.loads(f.read().decode("utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except MergeError:
        raise
    except RecursionError:
        raise MergeError(f"{index_path}: unreadable shard index (JSON nested too deeply)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        text = str(e) if len(str(e)) <= 120 else str(e)[:116] + " ..."
        raise MergeError(f"{index_path}: unreadable shard index ({text})") from None
    if not weight_map:
        raise MergeError(f"{index_path}: lists no tensors (its weight_map is empty)")
    for shard in weight_map.values():  # before any hashing: a list or an object there is unhashable
        if not isinstance(shard, str):
            text = repr(shard) if len(repr(shard)) <= 120 else repr(shard)[:116] + " ..."
            raise MergeError(f"{index_path}: expected shard file names in weight_map, found {text}")
    files: Dict[str, object] = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = os.path.join(folder, shard)
        if os.path.isdir(shard_path):
            raise MergeError(f"{index_path}: lists shard {shard!r}, which is a folder ({shard_path}), not a file")
        if not os.path.exists(shard_path):
            raise MergeError(f"{index_path}: lists shard {shard!r}, which is missing ({shard_path}: no such file)")
        try:
            files[shard_path] = _open_file(shard_path)
        except BaseException:
            for f in files.values():
                f.close()
            raise
    try:
        tensors: Dict[str, TensorInfo] = {}
        for name, shard in weight_map.items():
            shard_path = os.path.join(folder, shard)
            infos = files[shard_path].tensors
            if name not in infos:
                raise MergeError(f"{shard_path}: lacks tensor {name!r}, which {index_name} places in it")
            tensors[name] = infos[name]
        # every tensor of every shard must be the one the index names: a tensor the index does not list
        # would silently be left out of the merge, and one held by two shards is ambiguous
        for shard_path, f in files.items():
            for name in f.tensors:
                listed = weight_map.get(name)
                if listed is None:
                    raise MergeError(
                        f"{shard_path}: holds tensor {name!r}, which {index_path} does not list "
                        "(the index and its shards disagree)"
                    )
                if os.path.join(folder, listed) != shard_path:
                    raise MergeError(
                        f"{shard_path}: holds tensor {name!r}, which {index_path} places in {listed!r} "
                        "(a tensor in two shards)"
                    )
    except BaseException:
        for f in files.values():
            f.close()
        raise
    return Checkpoint(folder, kind, tensors, files, folder)


def _from_file(path: str, folder: Optional[str]) -> Checkpoint:
    f = _open_file(path)
    kind = "torch" if path.endswith(TORCH_SUFFIXES) else "safetensors"
    return Checkpoint(path, kind, dict(f.tensors), {path: f}, folder)


def open_checkpoint(path: str) -> Checkpoint:
    """Open the checkpoint at ``path`` (folder or file); raises MergeError naming what is wrong."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    try:
        ck = _open_checkpoint(path)
    except OSError as e:  # a folder that cannot be listed, a file that cannot be opened, ...
        where = e.filename if e.filename is not None else path
        raise MergeError(f"{where}: cannot be read ({e.strerror or e})") from None
    if not ck.tensors:
        ck.close()
        raise MergeError(f"{ck.path}: holds no tensors")
    return ck


def _open_checkpoint(path: str) -> Checkpoint:
    if os.path.isdir(path):
        # transformers' order: a single file before an index, safetensors before .bin
        for name, kind in ((SAFE_SINGLE, None), (SAFE_INDEX, "safetensors"), (BIN_SINGLE, None), (BIN_INDEX, "torch")):
            p = os.path.join(path, name)
            if os.path.isfile(p):
                return _from_index(path, name, kind) if kind else _from_file(p, path)
            if os.path.lexists(p) and not os.path.isdir(p) and os.path.exists(p):  # a FIFO, socket or device
                raise MergeError(f"{p}: not a regular file (a FIFO, socket or device); expected a checkpoint file")
        single = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(single) == 1:
            return _from_file(os.path.join(path, single[0]), path)
        found = ", ".join(single) if single else "none"
        raise MergeError(
            f"{path}: no checkpoint found in this folder (looked for {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX}, "
            f"{BIN_SINGLE}; .safetensors files: {found})"
        )
    if os.path.isfile(path):
        return _from_file(path, os.path.dirname(path) if _has_aux(os.path.dirname(path)) else None)
    if os.path.exists(path):  # a FIFO, socket or device
        raise MergeError(f"{path}: not a regular file (a FIFO, socket or device); expected a checkpoint file or folder")
    raise MergeError(f"{path}: no such file or folder")


def _has_aux(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json"))


def fill_missing_buffers(cks: List[Checkpoint]) -> Tuple[List[Checkpoint], List[str]]:
    """Non-floating tensors (buffers such as an old base's int64 ``embeddings.position_ids``) that
    some checkpoints have and others lack: read from the first one that has it, with a warning
    each, as transformers tolerates them; floating tensors missing somewhere stay an error."""
    import dataclasses

    from .safetensors import MERGE_DTYPES

    have: dict = {}
    for ck in cks:
        for name, info in ck.tensors.items():
            if info.dtype not in MERGE_DTYPES and name not in have:
                have[name] = (ck, info)
    missing = {name for name in have if any(name not in ck.tensors for ck in cks)}
    if not missing:
        return cks, []
    out, notes = [], []
    for ck in cks:
        lack = [n for n in have if n in missing and n not in ck.tensors]
        if not lack:
            out.append(ck)
            continue
        tensors, files = dict(ck.tensors), dict(ck.files)
        for n in lack:
            src, info = have[n]
            tensors[n] = dataclasses.replace(info)
            files.setdefault(info.file, src.files[info.file])
            notes.append(f"{ck.path}: has no {n!r} (a non-floating {info.dtype} buffer): copied from {src.path}")
        out.append(Checkpoint(ck.path, ck.kind, tensors, files, ck.folder))
    return out, notes
