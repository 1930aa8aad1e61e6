"""Chunked driver: merge host-resident buffers through the GPU, chunk by chunk.

For models larger than GPU memory. The flat [C] buffers are cut into chunks of
``chunk_elems``; each chunk goes

    host slice --memcpy--> pinned staging --H2D (copy-in stream)--> device buffers
      --kernel_fn (compute stream)--> device out --D2H (copy-out stream)--> pinned out --memcpy--> out slice

with two slots of every buffer (double buffering): while the GPU computes chunk k,
chunk k+1 is copied in and chunk k-1 copied out, and the host stages chunk k+1 and
unpacks chunk k-1. Events order the slots: a slot's staging buffer is refilled only
after its previous H2D finished, its device inputs only after the compute that read
them, its device output only after the D2H that drained it. Inputs already in pinned
memory are copied to the device straight from their slice (no staging memcpy), and a
pinned ``out`` is filled by the D2H copies directly.

Generic over the kernel: ``kernel_fn`` has the ``Backend.whole_run`` signature
(inputs, plan, pivot, adaptive_pivot, out, check_finite=...) on device buffers, so
the CUDA C++ backend reuses this driver with its own kernel. When the inputs already
live on the GPU there is no staging at all: ``kernel_fn`` runs once on them.

With ``device='cpu'`` the same loop runs with plain buffers and no streams (copies
are synchronous); that is how CI checks the chunk bookkeeping without a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import numpy as np
import torch

from ...errors import MergeError

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: default upper bound on chunk_elems: 2 slots x N=8 bf16 inputs x 64M = 2 GiB pinned
DEFAULT_MAX_CHUNK = 1 << 26
_MIN_CHUNK = 1 << 16


def _stream_ctx(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _record(stream):
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _wait(stream, event) -> None:
    if stream is not None and event is not None:
        stream.wait_event(event)


def _host_wait(event) -> None:
    if event is not None:
        event.synchronize()


def device_budget(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device``: the driver's free memory plus the
    blocks torch's caching allocator holds unused, capped by
    ``torch.cuda.set_per_process_memory_fraction`` (which ``mem_get_info`` does not see)."""
    free, total = torch.cuda.mem_get_info(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    budget = free + max(0, reserved - allocated)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.6
    fraction = float(get_fraction(device)) if get_fraction is not None else 1.0
    if fraction < 1.0:
        budget = min(budget, int(total * fraction) - allocated)
    return max(0, int(budget))


def default_chunk_elems(bytes_per_elem: int, numel: int, device: torch.device) -> int:
    """Elements per chunk: both slots' device buffers within a quarter of what this process may
    still allocate on the device (``device_budget``), at most DEFAULT_MAX_CHUNK, never more than
    the buffer itself."""
    limit = DEFAULT_MAX_CHUNK
    if device.type == "cuda":
        limit = min(limit, max(_MIN_CHUNK, device_budget(device) // 4 // (2 * max(bytes_per_elem, 1))))
    return int(max(1, min(limit, numel)))


class _Slot:
    """One of the two buffer sets: pinned staging + device buffers for inputs, pivot, output."""

    def __init__(self, in_dtypes, pivot_dtype, out_dtype, chunk: int, device: torch.device, staged):
        pin = device.type == "cuda"

        def host(dtype):
            return torch.empty(chunk, dtype=dtype, pin_memory=pin)

        self.host_in = [host(d) if s else None for d, s in zip(in_dtypes, staged)]
        self.dev_in = [torch.empty(chunk, dtype=d, device=device) for d in in_dtypes]
        self.host_pivot = host(pivot_dtype) if pivot_dtype is not None else None
        self.dev_pivot = torch.empty(chunk, dtype=pivot_dtype, device=device) if pivot_dtype is not None else None
        self.dev_out = torch.empty(chunk, dtype=out_dtype, device=device)
        self.host_out = host(out_dtype)
        self.h2d_done = self.compute_done = self.d2h_done = None
        self.pending = None  # (lo, hi) of the chunk whose output waits in host_out


class ChunkedRunner:
    """Reusable staging buffers and streams for ``run``; one per device and chunk size.

    Buffers are allocated on the first ``run`` and kept while later runs have the same
    N, dtypes and a chunk that fits, so merging a state dict tensor by tensor (or a
    benchmark's repeats) pays for pinned allocation once. ``release()`` frees them.
    """

    def __init__(self, device="cuda", chunk_elems: Optional[int] = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cuda", "cpu"):
            raise MergeError(f"run_chunked: device must be 'cuda' (or 'cpu' to test the driver), got {device!r}")
        if chunk_elems is not None and int(chunk_elems) < 1:
            raise MergeError(f"run_chunked: chunk_elems must be >= 1, got {chunk_elems}")
        self.chunk_elems = None if chunk_elems is None else int(chunk_elems)
        self._slots = None
        self._key = None
        if self.device.type == "cuda":
            self._streams = tuple(torch.cuda.Stream(self.device) for _ in range(3))
        else:
            self._streams = (None, None, None)

    def release(self) -> None:
        self._slots = None
        self._key = None

    def _buffers(self, key, chunk, in_dtypes, pivot_dtype, out_dtype, staged):
        if self._key is None or self._key[0] != key or self._key[1] < chunk:
            self._slots = None  # free the old ones before allocating
            self._slots = [_Slot(in_dtypes, pivot_dtype, out_dtype, chunk, self.device, staged) for _ in range(2)]
            self._key = (key, chunk)
        return self._slots

    def run(self, kernel_fn: Callable, inputs, plan, pivot, adaptive_pivot: bool, out: torch.Tensor,
            check_finite: bool = False) -> list:
        """Merge ``inputs`` (N flat [C] tensors) into ``out`` [C] with ``kernel_fn`` on ``self.device``.

        pivot: None (soup), an input index, or a [C] tensor (host or device). Returns the
        sorted indices of inputs holding NaN/Inf when ``check_finite`` (else []).
        """
        fn = "run_chunked"
        inputs = list(inputs)
        if not callable(kernel_fn):
            raise MergeError(f"{fn}: kernel_fn must be callable, got {type(kernel_fn).__name__}")
        if len(inputs) != plan.n:
            raise MergeError(f"{fn}: inputs has {len(inputs)} tensors but the plan is for N={plan.n}")
        if not isinstance(out, torch.Tensor) or out.dtype not in _FLOAT_DTYPES or not out.is_contiguous():
            raise MergeError(f"{fn}: out must be a contiguous float32/bfloat16/float16 tensor")
        c = out.numel()
        for k, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
                raise MergeError(f"{fn}: inputs[{k}] must be a float32/bfloat16/float16 tensor")
            if x.numel() != c or not x.is_contiguous():
                raise MergeError(f"{fn}: inputs[{k}] must be contiguous with {c} elements (as out), got {x.numel()}")
        if len({x.device for x in inputs}) > 1:
            raise MergeError(f"{fn}: inputs are on several devices ({sorted({str(x.device) for x in inputs})})")
        pivot_t = None
        if isinstance(pivot, torch.Tensor):
            if pivot.numel() != c or not pivot.is_contiguous() or pivot.dtype not in _FLOAT_DTYPES:
                raise MergeError(f"{fn}: pivot must be a contiguous float tensor with {c} elements")
            pivot_t = pivot
        elif pivot is not None and not (isinstance(pivot, (int, np.integer)) and not isinstance(pivot, bool)):
            raise MergeError(f"{fn}: pivot must be None (soup), an input index or a tensor, got {type(pivot).__name__}")
        if c == 0:
            return []
        if self.device.type == "cuda" and inputs[0].device.type == "cuda":
            return self._run_resident(kernel_fn, inputs, plan, pivot, adaptive_pivot, out, check_finite)
        if inputs[0].device.type != "cpu":
            raise MergeError(f"{fn}: inputs must be host tensors or on {self.device}, got {inputs[0].device}")
        return self._run_staged(kernel_fn, inputs, plan, pivot, pivot_t, adaptive_pivot, out, check_finite)

    def _run_resident(self, kernel_fn, inputs, plan, pivot, adaptive_pivot, out, check_finite) -> list:
        """Inputs already on the GPU: one kernel call, no staging."""
        if isinstance(pivot, torch.Tensor):
            pivot = pivot.to(inputs[0].device)
        if out.device == inputs[0].device:
            return kernel_fn(inputs, plan, pivot, adaptive_pivot, out, check_finite=check_finite)
        dev_out = torch.empty(out.numel(), dtype=out.dtype, device=inputs[0].device)
        bad = kernel_fn(inputs, plan, pivot, adaptive_pivot, dev_out, check_finite=check_finite)
        out.copy_(dev_out)
        return bad

    def _run_staged(self, kernel_fn, inputs, plan, pivot, pivot_t, adaptive_pivot, out, check_finite) -> list:
        c, device = out.numel(), self.device
        in_dtypes = [x.dtype for x in inputs]
        # A pivot tensor already on the device is sliced in place; a host one is staged.
        pivot_on_dev = pivot_t is not None and pivot_t.device.type == device.type and device.type == "cuda"
        pivot_dtype = pivot_t.dtype if pivot_t is not None and not pivot_on_dev else None
        if pivot_on_dev:
            pivot_t = pivot_t.to(device)
        staged = [not (device.type == "cuda" and x.is_pinned()) for x in inputs]
        bytes_per_elem = sum(x.element_size() for x in inputs) + out.element_size()
        bytes_per_elem += pivot_t.element_size() if pivot_dtype is not None else 0
        chunk = self.chunk_elems or default_chunk_elems(bytes_per_elem, c, device)
        chunk = min(chunk, c)
        slots = self._buffers((tuple(in_dtypes), pivot_dtype, out.dtype, tuple(staged)), chunk,
                              in_dtypes, pivot_dtype, out.dtype, staged)
        copy_in, compute, copy_out = self._streams
        bad = torch.zeros(len(inputs), dtype=torch.bool, device=device) if check_finite else None
        # A pinned out is written by the D2H copy directly (no unpacking memcpy).
        direct_out = device.type == "cuda" and out.is_pinned()
        if device.type == "cuda":
            caller = torch.cuda.current_stream(device)
            for s in self._streams:
                s.wait_stream(caller)  # after whatever produced the pivot / zeroed `bad`

        def finish(slot) -> None:
            """Unpack a slot's finished chunk from pinned memory into ``out``."""
            if slot.pending is not None:
                lo, hi = slot.pending
                _host_wait(slot.d2h_done)
                out[lo:hi].copy_(slot.host_out[: hi - lo])
                slot.pending = None

        try:
            for k, lo in enumerate(range(0, c, chunk)):
                hi = min(c, lo + chunk)
                n = hi - lo
                slot = slots[k % 2]
                # 1. stage on the host: the slot's previous H2D must have drained its staging buffers
                _host_wait(slot.h2d_done)
                for x, h in zip(inputs, slot.host_in):
                    if h is not None:
                        h[:n].copy_(x[lo:hi])
                if pivot_dtype is not None:
                    slot.host_pivot[:n].copy_(pivot_t[lo:hi])
                # 2. H2D, once the compute that last read this slot's device inputs is done
                with _stream_ctx(copy_in):
                    _wait(copy_in, slot.compute_done)
                    for x, h, d in zip(inputs, slot.host_in, slot.dev_in):
                        d[:n].copy_(h[:n] if h is not None else x[lo:hi], non_blocking=True)
                    if pivot_dtype is not None:
                        slot.dev_pivot[:n].copy_(slot.host_pivot[:n], non_blocking=True)
                    slot.h2d_done = _record(copy_in)
                # 3. compute, once the inputs are in and the slot's last output was drained
                with _stream_ctx(compute):
                    _wait(compute, slot.h2d_done)
                    _wait(compute, slot.d2h_done)
                    if pivot_t is None:
                        piv = pivot
                    elif pivot_on_dev:
                        piv = pivot_t[lo:hi]
                    else:
                        piv = slot.dev_pivot[:n]
                    xs = [d[:n] for d in slot.dev_in]
                    # The kernel's own finite check would return a host list (a sync per chunk);
                    # a device-side flag keeps the pipeline asynchronous.
                    kernel_fn(xs, plan, piv, adaptive_pivot, slot.dev_out[:n], check_finite=False)
                    if check_finite:
                        bad |= torch.stack([~torch.isfinite(x).all() for x in xs])
                    slot.compute_done = _record(compute)
                # 4. D2H into the slot's pinned output (its previous chunk was unpacked in step 5)
                with _stream_ctx(copy_out):
                    _wait(copy_out, slot.compute_done)
                    (out[lo:hi] if direct_out else slot.host_out[:n]).copy_(slot.dev_out[:n], non_blocking=True)
                    slot.d2h_done = _record(copy_out)
                slot.pending = None if direct_out else (lo, hi)
                # 5. unpack the other slot's chunk (k-1) while the GPU works on chunk k
                finish(slots[(k + 1) % 2])
            for slot in slots:
                finish(slot)
        finally:
            # Also on an exception: copies and kernels still in flight use the slots' buffers,
            # which a later release() or re-keying would free under them.
            if device.type == "cuda":
                for s in self._streams:
                    s.synchronize()
            for slot in slots:  # a failed run's chunk must not be unpacked into the next run's out
                slot.pending = slot.h2d_done = slot.compute_done = slot.d2h_done = None
        if not check_finite:
            return []
        return torch.nonzero(bad.cpu()).reshape(-1).tolist()


def run_chunked(kernel_fn: Callable, inputs, plan, pivot, adaptive_pivot: bool, out: torch.Tensor,
                chunk_elems: Optional[int] = None, device="cuda", check_finite: bool = False) -> list:
    """One-shot ``ChunkedRunner(device, chunk_elems).run(...)``; see the module docstring."""
    return ChunkedRunner(device, chunk_elems).run(kernel_fn, inputs, plan, pivot, adaptive_pivot, out,
                                                  check_finite=check_finite)
