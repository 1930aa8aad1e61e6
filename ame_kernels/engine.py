"""The checkpoint engine: merge checkpoints on disk into a sharded safetensors folder in bounded memory.

    plan = plan_merge(["a/", "b/", "c/"], AMEConfig(optimizer="adam"))   # every check, no compute
    result = run_merge(plan, "merged/")                                   # chunked, atomic

``plan_merge`` opens every checkpoint (headers only), checks names, shapes and
dtypes across ingredients, fixes each tensor's output dtype and shard, and cuts
the work into chunks of at most ``chunk_elems`` elements (the update is
elementwise, so a big tensor is split into element ranges). ``run_merge``
builds the output folder under a temporary name, runs the whole schedule on each
chunk (the kernels read the inputs straight from the mapped files) and writes each
shard front to back: the kernels write their results straight into aligned
staging buffers that a writer thread hands to the disk (O_DIRECT where the
filesystem allows) while the next chunk computes. Then it writes the index, the
copied config/tokenizer files and ``ame_merge.yaml`` and renames the folder into
place. Distributed ranks (``ame_kernels.distributed``) instead place their
results with pwrite into shards preallocated by rank 0 (``create_shards``).

Memory: at most N input chunks are mapped at a time (pages are released after
each chunk, for safetensors and zip-format ``.bin`` files alike), plus one output
chunk: peak RSS ~ N x chunk + constant, whatever the model size. Legacy (non-zip)
``.bin`` files are the exception: loaded whole when opened (the plan warns).

On the CPU the file path never imports torch: numpy views of the mapped files
go to the cpu backend's ``whole_run_buffers``. Other backends (reference,
triton, cuda, or a CUDA device) get torch tensors made from the same views.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import resource
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .config import AMEConfig, make_config
from .errors import MergeError
from .io.atomic import AtomicDir, pause_point
from .io.checkpoint import Checkpoint, copy_aux_files, open_checkpoint
from .io.safetensors import KERNEL_DTYPES, MERGE_DTYPES, ShardWriter, itemsize, np_dtype
from .io.stream import ShardStream
from .schedule import StepPlan, schedule

DEFAULT_CHUNK_MB = 64
DEFAULT_SHARD_SIZE = 5 * 10**9  # "5GB", as Hugging Face counts it
PROVENANCE = "ame_merge.yaml"
INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: merged (float) or copied from ``source`` (non-float)."""

    name: str
    shape: Tuple[int, ...]
    numel: int
    merge: bool
    in_dtypes: Tuple[str, ...]
    out_dtype: str
    source: int  # copy source: ingredient index, or -1 for the pivot checkpoint
    shard: int

    @property
    def out_bytes(self) -> int:
        return self.numel * itemsize(self.out_dtype)

    @property
    def in_bytes(self) -> int:
        return self.numel * sum(itemsize(d) for d in self.in_dtypes)


@dataclass(frozen=True)
class WorkItem:
    """Elements [start, start+count) of tensor ``job`` (an index into MergePlan.tensors)."""

    job: int
    start: int
    count: int


@dataclass
class MergePlan:
    ingredients: List[Checkpoint]
    pivot: Union[None, int, Checkpoint]  # None = soup
    config: AMEConfig
    steps: StepPlan
    tensors: List[TensorJob]
    shard_files: List[str]
    work: List[WorkItem]
    chunk_elems: int
    backend: str
    device: str
    shard_size: int
    warnings: List[str] = field(default_factory=list)
    #: the method and its checked parameters (methods.MethodCall); steps is None unless it is 'ame'
    call: Any = None
    #: the base checkpoint of a task-vector method (read like an ingredient)
    base: Optional[Checkpoint] = None
    #: a folder whose tokenizer files replace the copied ones (mergekit's tokenizer_source)
    tokenizer_from: Optional[str] = None
    #: False: no tokenizer files in the output (mergekit-yaml --no-copy-tokenizer)
    copy_tokenizer: bool = True
    #: more files written beside the shards: name -> text (mergekit_config.yml)
    extra_files: Dict[str, str] = field(default_factory=dict)
    #: config.json keys to set in the copied config (a frankenmerge's num_hidden_layers); a key
    #: 'NAME.json' with a dict value updates that copied file instead (tokenizer_config.json)
    config_updates: Dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.ingredients)

    @property
    def method(self) -> str:
        return self.call.name if self.call is not None else "ame"

    @property
    def extra_checkpoints(self) -> List[Checkpoint]:
        """The pivot or base checkpoint, when the plan reads one besides the ingredients."""
        return [ck for ck in (self.pivot, self.base) if isinstance(ck, Checkpoint)]

    @property
    def in_bytes(self) -> int:
        return sum(t.in_bytes for t in self.tensors) + sum(
            t.numel * itemsize(ck.tensors[t.name].dtype) for ck in self.extra_checkpoints for t in self.tensors if t.merge
        )

    @property
    def out_bytes(self) -> int:
        return sum(t.out_bytes for t in self.tensors)

    def item_bytes(self, item: WorkItem) -> int:
        """Bytes read and written by one work item (for progress and balancing)."""
        job = self.tensors[item.job]
        return item.count * (sum(itemsize(d) for d in job.in_dtypes) + itemsize(job.out_dtype))

    def estimated_peak_bytes(self) -> int:
        """N mapped input chunks + two staging buffers (+ a pivot chunk) + what this process holds now."""
        widest = max((itemsize(d) for t in self.tensors for d in t.in_dtypes), default=4)
        elems = min(self.chunk_elems, max((t.numel for t in self.tensors), default=0))
        per_chunk = elems * (self.n * widest + 8 + 4 * len(self.extra_checkpoints))
        return per_chunk + current_rss_bytes()

    def shard_entries(self, shard: int) -> List[Tuple[str, str, Tuple[int, ...]]]:
        jobs = [t for t in self.tensors if t.shard == shard]
        # widest dtypes first (stable), so every tensor's data is aligned to its itemsize
        jobs.sort(key=lambda t: -itemsize(t.out_dtype))
        return [(t.name, t.out_dtype, t.shape) for t in jobs]


def parse_size(value: Union[int, float, str], what: str = "shard size") -> int:
    """'5GB' -> 5e9, '500MB', '2GiB', '1e9', 1000 -> bytes (decimal units as Hugging Face; *iB binary)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    else:
        s = str(value).strip().upper().replace(" ", "")
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
        mult = 1
        for u, m in units.items():
            if s.endswith(u):
                s, mult = s[: -len(u)], m
                break
        try:
            n = float(s) * mult
        except ValueError:
            raise MergeError(f"{what}: cannot read {value!r} as a size (e.g. 5GB, 500MB, 2GiB)") from None
    if not (n >= 1 and math.isfinite(n)):
        raise MergeError(f"{what}: must be at least 1 byte, got {value!r}")
    return int(n)


def _resolve_backend(name: str, device: str) -> str:
    """The backend that will run: 'cpu' (buffers, no torch) or a torch backend's name."""
    dev_type = device.split(":")[0]
    if dev_type not in ("cpu", "cuda"):
        raise MergeError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev_type == "cpu" and name in ("auto", "cpu"):
        ok, why = _cpu_buffers_available()
        if ok:
            return "cpu"
        if name == "cpu":
            raise MergeError(f"backend 'cpu' is not available here: {why}")
        return "reference"
    if dev_type == "cuda":
        import torch

        try:
            index = torch.device(device).index
        except RuntimeError:
            raise MergeError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MergeError(f"device {device!r}: no CUDA device is available here")
        if index is not None and index >= count:
            raise MergeError(f"device {device!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    from .backends import get_backend  # imports torch-based backends lazily

    return get_backend(name, dev_type).name


def _cpu_buffers_available() -> Tuple[bool, str]:
    try:
        from .backends import cpu as cpu_backend

        fn = getattr(cpu_backend, "whole_run_buffers")
        ok, why = cpu_backend.CpuBackend().available()
        return (ok and callable(fn)), why
    except (ImportError, AttributeError) as e:
        return False, f"ame_kernels.backends.cpu.whole_run_buffers is missing ({e})"


def _label(i: int, ck: Checkpoint) -> str:
    return f"ingredient {i} ({ck.path})"


def _check_structure(cks: List[Checkpoint], pivot: Optional[Checkpoint], what: str = "pivot") -> List[str]:
    """Same names and shapes everywhere, float/non-float agreeing; the names in ingredient 0's order."""
    names = list(cks[0].tensors)
    ref = set(names)
    problems = []
    for i, ck in enumerate(cks[1:], start=1):
        keys = set(ck.tensors)
        if keys != ref:
            missing, extra = sorted(ref - keys), sorted(keys - ref)
            problems.append(f"{_label(i, ck)}: missing {_short(missing)}, extra {_short(extra)}")
    if problems:
        raise MergeError("tensor names differ from ingredient 0 (" + cks[0].path + "): " + "; ".join(problems))
    for name in names:
        first = cks[0].tensors[name]
        for i, ck in enumerate(cks):
            info = ck.tensors[name]
            if info.shape != first.shape:
                raise MergeError(
                    f"tensor {name!r} has shape {list(info.shape)} in {_label(i, ck)} but {list(first.shape)} in "
                    f"ingredient 0 ({cks[0].path})"
                )
            fl, ffirst = info.dtype in MERGE_DTYPES, first.dtype in MERGE_DTYPES
            if fl != ffirst or (not fl and info.dtype != first.dtype):
                why = (
                    "a floating tensor in one model cannot be a non-floating one in another"
                    if fl != ffirst
                    else "non-floating tensors are copied, not merged, so every model must have the same dtype"
                )
                raise MergeError(
                    f"tensor {name!r} is {info.dtype} in {_label(i, ck)} but {first.dtype} in ingredient 0 "
                    f"({cks[0].path}): {why}"
                )
            if info.dtype.startswith("float8"):
                raise MergeError(f"tensor {name!r} of {_label(i, ck)} is {info.dtype}, which cannot be merged")
    if pivot is not None:
        missing = [n for n in names if n not in pivot.tensors and cks[0].tensors[n].dtype in MERGE_DTYPES]
        if missing:
            raise MergeError(f"{what} checkpoint {pivot.path}: missing tensors {_short(missing)}")
        for name in names:
            if name not in pivot.tensors or cks[0].tensors[name].dtype not in MERGE_DTYPES:
                continue
            p = pivot.tensors[name]
            if p.shape != cks[0].tensors[name].shape:
                raise MergeError(
                    f"{what} checkpoint {pivot.path}: tensor {name!r} has shape {list(p.shape)}, "
                    f"the ingredients have {list(cks[0].tensors[name].shape)}"
                )
            if p.dtype not in MERGE_DTYPES:
                raise MergeError(f"{what} checkpoint {pivot.path}: tensor {name!r} is {p.dtype}, expected a float dtype")
    return names


def _short(names: Sequence[str], limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ... (%d more)' % (len(names) - limit) if len(names) > limit else ''}]"


def plan_merge(
    models: Sequence[Union[str, Checkpoint]],
    config: Optional[AMEConfig] = None,
    *,
    pivot_path: Optional[str] = None,
    chunk_mb: float = DEFAULT_CHUNK_MB,
    shard_size: Union[int, str] = DEFAULT_SHARD_SIZE,
    device: str = "cpu",
    method: Optional[str] = None,
    base: Optional[str] = None,
    per_model: Optional[List[dict]] = None,
    **overrides: Any,
) -> MergePlan:
    """Open and check every checkpoint and fix the whole merge; raises MergeError before any compute.

    models: checkpoint paths (folders or files) in the given order.
    config / overrides: AMEConfig fields; ``pivot`` is 'soup' or an index, or give ``pivot_path``
        (an extra checkpoint read like an ingredient).
    chunk_mb: elements per chunk = chunk_mb MiB / 4 (fp32), for every input alike.
    shard_size: bytes per output shard (int or '5GB', '500MB', ...).
    method / base / per_model: a merge method other than AME (``ak.methods()``), its base
        checkpoint's path, and per-ingredient parameters (one dict per model); ``overrides`` then
        holds the method's parameters. No method and no AME option: the uniform soup.
    """
    from .methods import split_call

    if not models:
        raise MergeError("models: need at least 1 checkpoint, got none")
    call = split_call(method, overrides, len(models), base is not None, config is not None, per_model)
    cfg = make_config(config, **call.ame_options) if call.name == "ame" else make_config(None, **call.general)
    if call.name != "ame" and pivot_path is not None:
        raise MergeError(f"pivot: method {call.name!r} has no pivot (a task-vector method takes base: PATH)")
    if call.transform is not None and pivot_path is not None:
        raise MergeError("pivot: a checkpoint pivot together with a transform is not supported on the engine "
                         "(use pivot: soup or a model index; ak.merge takes both)")
    if not (isinstance(chunk_mb, (int, float)) and chunk_mb > 0 and math.isfinite(chunk_mb)):
        raise MergeError(f"chunk_mb: must be a number > 0, got {chunk_mb!r}")
    shard_bytes = parse_size(shard_size)
    opened: List[Checkpoint] = []
    try:
        for m in models:
            opened.append(m if isinstance(m, Checkpoint) else open_checkpoint(m))
        extra = pivot_path if pivot_path is not None else base
        if extra is not None:
            opened.append(extra if isinstance(extra, Checkpoint) else open_checkpoint(extra))
        from .io.checkpoint import fill_missing_buffers

        # a non-floating buffer some checkpoints lack (an old position_ids) is read from one that has it
        filled, buffer_notes = fill_missing_buffers(opened)
        extra_ck = filled[-1] if extra is not None else None
        plan = _plan(filled[: len(models)], extra_ck if base is None else None, extra_ck if base is not None else None,
                     cfg, chunk_mb, shard_bytes, device, call)
        plan.warnings[:0] = buffer_notes
        return plan
    except BaseException:
        for ck in opened:  # nothing stays open after a failed plan
            ck.close()
        raise


def _plan(cks: List[Checkpoint], pivot_ck: Optional[Checkpoint], base_ck: Optional[Checkpoint], cfg: AMEConfig,
          chunk_mb: float, shard_bytes: int, device: str, call: Any) -> MergePlan:
    n = len(cks)
    pivot: Union[None, int, Checkpoint]
    if call.name != "ame":  # a task-vector method's base; there is no pivot
        pivot = None
    elif pivot_ck is not None:
        pivot = pivot_ck
    elif cfg.pivot == "soup":
        pivot = None
    elif isinstance(cfg.pivot, int):
        if not -n <= cfg.pivot < n:
            raise MergeError(f"pivot: index {cfg.pivot} is out of range for {n} models")
        pivot = cfg.pivot % n
    else:
        raise MergeError(f"pivot: expected 'soup', a model index or a checkpoint path, got {cfg.pivot!r}")
    extra = pivot if isinstance(pivot, Checkpoint) else base_ck
    names = _check_structure(cks, extra, "pivot" if base_ck is None else "base")
    names, tied_notes = _drop_tied(names, cks)
    steps = schedule(cfg, n) if call.name == "ame" else None  # once, reused by every chunk
    backend = _resolve_backend(cfg.backend, device)

    # the checkpoint whose dtypes and non-float tensors the output takes
    src_idx = -1 if extra is not None else (pivot if isinstance(pivot, int) else 0)
    src = extra if extra is not None else cks[src_idx]
    plan_warnings: List[str] = list(tied_notes)
    jobs: List[TensorJob] = []
    sizes = []
    for name in names:
        first = cks[0].tensors[name]
        merge = first.dtype in MERGE_DTYPES
        if merge:
            own = src.tensors[name].dtype
            out_dtype = cfg.out_dtype or (own if own in KERNEL_DTYPES else "float32")
            source = src_idx
        else:
            out_dtype = first.dtype
            source = src_idx if name in src.tensors else 0
        in_dtypes = tuple(ck.tensors[name].dtype for ck in cks)
        jobs.append(TensorJob(name, first.shape, first.numel, merge, in_dtypes, out_dtype, source, 0))
        sizes.append(first.numel * itemsize(out_dtype))
    params = getattr(call, "params", None)
    if hasattr(params, "bind"):  # per-tensor values (layer gradients, filters): all checked before any read
        params.bind(names, getattr(call, "positions", None))
        params.check_tensors([j.name for j in jobs if j.merge])
    shards = assign_shards(sizes, shard_bytes)
    jobs = [dataclasses.replace(j, shard=k) for j, k in zip(jobs, shards)]
    if n == 1:
        plan_warnings.append(f"one model ({cks[0].path}): there is nothing to merge it with; the output is that "
                             f"model as method {call.name!r} computes it from one input")
    for ck in cks + ([extra] if extra is not None else []):
        for f in ck.files.values():
            if getattr(f, "in_memory", False):  # a legacy (non-zip) torch file cannot be mapped
                plan_warnings.append(
                    f"{f.path}: legacy (non-zip) PyTorch checkpoint, loaded whole into memory "
                    f"({f.nbytes / 2**20:.0f} MiB); re-save it with torch.save or convert it to safetensors "
                    f"to merge it in bounded memory"
                )
    if any(d == "float64" for j in jobs for d in j.in_dtypes):
        plan_warnings.append("float64 tensors are read through an fp32 copy of each chunk (and written as float32 by default)")
    nshards = (shards[-1] + 1) if shards else 1
    shard_files = shard_names(nshards)
    chunk_elems = max(4096, int(min(chunk_mb * 2**20, 2**62)) // 4 // 4096 * 4096)  # a multiple of 4096 elements
    # never more than the largest tensor needs: the staging buffers are sized by it
    largest = max((j.numel for j in jobs), default=0)
    chunk_elems = min(chunk_elems, max(4096, -(-largest // 4096) * 4096))
    plan = MergePlan(cks, pivot, cfg, steps, jobs, shard_files, [], chunk_elems, backend, device, shard_bytes, plan_warnings,
                     call, base_ck)
    rows = call.method.row_aligned or (call.transform is not None and call.transform[0].row_aligned)
    # work items in file order (shard by shard, tensor by tensor as the shard header lists them), so
    # the single-process writer can stream each shard front to back
    index = {job.name: j for j, job in enumerate(jobs)}
    plan.work = [
        WorkItem(j, s, min(step, jobs[j].numel - s))
        for k in range(nshards)
        for j in (index[name] for name, _, _ in plan.shard_entries(k))
        for step in (_item_elems(jobs[j], chunk_elems, rows),)
        for s in range(0, jobs[j].numel, step)
    ]
    return plan


def _tied(ck: Checkpoint) -> dict:
    """name -> the earlier name whose storage it shares, over the checkpoint's PyTorch files."""
    out: dict = {}
    for f in ck.files.values():
        out.update(getattr(f, "tied", {}) or {})
    return out


def _drop_tied(names: List[str], cks: List[Checkpoint]) -> Tuple[List[str], List[str]]:
    """Names without the tensors tied to an earlier one in every ingredient (written once, as
    transformers writes safetensors; its loaders tie them again), and a note for each."""
    ties = [_tied(ck) for ck in cks]
    drop = {n: ties[0][n] for n in ties[0] if all(t.get(n) == ties[0][n] for t in ties[1:]) and ties[0][n] in names}
    notes = [f"tensor {n!r} shares its storage with {src!r} in every model (tied weights): written once, as "
             f"{src!r}, as transformers writes safetensors" for n, src in drop.items()]
    return [n for n in names if n not in drop], notes


def assign_shards(sizes: Sequence[int], shard_bytes: int) -> List[int]:
    """The shard of each tensor (bytes ``sizes``, in order): a new shard when the next one would
    overflow ``shard_bytes`` (a tensor larger than that gets a shard of its own), as Hugging Face."""
    out, shard, fill = [], 0, 0
    for size in sizes:
        if fill and fill + size > shard_bytes:
            shard, fill = shard + 1, 0
        fill += size
        out.append(shard)
    return out


def shard_names(nshards: int) -> List[str]:
    return ["model.safetensors"] if nshards == 1 else [f"model-{k + 1:05d}-of-{nshards:05d}.safetensors" for k in range(nshards)]


def _item_elems(job: TensorJob, chunk_elems: int, rows: bool) -> int:
    """Elements per work item of ``job``: the chunk size, or whole rows for per-row methods (a row
    longer than a chunk makes one item per row)."""
    if not (rows and job.merge and len(job.shape) >= 1):
        return chunk_elems
    row = max(1, job.numel // max(1, job.shape[0])) if len(job.shape) >= 2 else max(1, job.numel)
    return max(row, chunk_elems // row * row)


# --------------------------------------------------------------------------- kernels


def _to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """An fp32 array of ``a`` (storage dtype ``dtype``); zero-copy for float32."""
    if dtype == "float32":
        return a
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


class _BufferRunner:
    """The cpu backend on numpy buffers (no torch)."""

    def __init__(self, threads: Optional[int]):
        from .backends.cpu import whole_run_buffers

        self.fn = whole_run_buffers
        self.threads = threads

    def __call__(self, inputs, in_dtypes, steps, pivot, adaptive, out, out_dtype, check_finite) -> list:
        return list(
            self.fn(inputs, in_dtypes, steps, pivot, adaptive, out, out_dtype, threads=self.threads, check_finite=check_finite)
        )


class _TorchRunner:
    """A torch backend (reference, triton, cuda) on tensors made from the numpy views.

    On a CUDA device, backends with a chunked host driver (cuda, triton) get host tensors
    straight from the mapped files and stream them through the GPU themselves (pinned
    double buffers, copies overlapped with compute); others get device copies.
    """

    def __init__(self, backend: str, device: str, threads: Optional[int]):
        import torch

        from .backends import get_backend

        self.torch = torch
        self.device = torch.device(device)
        self.backend = get_backend(backend, self.device.type)
        self.threads = threads
        self.stream_host = self.device.type == "cuda" and hasattr(self.backend, "whole_run_chunked")

    def _host(self, a: np.ndarray, dtype: str):
        return _host_tensor(a, dtype)

    def __call__(self, inputs, in_dtypes, steps, pivot, adaptive, out, out_dtype, check_finite) -> list:
        torch = self.torch
        xs = [self._host(a, d) for a, d in zip(inputs, in_dtypes)]
        p = pivot if pivot is None or isinstance(pivot, int) else self._host(*pivot)
        o = self._host(out, out_dtype)  # writable and aligned: the kernel writes the staging buffer
        if self.device.type == "cpu":
            return list(self.backend.whole_run(xs, steps, p, adaptive, o, threads=self.threads, check_finite=check_finite))
        if self.stream_host:
            return list(self.backend.whole_run_chunked(xs, steps, p, adaptive, o, device=self.device, check_finite=check_finite))
        xs = [x.to(self.device) for x in xs]
        p = p.to(self.device) if isinstance(p, torch.Tensor) else p
        od = torch.empty(o.shape[0], dtype=o.dtype, device=self.device)
        bad = self.backend.whole_run(xs, steps, p, adaptive, od, threads=self.threads, check_finite=check_finite)
        o.copy_(od)
        return list(bad)


def _make_runner(plan: MergePlan, threads: Optional[int]):
    if plan.method != "ame":
        return _MethodRunner(plan, threads)
    if plan.backend == "cpu" and plan.device == "cpu":
        return _BufferRunner(threads)
    return _TorchRunner(plan.backend, plan.device, threads)


def _host_tensor(a: np.ndarray, dtype: str):
    """A CPU tensor sharing ``a``'s memory (read-only views are only ever read)."""
    import torch

    if not a.flags.aligned:
        a = a.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # from_numpy warns about read-only arrays
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if dtype == "bfloat16" else torch.from_numpy(a)


def _nonfinite(a: np.ndarray, dtype: str) -> bool:
    """Whether the chunk ``a`` (storage dtype ``dtype``) holds a NaN or Inf."""
    if dtype == "bfloat16":
        return bool(((a.view(np.uint16) & 0x7F80) == 0x7F80).any())
    return not bool(np.isfinite(a).all())


class _MethodRunner:
    """A merge method on the plan's chunks: per tensor, the streamed statistics (read through the
    same mapped views, chunk by chunk, pages released after each) and then one combine pass per
    work item. The cpu backend gets numpy buffers (no torch); other backends torch tensors."""

    def __init__(self, plan: MergePlan, threads: Optional[int]):
        from .methods.run import BufferOps, TorchOps

        self.plan = plan
        self.method, self.params = plan.call.method, plan.call.params
        self.buffers = plan.backend == "cpu" and plan.device == "cpu"
        if self.buffers:
            self.ops = BufferOps(threads)
        else:
            import torch

            from .backends import get_backend

            self.torch, self.device = torch, torch.device(plan.device)
            self.ops = TorchOps(get_backend(plan.backend, self.device.type), threads)
        self.job, self.state = -1, None

    def handle(self, view: np.ndarray, dtype: str):
        if dtype == "float64":
            view, dtype = view.astype(np.float32), "float32"
        if self.buffers:
            return (view, dtype)
        return _host_tensor(view, dtype).to(self.device)

    def _chunks(self, job: TensorJob):
        plan = self.plan
        cks = plan.ingredients + ([plan.base] if plan.base is not None else [])
        step = _item_elems(job, plan.chunk_elems, self.method.row_aligned)
        # A tensor of one chunk is one work item, whose pass comes next and reads the same pages:
        # they stay mapped for it (its release drops them), so they are faulted in once, not once
        # per pass. Larger tensors release each chunk as the statistics pass leaves it.
        keep = step >= job.numel

        def gen():
            for s in range(0, job.numel, step):
                c = min(step, job.numel - s)
                infos = [ck.tensors[job.name] for ck in cks]
                hs = [self.handle(ck.reader(info).view(info, s, c), info.dtype) for ck, info in zip(cks, infos)]
                yield s, hs[: plan.n], (hs[plan.n] if plan.base is not None else None)
                del hs
                if not keep:
                    for ck, info in zip(cks, infos):
                        ck.reader(info).release(info, s, c)

        return gen

    def _where(self, i: int, name: str) -> str:
        ck = self.plan.ingredients[i] if i < self.plan.n else self.plan.base
        return f"{'the base' if i >= self.plan.n else f'ingredient {i}'} ({ck.tensors[name].file})"

    def _tensor(self, j: int):
        """(CombinePlan, probs function, ingredients to check per chunk) of job ``j``, planned once."""
        if j != self.job:
            from .methods.run import plan_tensor, unseen_hidden
            from .methods.stats import NonFinite

            plan, job = self.plan, self.plan.tensors[j]
            check = plan.config.check_finite
            try:
                cplan, probs, ctx = plan_tensor(self.method, self.params, job.name, job.shape, plan.n,
                                                plan.base is not None, self._chunks(job), self.ops, check)
            except NonFinite as e:
                where = "; ".join(self._where(i, job.name) for i in e.ingredients)
                raise MergeError(f"tensor {job.name!r}: NaN or Inf in {where} (or in the base)") from None
            explicit = unseen_hidden(cplan, ctx) if check else []  # checked per chunk
            self.job, self.state = j, (cplan, probs, explicit)
        return self.state

    def __call__(self, j: int, it: WorkItem, views, dts, base_view, base_dtype, out: np.ndarray, out_dtype: str) -> list:
        cplan, probs_fn, explicit = self._tensor(j)
        bad = [i for i in explicit if _nonfinite(views[i], dts[i])]
        if bad:
            return bad
        xs = [self.handle(v, d) for v, d in zip(views, dts)]
        b = self.handle(base_view, base_dtype) if base_view is not None else None
        probs = probs_fn(it.start, xs, b) if probs_fn else None
        if self.buffers:
            written_bad = self.ops.combine(xs, b, (out, out_dtype), cplan, it.start, probs)
        else:
            o = _host_tensor(out, out_dtype)
            od = o if self.device.type == "cpu" else self.torch.empty(o.shape[0], dtype=o.dtype, device=self.device)
            written_bad = self.ops.combine(xs, b, od, cplan, it.start, probs)
            if od is not o:
                o.copy_(od)
        if written_bad is None and self.plan.config.check_finite:  # the backend does not count: look
            written_bad = _nonfinite(out, out_dtype)
        if self.plan.config.check_finite and written_bad:
            # every entry reaches the output unless masked (checked above): find the culprit
            culprits = [i for i, (v, d) in enumerate(zip(views, dts)) if _nonfinite(v, d)]
            if base_view is not None and _nonfinite(base_view, base_dtype):
                culprits.append(self.plan.n)
            if culprits:
                return culprits
        return []


class _TransformStage(_MethodRunner):
    """A task-vector transform under AME (``methods.transforms``): per tensor the transform's
    statistics, then per work item the transform pass (the cpu backend's native kernel on the
    mapped views, one read of the inputs; other backends the host torch definition) writing the
    transformed ingredients as fp32 arrays for the AME runner."""

    def __init__(self, plan: MergePlan, threads: Optional[int]):
        from .backends import get_backend
        from .methods.run import BufferOps, TorchOps
        from .methods.transforms import unit_params

        self.plan = plan
        self.method, params = plan.call.transform
        self.params = unit_params(params, plan.n)
        self.buffers = plan.backend == "cpu"
        if self.buffers:
            self.ops = BufferOps(threads)
        else:
            import torch

            self.torch, self.device = torch, torch.device("cpu")
            name = plan.backend if plan.backend == "reference" else "auto"
            self.ops = TorchOps(get_backend(name, "cpu"), threads)
        self.job, self.state = -1, None
        self.pool: List[np.ndarray] = []  # the cpu path's output arrays, reused item to item

    def __call__(self, j: int, it: WorkItem, views, dts, base_view, base_dtype) -> Tuple[list, list]:
        cplan, _, explicit = self._tensor(j)
        bad = [i for i in explicit if _nonfinite(views[i], dts[i])]
        if bad:
            raise MergeError(f"tensor {self.plan.tensors[j].name!r}: NaN or Inf in "
                             + "; ".join(self._where(i, self.plan.tensors[j].name) for i in bad))
        xs = [self.handle(v, d) for v, d in zip(views, dts)]
        b = self.handle(base_view, base_dtype)
        if self.buffers:  # the AME runner reads them before the next item: the arrays are reused
            if len(self.pool) != len(xs) or self.pool[0].shape[0] < it.count:
                self.pool = [np.empty(it.count, dtype=np.float32) for _ in xs]
            outs = [o[: it.count] for o in self.pool]
        else:
            outs = [self.torch.empty(it.count, dtype=self.torch.float32) for _ in xs]
        self.ops.transform(xs, b, outs, cplan, it.start)
        arrays = outs if self.buffers else [t.numpy() for t in outs]
        return arrays, ["float32"] * len(arrays)


# --------------------------------------------------------------------------- run


@dataclass
class MergeResult:
    out_dir: str
    tensors: int
    in_bytes: int
    out_bytes: int
    seconds: float
    peak_rss_bytes: int
    backend: str
    warnings: List[str]

    @property
    def gbps(self) -> float:
        return (self.in_bytes + self.out_bytes) / max(self.seconds, 1e-9) / 1e9

    def summary(self) -> str:
        return (
            f"merged {self.tensors} tensors, {self.in_bytes / 1e9:.2f} GB in + {self.out_bytes / 1e9:.2f} GB out "
            f"in {self.seconds:.2f} s ({self.gbps:.2f} GB/s) with backend {self.backend}, "
            f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB -> {self.out_dir}"
        )


def current_rss_bytes() -> int:
    """This process's resident set now (/proc/self/statm; the peak where that is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident set (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def create_shards(plan: MergePlan, folder: str) -> None:
    """Create every output shard with its final header, sized to its final length."""
    for k, fname in enumerate(plan.shard_files):
        ShardWriter(os.path.join(folder, fname), plan.shard_entries(k), {"format": "pt"}).create().close()


class _PwriteSink:
    """Results placed with pwrite into preallocated shards (any item order; distributed ranks)."""

    def __init__(self, plan: MergePlan, folder: str):
        self.writers = [
            ShardWriter(os.path.join(folder, fname), plan.shard_entries(k), {"format": "pt"}).open_existing()
            for k, fname in enumerate(plan.shard_files)
        ]
        # two output buffers: the kernel fills one while the writer thread pwrites the other
        self.raw = [np.empty(plan.chunk_elems * 4, dtype=np.uint8) for _ in range(2)]
        self.pending: List[Any] = [None, None]
        self.slot = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ame-writer")

    def out(self, job: TensorJob, it: WorkItem) -> np.ndarray:
        if self.pending[self.slot] is not None:
            self.pending[self.slot].result()  # that buffer's previous write is done (or raises its error)
            self.pending[self.slot] = None
        return self.raw[self.slot][: it.count * itemsize(job.out_dtype)].view(np_dtype(job.out_dtype))

    def put_out(self, job: TensorJob, it: WorkItem, out: np.ndarray) -> None:
        self.pending[self.slot] = self.pool.submit(self.writers[job.shard].write, job.name, it.start, out)
        self.slot ^= 1

    def put_copy(self, job: TensorJob, it: WorkItem, data: np.ndarray) -> None:
        self.writers[job.shard].write(job.name, it.start, data)

    def finish(self) -> None:
        for fut in self.pending:
            if fut is not None:
                fut.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for w in self.writers:
            w.close()


class _StreamSink:
    """Every shard written front to back (header, then the items in file order) through a ShardStream."""

    def __init__(self, plan: MergePlan, folder: str):
        self.plan, self.folder = plan, folder
        self.layouts = [ShardWriter(os.path.join(folder, f), plan.shard_entries(k), {"format": "pt"}) for k, f in enumerate(plan.shard_files)]
        self.stream = ShardStream(plan.chunk_elems * 4)
        self.shard = -1

    def _next_shard(self) -> None:
        """Finish the current shard's file and start the next one (its header first)."""
        if self.shard >= 0:
            self.stream.close_file()
        self.shard += 1
        layout = self.layouts[self.shard]
        self.stream.open(layout.path, layout.size)
        self.stream.append(layout.header)

    def _goto(self, job: TensorJob, it: WorkItem) -> None:
        while self.shard < job.shard:
            self._next_shard()
        expected = self.layouts[job.shard].offsets[job.name] + it.start * itemsize(job.out_dtype)
        if job.shard != self.shard or self.stream.tell() != expected:  # a bug, never bad input
            raise RuntimeError(f"stream writer: {job.name!r}[{it.start}] out of file order")

    def out(self, job: TensorJob, it: WorkItem) -> np.ndarray:
        self._goto(job, it)
        return self.stream.reserve_array(it.count, np_dtype(job.out_dtype))

    def put_out(self, job: TensorJob, it: WorkItem, out: np.ndarray) -> None:
        self.stream.commit(out.nbytes)

    def put_copy(self, job: TensorJob, it: WorkItem, data: np.ndarray) -> None:
        self._goto(job, it)
        self.stream.append(data)

    def finish(self) -> None:
        last = len(self.layouts) - 1
        while self.shard < last:  # shards with no work items (zero-size tensors only)
            self._next_shard()
        if self.shard >= 0:
            self.stream.close_file()

    def close(self) -> None:
        self.stream.shutdown()


def merge_items(
    plan: MergePlan,
    folder: str,
    items: Sequence[WorkItem],
    threads: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
    stream: bool = False,
) -> List[str]:
    """Run ``items`` and write their results into the shards in ``folder``.

    stream=False: the shards exist already (``create_shards``) and results are placed with
        pwrite, in any order (a distributed rank's share).
    stream=True: ``items`` must be the whole ``plan.work`` (file order); each shard is written
        front to back, kernel results going straight into the staging buffers of a ShardStream.
    Returns warnings (non-float tensors that differ between ingredients). Raises
    MergeError on NaN/Inf in an ingredient (with ``check_finite``), naming tensor and file.
    """
    sink = _StreamSink(plan, folder) if stream else _PwriteSink(plan, folder)
    runner = _make_runner(plan, threads) if any(plan.tensors[it.job].merge for it in items) else None
    cfg = plan.config
    pivot_ck = plan.pivot if isinstance(plan.pivot, Checkpoint) else None
    extra_ck = pivot_ck or plan.base  # read besides the ingredients: the pivot or the base
    methods = plan.method != "ame"
    transform = _TransformStage(plan, threads) if (not methods and plan.call is not None and plan.call.transform
                                                   is not None and runner is not None) else None
    notes: List[str] = []
    cks = plan.ingredients
    try:
        for k, it in enumerate(items):
            job = plan.tensors[it.job]
            if k + 1 < len(items):  # start reading the next chunk while this one computes
                nxt = items[k + 1]
                for ck in cks + ([extra_ck] if extra_ck else []):
                    info = ck.tensors.get(plan.tensors[nxt.job].name)
                    if info is not None:
                        ck.reader(info).prefetch(info, nxt.start, nxt.count)
            infos = [ck.tensors[job.name] for ck in cks]
            views = [ck.reader(info).view(info, it.start, it.count) for ck, info in zip(cks, infos)]
            pause_point("chunk")  # a test hook (no-op unless $AME_TEST_PAUSE_AT names it)
            if job.merge:
                dts = list(job.in_dtypes)
                for i, d in enumerate(dts):
                    if d == "float64":
                        with np.errstate(over="ignore"):  # numpy's bare "overflow encountered in cast" names nothing
                            f32 = views[i].astype(np.float32)
                        if cfg.check_finite and not np.isfinite(f32).all() and np.isfinite(views[i]).all():
                            raise MergeError(
                                f"tensor {job.name!r}: float64 values beyond the float32 range (|x| > 3.4e38) in "
                                f"ingredient {i} ({infos[i].file}); the merge computes in float32"
                            )
                        views[i], dts[i] = f32, "float32"
                if extra_ck is not None:
                    pinfo = extra_ck.tensors[job.name]
                    pview = extra_ck.reader(pinfo).view(pinfo, it.start, it.count)
                    if pivot_ck is not None and cfg.check_finite and not np.isfinite(_to_f32(pview, pinfo.dtype)).all():
                        raise MergeError(f"tensor {job.name!r}: NaN or Inf in the pivot checkpoint ({pinfo.file})")
                    pivot = (pview, pinfo.dtype) if pinfo.dtype in KERNEL_DTYPES else (_to_f32(pview, pinfo.dtype), "float32")
                else:
                    pivot = plan.pivot
                out = sink.out(job, it)
                if methods:
                    bview, bdtype = (pivot[0], pivot[1]) if plan.base is not None else (None, None)
                    bad = runner(it.job, it, views, dts, bview, bdtype, out, job.out_dtype)
                elif transform is not None:  # AME on the transformed ingredients, around its own pivot
                    xs, xdts = transform(it.job, it, views, dts, pivot[0], pivot[1])
                    bad = runner(xs, xdts, plan.steps, plan.pivot, cfg.adaptive_pivot, out, job.out_dtype, cfg.check_finite)
                else:
                    bad = runner(views, dts, plan.steps, pivot, cfg.adaptive_pivot, out, job.out_dtype, cfg.check_finite)
                if bad:
                    where = "; ".join(f"ingredient {i} ({infos[i].file})" if i < len(infos)
                                      else f"the base ({extra_ck.tensors[job.name].file})" for i in bad)
                    raise MergeError(f"tensor {job.name!r}: NaN or Inf in {where}")
                if job.out_dtype == "float16" and cfg.check_finite and not np.isfinite(out).all():
                    # finite inputs (checked above) whose merge leaves float16's range: the rounding wrote Inf
                    raise MergeError(
                        f"tensor {job.name!r}: merged values exceed the float16 range (|x| <= 65504) and would be "
                        "written as Inf; use --out-dtype bfloat16 or float32 (or check_finite: false to write them)"
                    )
                sink.put_out(job, it, out)
            else:
                src_ck = extra_ck if job.source == -1 else cks[job.source]
                sinfo = src_ck.tensors[job.name]
                data = src_ck.reader(sinfo).view(sinfo, it.start, it.count)
                differ = [i for i, v in enumerate(views) if not np.array_equal(v, data)]
                if differ:
                    src_name = (f"the {'pivot' if pivot_ck is not None else 'base'} checkpoint" if job.source == -1
                                else f"ingredient {job.source}")
                    notes.append(
                        f"non-floating tensor {job.name!r}: ingredients {differ} differ from {src_name}; "
                        f"copied from {src_name}, not averaged"
                    )
                sink.put_copy(job, it, data)
            del views
            for ck, info in zip(cks, infos):
                ck.reader(info).release(info, it.start, it.count)
            if extra_ck is not None and job.name in extra_ck.tensors:
                pinfo = extra_ck.tensors[job.name]
                extra_ck.reader(pinfo).release(pinfo, it.start, it.count)
            if progress is not None:
                progress(plan.item_bytes(it))
        sink.finish()
    finally:
        sink.close()
    return notes


def write_metadata(plan: MergePlan, folder: str, extra: Optional[dict] = None) -> None:
    """Index (when sharded), config/tokenizer files from the pivot or first ingredient, provenance."""
    if len(plan.shard_files) > 1:
        index = {
            "metadata": {"total_size": plan.out_bytes},
            "weight_map": {t.name: plan.shard_files[t.shard] for t in plan.tensors},
        }
        with open(os.path.join(folder, INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    src = (plan.extra_checkpoints or [plan.ingredients[plan.pivot if isinstance(plan.pivot, int) else 0]])[0]
    aux = src.aux_files() or plan.ingredients[0].aux_files()
    if not plan.copy_tokenizer:
        from .mergekit_schema import TOKENIZER_FILES

        aux = [a for a in aux if os.path.basename(a) not in TOKENIZER_FILES]
    copy_aux_files(aux, folder, plan.config.out_dtype)
    if plan.tokenizer_from and plan.copy_tokenizer:
        from .mergekit_schema import TOKENIZER_FILES

        for f in TOKENIZER_FILES:
            src_f = os.path.join(plan.tokenizer_from, f)
            if os.path.isfile(src_f):
                shutil.copyfile(src_f, os.path.join(folder, f))
    # config.json keys, or {"tokenizer_config.json": {...}}: updates of another copied JSON file
    updates = {"config.json": {k: v for k, v in plan.config_updates.items() if not k.endswith(".json")},
               **{k: v for k, v in plan.config_updates.items() if k.endswith(".json")}}
    for fname, upd in updates.items():
        path = os.path.join(folder, fname)
        if upd and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
            hf.update(upd)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(hf, f, indent=2)
                f.write("\n")
    for fname, text in plan.extra_files.items():
        with open(os.path.join(folder, fname), "w", encoding="utf-8") as f:
            f.write(text)
    with open(os.path.join(folder, PROVENANCE), "w", encoding="utf-8") as f:
        f.write(provenance_yaml(plan, extra))


def provenance_yaml(plan: MergePlan, extra: Optional[dict] = None) -> str:
    import yaml

    from . import __version__

    cfg = plan.config.to_dict()
    cfg["lr"], cfg["eps"] = plan.config.resolved_lr, plan.config.resolved_eps  # the values used, not null
    if isinstance(plan.pivot, Checkpoint):
        cfg["pivot"] = plan.pivot.path
    if plan.method != "ame":  # the method's own parameters, and only the general options
        from .methods import GENERAL_KEYS

        cfg = {"method": plan.method, **plan.call.params.to_dict(), **{k: cfg[k] for k in GENERAL_KEYS}}
    doc = {
        "ame_kernels_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "method": plan.method,
        "models": [
            {"path": ck.path, **({"score": plan.config.scores[i]} if plan.config.scores else {})}
            for i, ck in enumerate(plan.ingredients)
        ],
        **({"base": plan.base.path} if plan.base is not None else {}),
        **({"pivot": plan.pivot.path if isinstance(plan.pivot, Checkpoint) else plan.config.pivot} if plan.method == "ame" else {}),
        "config": cfg,
        "engine": {
            "backend": plan.backend,
            "device": plan.device,
            "chunk_elems": plan.chunk_elems,
            "shard_size": plan.shard_size,
            "shards": len(plan.shard_files),
            "tensors": len(plan.tensors),
            "merged_tensors": sum(t.merge for t in plan.tensors),
            "out_bytes": plan.out_bytes,
        },
        **(extra or {}),
    }
    return "# Written by ame-kernels: how this folder was merged.\n" + yaml.safe_dump(doc, sort_keys=False)


def run_merge(
    plan: MergePlan,
    out_dir: str,
    *,
    force: bool = False,
    threads: Optional[int] = None,
    progress: bool = False,
    extra_provenance: Optional[dict] = None,
    protect: Sequence[str] = (),
) -> MergeResult:
    """Execute ``plan`` into ``out_dir`` atomically (see module docstring); returns timings and memory.

    ``out_dir`` may not be or hold an input of the plan (or a path in ``protect``), even with ``force``.
    """
    threads = threads if threads is not None else plan.config.threads
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(plan.item_bytes(it) for it in plan.work)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", dynamic_ncols=True, file=sys.stderr)
    atomic = AtomicDir(out_dir, force=force, protect=input_paths(plan) + list(protect))
    tmp = atomic.create()
    try:
        notes = merge_items(plan, tmp, plan.work, threads, bar.update if bar else None, stream=True)
        pause_point("metadata")
        try:
            write_metadata(plan, tmp, extra_provenance)
        except OSError as e:
            if e.filename is None:  # a write or close error names no file: name the folder being written
                raise OSError(e.errno, e.strerror, f"{tmp} (writing the index, config and {PROVENANCE} files)") from None
            raise
        atomic.commit()
    except BaseException as e:
        if atomic.committed:  # a signal delivered as the commit ended: the output is in place and complete
            e.output_complete = atomic.target
        raise
    finally:
        if bar is not None:
            bar.close()
        atomic.abort()  # no-op after a commit
    for note in notes:
        warnings.warn(note, stacklevel=2)
    secs = time.perf_counter() - t0
    return MergeResult(
        os.path.abspath(out_dir), len(plan.tensors), plan.in_bytes, plan.out_bytes, secs, peak_rss_bytes(),
        plan.backend, plan.warnings + notes,
    )


def merge_checkpoints(models: Sequence[str], out_dir: str, config: Optional[AMEConfig] = None, *, force: bool = False, **kw: Any) -> MergeResult:
    """Plan and run in one call (Python API of the CLI): ``merge_checkpoints(paths, 'out/', optimizer='adam')``."""
    engine_kw = {k: kw.pop(k) for k in ("pivot_path", "chunk_mb", "shard_size", "device", "method", "base", "per_model")
                 if k in kw}
    plan = plan_merge(models, config, **engine_kw, **kw)
    try:
        return run_merge(plan, out_dir, force=force)
    finally:
        close_plan(plan)


def write_model_folder(tensors: Sequence[Tuple[str, str, Tuple[int, ...], np.ndarray]], folder: str, *,
                       shard_size: Union[int, str] = DEFAULT_SHARD_SIZE, aux: Sequence[str] = (),
                       out_dtype: Optional[str] = None, provenance: str = "") -> List[str]:
    """Write in-memory results ((name, dtype, shape, storage array) each) into ``folder`` as the
    engine writes a merge: shards of ``shard_size`` (+ index), the ``aux`` files (config.json's dtype
    set to an explicit ``out_dtype``) and ``ame_merge.yaml``. Returns the shard file names."""
    shard_bytes = parse_size(shard_size)
    shards = assign_shards([int(np.prod(shape, dtype=np.int64)) * itemsize(d) for _, d, shape, _ in tensors], shard_bytes)
    files = shard_names((shards[-1] + 1) if shards else 1)
    os.makedirs(folder, exist_ok=True)
    for k, fname in enumerate(files):
        mine = [t for t, s in zip(tensors, shards) if s == k]
        mine.sort(key=lambda t: -itemsize(t[1]))  # widest first: every tensor aligned to its itemsize
        w = ShardWriter(os.path.join(folder, fname), [(n, d, tuple(shape)) for n, d, shape, _ in mine], {"format": "pt"}).create()
        try:
            for name, _, _, data in mine:
                if data.size:
                    w.write(name, 0, np.ascontiguousarray(data).reshape(-1))
        finally:
            w.close()
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(int(np.prod(s, dtype=np.int64)) * itemsize(d) for _, d, s, _ in tensors)},
                 "weight_map": {t[0]: files[s] for t, s in zip(tensors, shards)}}
        with open(os.path.join(folder, INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    copy_aux_files(list(aux), folder, out_dtype)
    with open(os.path.join(folder, PROVENANCE), "w", encoding="utf-8") as f:
        f.write(provenance)
    return files


def write_state_dict(tensors: Sequence[Tuple[str, str, Tuple[int, ...], np.ndarray]], out_dir: str, *,
                     shard_size: Union[int, str] = DEFAULT_SHARD_SIZE, aux: Sequence[str] = (),
                     out_dtype: Optional[str] = None, provenance: str = "", force: bool = False,
                     protect: Sequence[str] = ()) -> List[str]:
    """``write_model_folder`` into ``out_dir``, built under a temporary name and renamed into place."""
    atomic = AtomicDir(out_dir, force=force, protect=list(protect))
    tmp = atomic.create()
    try:
        files = write_model_folder(tensors, tmp, shard_size=shard_size, aux=aux, out_dtype=out_dtype,
                                   provenance=provenance)
        atomic.commit()
    finally:
        atomic.abort()
    return files


def storage_arrays(state: dict) -> List[Tuple[str, str, Tuple[int, ...], np.ndarray]]:
    """(name, dtype name, shape, storage array) of each torch tensor of ``state``, for the writers."""
    import torch

    out = []
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            out.append((name, "bfloat16", tuple(t.shape), t.view(torch.int16).numpy().view(np.uint16)))
        else:
            out.append((name, str(t.dtype).replace("torch.", ""), tuple(t.shape), t.numpy()))
    return out


def input_paths(plan: MergePlan) -> List[str]:
    """Every checkpoint path and file the plan reads (an output folder must never replace one)."""
    paths: List[str] = []
    for ck in plan.ingredients + plan.extra_checkpoints:
        paths.append(ck.path)
        if ck.folder is not None:
            paths.append(ck.folder)
        paths.extend(str(f) for f in ck.files)
    return list(dict.fromkeys(paths))


def close_plan(plan: MergePlan) -> None:
    for ck in plan.ingredients + plan.extra_checkpoints:
        ck.close()


def measure_copy_bandwidth(nbytes: int = 64 * 2**20) -> float:
    """Bytes/s of a plain in-memory copy here (best of 3), the basis of the --dry-run time estimate."""
    a = np.ones(nbytes // 8, dtype=np.float64)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best  # read + write
