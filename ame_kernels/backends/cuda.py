"""The CUDA C++ backend: hand-written kernels in ``csrc/cuda`` behind ``ame_kernels._C_cuda``.

Same contract as every backend (``base.py``). This file only checks tensors, uploads
the small tables the kernels read (input pointers and dtypes, the StepPlan's
batch_ptr / batch_idx / coeffs) and launches on the caller's current stream; the
binding (``python/bind_cuda.cpp``) checks every argument again and names it.

- CUDA tensors: one launch, asynchronous like any torch op (``check_finite`` syncs to
  read the flags back).
- GD is folded: for sgd (any momentum / nesterov / dampening / coupled weight decay) the
  host folds the whole schedule into N+1 fp32 weights (``schedule.folded_weights``, the
  cpu backend's fold, uploaded and cached like the plan) and the kernel computes one
  weighted sum, reading each input once whatever the number of epochs.
  ``CudaBackend(fold=False)``, other optimizers and ill-conditioned folds step.
- ``combine`` (the pass of every non-AME merge method, ``methods.combine``): one launch
  of ``csrc/cuda/combine.cu`` on CUDA tensors, bitwise equal to ``combine_torch``; host
  tensors are copied to the current GPU and back (one chunk: the engine sizes chunks).
- Host tensors: streamed through the GPU chunk by chunk by the Triton backend's
  generic driver (``backends/triton/driver.py``: pinned double buffers, copy and
  compute streams), with this backend's kernel; ``step`` on host tensors copies to the
  GPU and back (correct, not fast: the step APIs keep their state on one device).

Uploads come from pinned memory without blocking the host, and are cached: the plan by
(plan object, device), pointer tables by (device, addresses, dtypes), whose content is
a pure function of the key. A chunked merge calls the kernel once per chunk with the
same plan and the same staging buffers, so after the first chunk nothing is uploaded.

The ``backend="auto"`` rule for CUDA tensors is ``cuda``, else ``triton``, else
``reference`` (``backends/__init__.py``): both kernels move the same bytes; this one
needs no JIT compile or autotuning on first use and no Triton install. The Triton
backend's docstring and ``benchmarks/bench_gpu.py`` (a ``cuda`` column beside
``triton``) are where that order is revisited once measured on a GPU.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .. import _native
from ..errors import MergeError
from ..schedule import Hyper, StepPlan, folded_weights
from .base import (Backend, check_flat, check_plan_inputs, check_probs, check_step_row, check_transform_outs,
                   hyper_kwargs, plan_kwargs)

_MAX_CACHED_PLANS = 8
_MAX_CACHED_TABLES = 64


def _module():
    mod = _native.load("_C_cuda")
    if mod is None:
        raise MergeError(f"backend 'cuda' is not available: {_native.why_missing('_C_cuda')}")
    return mod


class _Uploads:
    """Small host arrays copied to the GPU from pinned memory, cached (see the module docstring)."""

    def __init__(self):
        self._plans: dict = {}
        self._tables: dict = {}
        self._weights: dict = {}
        self._combine: dict = {}

    @staticmethod
    def _upload(host: tuple, device) -> tuple:
        import torch

        stream = torch.cuda.current_stream(device)
        # pin_memory() comes from torch's caching host allocator, which keeps the block
        # alive until the non-blocking copy that reads it has finished.
        dev = tuple(torch.tensor(h).pin_memory().to(device, non_blocking=True) for h in host)
        event = torch.cuda.Event()
        event.record(stream)
        return dev + (event,)

    @staticmethod
    def _ready(entry: tuple, device) -> tuple:
        """The cached tensors, usable on the current stream (which may not be the one that uploaded them)."""
        import torch

        stream = torch.cuda.current_stream(device)
        stream.wait_event(entry[-1])
        for t in entry[:-1]:
            t.record_stream(stream)
        return entry[:-1]

    def plan(self, plan: StepPlan, device) -> tuple:
        """(batch_ptr int32 [T+1], batch_idx int32, coeffs float32 [T, 4]) on ``device``."""
        key = (id(plan), str(device))
        hit = self._plans.get(key)
        if hit is None or hit[0] is not plan:  # id() reused by a new plan: replace
            kw = plan_kwargs(plan)
            host = (kw["batch_ptr"], kw["batch_idx"], kw["coeffs"])
            if len(self._plans) >= _MAX_CACHED_PLANS:
                self._plans.pop(next(iter(self._plans)))
            hit = (plan,) + self._upload(host, device)
            self._plans[key] = hit
        return self._ready(hit[1:], device)

    def weights(self, plan: StepPlan, adaptive_pivot: bool, mode: str, index: int, device):
        """(host float32 [N+1], device copy) of the plan's GD fold (``schedule.folded_weights``),
        or None (not sgd, or ill-conditioned: step); uploaded once per (plan, device, pivot mode)."""
        key = (id(plan), str(device), bool(adaptive_pivot), mode, int(index))
        hit = self._weights.get(key)
        if hit is None or hit[0] is not plan:
            w = folded_weights(plan, adaptive_pivot, mode, index)
            if len(self._weights) >= _MAX_CACHED_PLANS:
                self._weights.pop(next(iter(self._weights)))
            hit = self._weights[key] = (plan, w, None if w is None else self._upload((w,), device))
        if hit[1] is None:
            return None
        return hit[1], self._ready(hit[2], device)[0]

    def combine_params(self, plan, device) -> tuple:
        """(fparams float32 [5N], iparams int64 [2N]) of a CombinePlan on ``device`` (csrc/cuda/combine.h)."""
        key = (id(plan), str(device))
        hit = self._combine.get(key)
        if hit is None or hit[0] is not plan:
            f = np.concatenate([plan.weight, plan.scale, plan.top_mag, plan.end_mag, plan.density]).astype(np.float32)
            i = np.concatenate([plan.top_idx, plan.end_idx]).astype(np.int64)
            if len(self._combine) >= _MAX_CACHED_PLANS:
                self._combine.pop(next(iter(self._combine)))
            hit = self._combine[key] = (plan,) + self._upload((f, i), device)
        return self._ready(hit[1:], device)

    def table(self, ptrs: tuple, codes: tuple, device) -> tuple:
        """(uint64 [M] addresses, int32 [M] dtype codes) on ``device``."""
        key = (str(device), ptrs, codes)
        hit = self._tables.get(key)
        if hit is None:
            host = (np.asarray(ptrs, dtype=np.uint64).view(np.int64), np.asarray(codes, dtype=np.int32))
            if len(self._tables) >= _MAX_CACHED_TABLES:
                self._tables.pop(next(iter(self._tables)))
            hit = self._upload(host, device)
            self._tables[key] = hit
        return self._ready(hit, device)


_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}


def _pivot_args(fn: str, pivot, plan: StepPlan, c: int, device) -> tuple:
    """(pivot_mode, pivot_index, pivot address, pivot dtype name) for the binding."""
    import torch

    if isinstance(pivot, torch.Tensor):
        return "tensor", 0, pivot.data_ptr(), check_flat(fn, "pivot", pivot, c, device)
    if isinstance(pivot, (int, np.integer)) and not isinstance(pivot, bool):
        if not 0 <= int(pivot) < plan.n:
            raise MergeError(f"{fn}: pivot index {pivot} out of range [0, {plan.n})")
        return "index", int(pivot), 0, "float32"
    if pivot is not None:
        raise MergeError(f"{fn}: pivot must be None (soup), an input index or a tensor, got {type(pivot).__name__}")
    return "soup", 0, 0, "float32"


class CudaBackend(Backend):
    """Hand-written CUDA C++ kernels (csrc/cuda) on CUDA tensors; host tensors streamed through the GPU."""

    name = "cuda"

    def __init__(self, fold: bool = True):
        """fold: run GD as one weighted sum (``schedule.folded_weights``, the cpu backend's
        fold) instead of stepping it; False: always step (the whole-run kernel's loop)."""
        self.fold = fold
        self._uploads = _Uploads()
        self._runners: dict = {}
        self._available: Optional[tuple] = None

    # -- availability ------------------------------------------------------------
    def available(self) -> tuple:
        if self._available is None:
            self._available = self._probe()
        return self._available

    def _probe(self) -> tuple:
        mod = _native.load("_C_cuda")
        if mod is None:
            return False, _native.why_missing("_C_cuda")
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device (torch.cuda.is_available() is False)"
        try:
            info = mod.device_info(torch.cuda.current_device())
        except RuntimeError as e:  # cudaSetDevice / cudaGetDeviceProperties failed in _C_cuda's runtime
            return False, f"_C_cuda.device_info failed: {e}"
        if not info["kernels_loadable"]:
            return False, info["load_error"]
        return True, ""

    def supports_device(self, device_type: str) -> bool:
        # Host tensors are streamed through the GPU (whole_run) or copied (step).
        return device_type in ("cuda", "cpu") and self.available()[0]

    # -- whole_run ---------------------------------------------------------------
    def whole_run(self, inputs, plan: StepPlan, pivot, adaptive_pivot: bool, out, threads: Optional[int] = None,
                  check_finite: bool = False) -> list:
        inputs = list(inputs)
        on_host = out.device.type == "cpu" or any(x.device.type == "cpu" for x in inputs)
        if on_host:
            return self.whole_run_chunked(inputs, plan, pivot, adaptive_pivot, out, check_finite=check_finite)
        return self._whole_run_device(inputs, plan, pivot, adaptive_pivot, out, check_finite=check_finite)

    def whole_run_chunked(self, inputs, plan: StepPlan, pivot, adaptive_pivot: bool, out,
                          chunk_elems: Optional[int] = None, device="cuda", check_finite: bool = False,
                          runner=None) -> list:
        """``whole_run`` on host tensors through the GPU, chunk by chunk (backends/triton/driver.py).

        The runner (pinned buffers, streams) is kept per (device, chunk_elems) and reused.
        """
        try:
            from .triton.driver import ChunkedRunner
        except ImportError as e:  # the driver itself needs only torch; this guards a broken install
            raise MergeError(f"cuda.whole_run: host tensors need the chunked driver ({e})") from e
        if runner is None:
            key = (str(device), chunk_elems)
            runner = self._runners.get(key)
            if runner is None:
                runner = self._runners[key] = ChunkedRunner(device, chunk_elems)
        return runner.run(self._whole_run_device, inputs, plan, pivot, adaptive_pivot, out,
                          check_finite=check_finite)

    def _whole_run_device(self, inputs, plan: StepPlan, pivot, adaptive_pivot: bool, out,
                          check_finite: bool = False) -> list:
        import torch

        fn = "cuda.whole_run"
        inputs = check_plan_inputs(fn, plan, inputs)
        if not isinstance(out, torch.Tensor) or out.device.type != "cuda":
            raise MergeError(f"{fn}: out must be a CUDA tensor")
        device, c = out.device, out.numel()
        out_name = check_flat(fn, "out", out, c, device)
        names = [check_flat(fn, f"inputs[{k}]", x, c, device) for k, x in enumerate(inputs)]

        pivot_mode, pivot_index, pivot_ptr, pivot_name = _pivot_args(fn, pivot, plan, c, device)
        if c == 0:
            return []

        ptrs = tuple(x.data_ptr() for x in inputs)
        table, codes = self._uploads.table(ptrs, tuple(_CODES[n] for n in names), device)
        batch_ptr, batch_idx, coeffs = self._uploads.plan(plan, device)
        folded = self._uploads.weights(plan, adaptive_pivot, pivot_mode, pivot_index, device) if self.fold else None
        flags = torch.zeros(plan.n, dtype=torch.int32, device=device) if check_finite else None
        _module().whole_run(
            inputs=list(ptrs), input_dtypes=names, c=c, input_table=table.data_ptr(), dtype_table=codes.data_ptr(),
            batch_ptr_dev=batch_ptr.data_ptr(), batch_idx_dev=batch_idx.data_ptr(), coeffs_dev=coeffs.data_ptr(),
            pivot_mode=pivot_mode, pivot_index=pivot_index, pivot=pivot_ptr, pivot_dtype=pivot_name,
            adaptive_pivot=bool(adaptive_pivot), out=out.data_ptr(), out_dtype=out_name,
            nonfinite=flags.data_ptr() if flags is not None else 0,
            device=device.index, stream=torch.cuda.current_stream(device).cuda_stream,
            linear=None if folded is None else folded[0], linear_dev=0 if folded is None else folded[1].data_ptr(),
            **plan_kwargs(plan),
        )
        if flags is None:
            return []
        return torch.nonzero(flags.cpu()).reshape(-1).tolist()

    # -- step --------------------------------------------------------------------
    def step(self, w, state, batch, pivot, coeffs, t: int, hyper: Hyper, threads: Optional[int] = None) -> None:
        import torch

        fn = "cuda.step"
        if not isinstance(w, torch.Tensor):
            raise MergeError(f"{fn}: w must be a tensor, got {type(w).__name__}")
        if w.device.type == "cpu":
            # Host state: run on the current GPU and copy w and state back in place.
            batch = list(batch)
            for arg, x in (("state", state), ("pivot", pivot), *((f"batch[{k}]", x) for k, x in enumerate(batch))):
                if not isinstance(x, torch.Tensor) and not (arg == "pivot" and x is None):
                    raise MergeError(f"{fn}: {arg} must be a tensor, got {type(x).__name__}")
            dev = torch.device("cuda", torch.cuda.current_device())
            w_d, state_d = w.to(dev), state.to(dev)
            batch_d = [x.to(dev) for x in batch]
            pivot_d = pivot.to(dev) if pivot is not None else None
            self._step_device(w_d, state_d, batch_d, pivot_d, coeffs, t, hyper)
            w.copy_(w_d)
            state.copy_(state_d)
            return
        self._step_device(w, state, batch, pivot, coeffs, t, hyper)

    def _step_device(self, w, state, batch, pivot, coeffs, t: int, hyper: Hyper) -> None:
        import torch

        fn = "cuda.step"
        if w.device.type != "cuda":
            raise MergeError(f"{fn}: w must be a CUDA (or host) tensor, got {w.device}")
        device, c = w.device, w.numel()
        if w.dtype != torch.float32:
            raise MergeError(f"{fn}: w must be float32, got {w.dtype}")
        check_flat(fn, "w", w, c, device)
        slots = hyper.state_slots
        if not isinstance(state, torch.Tensor) or state.dtype != torch.float32:
            raise MergeError(f"{fn}: state must be a float32 tensor [{slots}, {c}]")
        if slots > 0:
            if tuple(state.shape) != (slots, c) and state.numel() != slots * c:
                raise MergeError(f"{fn}: state must have shape [{slots}, {c}], got {tuple(state.shape)}")
            check_flat(fn, "state", state, slots * c, device)
        batch = list(batch)
        if not batch:
            raise MergeError(f"{fn}: batch must hold at least one tensor")
        names = [check_flat(fn, f"batch[{k}]", x, c, device) for k, x in enumerate(batch)]
        pivot_ptr = 0
        if pivot is not None:
            if check_flat(fn, "pivot", pivot, c, device) != "float32":
                raise MergeError(f"{fn}: pivot must be float32, got {pivot.dtype}")
            pivot_ptr = pivot.data_ptr()
        row = check_step_row(fn, coeffs, t)
        if c == 0:
            return
        ptrs = tuple(x.data_ptr() for x in batch)
        table, codes = self._uploads.table(ptrs, tuple(_CODES[n] for n in names), device)
        _module().step(
            w=w.data_ptr(), state=state.data_ptr() if slots > 0 else 0, c=c, batch=list(ptrs), batch_dtypes=names,
            batch_table=table.data_ptr(), dtype_table=codes.data_ptr(), pivot=pivot_ptr,
            coeffs=[float(v) for v in row], t=int(t),
            device=device.index, stream=torch.cuda.current_stream(device).cuda_stream,
            **hyper_kwargs(hyper),
        )


    # -- combine -----------------------------------------------------------------
    def combine(self, inputs, base, out, plan, offset: int = 0, probs=None, threads: Optional[int] = None) -> None:
        inputs, probs = list(inputs), None if probs is None else list(probs)
        n = len(inputs)
        self._chunk_pass(
            lambda r, w: self._combine_device(r[:n], r[n], w[0], plan, offset, None if probs is None else r[n + 1:]),
            inputs + [base] + (probs or []), [out])

    def transform(self, inputs, base, outs, plan, offset: int = 0, threads: Optional[int] = None) -> None:
        """The transform pass over one chunk (csrc/cuda/combine.cuh, kSplit: the combine kernel stopped
        before the mix; bitwise ``methods.transforms.transform_torch``): outs[i] (fp32) = b + ingredient
        i's kept, rescaled, weighted and (elect) agreeing entries. Host tensors as ``combine``'s.
        Returns None: the caller checks what was written."""
        inputs = list(inputs)
        n = len(inputs)
        self._chunk_pass(lambda r, w: self._combine_device(r[:n], r[n], None, plan, offset, None, outs=w),
                         inputs + [base], list(outs))
        return None

    @staticmethod
    def _chunk_pass(run, reads: list, writes: list) -> None:
        """``run(reads, writes)`` for one chunk: in place when every tensor is on a GPU, else (host or
        mixed tensors) on copies on the current GPU, the writes copied back. Non-tensors pass as they
        are (the checks name them)."""
        import torch

        tensors = [t for t in reads + writes if isinstance(t, torch.Tensor)]
        if all(t.device.type == "cuda" for t in tensors):
            run(reads, writes)
            return
        dev = torch.device("cuda", torch.cuda.current_device())
        writes_d = [w if isinstance(w, torch.Tensor) and w.device == dev
                    else torch.empty(w.shape, dtype=w.dtype, device=dev) for w in writes]
        run([t.to(dev) if isinstance(t, torch.Tensor) else t for t in reads], writes_d)
        for w, wd in zip(writes, writes_d):
            if wd is not w:
                w.copy_(wd)

    def _combine_device(self, inputs, base, out, plan, offset: int, probs, outs=None) -> None:
        import torch

        fn = "cuda.combine" if outs is None else "cuda.transform"
        if outs is not None:
            out = _split_outputs(fn, outs, plan)
        if not isinstance(out, torch.Tensor) or out.device.type != "cuda":
            raise MergeError(f"{fn}: out must be a CUDA tensor")
        device, c = out.device, out.numel()
        kw = _combine_kwargs(fn, inputs, base, out, plan, offset, probs, device, outs)
        if c == 0:
            return
        ptrs = tuple(kw["inputs"])
        table, codes = self._uploads.table(ptrs, tuple(_CODES[n] for n in kw["input_dtypes"]), device)
        fparams, iparams = self._uploads.combine_params(plan, device)
        probs_table = 0
        if any(kw["probs"]):
            probs_table = self._uploads.table(tuple(kw["probs"]), (0,) * len(kw["probs"]), device)[0].data_ptr()
        outs_table = self._uploads.table(tuple(kw["outs"]), (0,) * len(kw["outs"]), device)[0].data_ptr() \
            if kw["outs"] else 0
        _module().combine(
            input_table=table.data_ptr(), dtype_table=codes.data_ptr(), probs_table=probs_table,
            fparams_dev=fparams.data_ptr(), iparams_dev=iparams.data_ptr(), outs_table=outs_table,
            device=device.index, stream=torch.cuda.current_stream(device).cuda_stream, **kw)


def _split_outputs(fn: str, outs, plan):
    """The transform pass's outputs checked; returns the first (the binding's ``out``, which the split
    kernel does not write)."""
    return check_transform_outs(fn, outs, getattr(plan, "n", -1))[0]


def _combine_kwargs(fn: str, inputs, base, out, plan, offset: int, probs, device, outs=None) -> dict:
    """The binding's host-side keyword arguments of a combine call (tensors checked here)."""
    from ..methods.combine import CombinePlan

    if not isinstance(plan, CombinePlan):
        raise MergeError(f"{fn}: plan must be a CombinePlan, got {type(plan).__name__}")
    inputs = list(inputs)
    if len(inputs) != plan.n or plan.n < 1:
        raise MergeError(f"{fn}: inputs has {len(inputs)} tensors but the plan is for N={plan.n} (N >= 1)")
    c = out.numel()
    out_name = check_flat(fn, "out", out, c, device)
    names = [check_flat(fn, f"inputs[{k}]", x, c, device) for k, x in enumerate(inputs)]
    base_name = check_flat(fn, "base", base, c, device) if base is not None else "float32"
    if int(offset) < 0:
        raise MergeError(f"{fn}: offset must be >= 0, got {offset}")
    probs = check_probs(fn, probs, plan.n, c, device)
    probs_ptrs = [0 if p is None else p.data_ptr() for p in probs] if probs is not None else []
    outs_ptrs = []
    for k, o in enumerate(outs or []):
        check_flat(fn, f"outs[{k}]", o, c, device, dtypes=("float32",))
        outs_ptrs.append(o.data_ptr())
    return dict(inputs=[x.data_ptr() for x in inputs], input_dtypes=names, c=c,
                base=0 if base is None else base.data_ptr(), base_dtype=base_name, out=out.data_ptr(),
                out_dtype=out_name, probs=probs_ptrs, offset=int(offset), outs=outs_ptrs, **plan.kernel_kwargs())


def combine_emulated(inputs, base, out, plan, offset: int = 0, probs=None, vec: bool = True) -> None:
    """``CudaBackend.combine`` on HOST tensors through ``_C_cuda.combine_emulated``: the kernel's
    per-group code (csrc/cuda/combine.cuh) run on the CPU. For tests without a GPU.
    vec: take the 16-byte vector path where the addresses allow it."""
    import torch

    kw = _combine_kwargs("cuda.combine_emulated", inputs, base, out, plan, offset, probs, torch.device("cpu"))
    if out.numel() == 0:
        return
    _module().combine_emulated(vec=bool(vec), **kw)


def transform_emulated(inputs, base, outs, plan, offset: int = 0, vec: bool = True) -> None:
    """``CudaBackend.transform`` on HOST tensors through ``_C_cuda.combine_emulated(outs=...)``: the
    split kernel's per-group code run on the CPU. For tests without a GPU."""
    import torch

    fn = "cuda.transform_emulated"
    out = _split_outputs(fn, outs, plan)
    kw = _combine_kwargs(fn, inputs, base, out, plan, offset, None, torch.device("cpu"), outs)
    if out.numel() == 0:
        return
    _module().combine_emulated(vec=bool(vec), **kw)


def whole_run_emulated(inputs, plan: StepPlan, pivot, adaptive_pivot: bool, out, check_finite: bool = False,
                       fold: bool = True, vec: bool = True) -> list:
    """``CudaBackend.whole_run`` on HOST tensors through ``_C_cuda.whole_run_emulated``: the
    kernels' per-group code run on the CPU (csrc/cuda/emulate.cu), with the same pivot
    handling and GD fold as a device launch. For tests without a GPU; slow.
    vec: take the 16-byte vector path where the addresses allow it."""
    import torch

    fn = "cuda.whole_run_emulated"
    inputs = check_plan_inputs(fn, plan, inputs)
    device, c = torch.device("cpu"), out.numel()
    out_name = check_flat(fn, "out", out, c, device)
    names = [check_flat(fn, f"inputs[{k}]", x, c, device) for k, x in enumerate(inputs)]
    pivot_mode, pivot_index, pivot_ptr, pivot_name = _pivot_args(fn, pivot, plan, c, device)
    linear = folded_weights(plan, adaptive_pivot, pivot_mode, pivot_index) if fold else None
    return list(_module().whole_run_emulated(
        inputs=[x.data_ptr() for x in inputs], input_dtypes=names, c=c, pivot_mode=pivot_mode,
        pivot_index=pivot_index, pivot=pivot_ptr, pivot_dtype=pivot_name, adaptive_pivot=bool(adaptive_pivot),
        out=out.data_ptr(), out_dtype=out_name, check_finite=bool(check_finite), vec=bool(vec), linear=linear,
        **plan_kwargs(plan),
    ))


def device_info(device: int = 0) -> dict:
    """Facts about CUDA device ``device`` and the _C_cuda build (see ``_C_cuda.device_info``)."""
    return dict(_module().device_info(device))


__all__ = ["CudaBackend", "combine_emulated", "device_info", "transform_emulated", "whole_run_emulated"]
