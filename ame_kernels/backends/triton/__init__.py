"""Triton backend: fused whole-run and step kernels, and a chunked GPU driver.

Modules:
    rules.py      one ``@triton.jit`` helper per optimizer update (sgd, adagrad, adam/adamw, adadelta)
    whole_run.py  ``_whole_run_kernel``: the whole schedule per block, w and moments in registers;
                  ``_weighted_sum_kernel``: GD (sgd) folded into N+1 weights, each input read once
    step.py       ``_step_kernel``: one step with the state in fp32 buffers (stateful APIs)
    combine.py    ``_combine_kernel``: the combine pass of the non-AME merge methods
                  (``ame_kernels.methods.combine``), bitwise equal to ``combine_torch``
    driver.py     ``run_chunked``: models in host memory, streamed through the GPU in chunks
                  with pinned double buffers and three CUDA streams (generic over the kernel,
                  the CUDA C++ backend reuses it)

Where it runs: CUDA tensors. Under ``TRITON_INTERPRET=1`` (how CI tests it on CPU) it
also takes CPU tensors directly. Given CPU tensors on a machine with a GPU (and no
interpreter), ``whole_run`` streams them through the GPU with the chunked driver (one
``ChunkedRunner`` kept per device and chunk size, so its pinned buffers are reused) and
``step`` copies its buffers to the GPU and back; ``supports_device('cpu')`` says so.

The ``backend="auto"`` rule for CUDA tensors (``ame_kernels.backends._AUTO_ORDER``):
``cuda`` (the CUDA C++ backend) when its native module is built, else ``triton``, else
``reference``. Both kernels stream the same bytes and are meant to sit at the memory
roofline; the C++ one is preferred because it needs no JIT compilation or autotuning on
first use and works without a Triton install. The choice is to be revisited from
``benchmarks/bench_gpu.py``, which prints a ``triton`` and a ``cuda`` column from the same
run; until a GPU run shows triton faster, the order stays. (No GPU measurement has been
made for this rule yet.)

Neither triton nor the kernel modules are imported until first use: Triton reads
``TRITON_INTERPRET`` when it is imported and when a kernel is decorated, so importing
this package (the registry does, to ask ``available()``) must not fix that choice
before a test or user has set the environment.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

from ..base import Backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class TritonBackend(Backend):
    """Fused Triton kernels on CUDA tensors; host tensors through the GPU, or directly under TRITON_INTERPRET=1."""

    name = "triton"

    def __init__(self, fold: bool = True):
        """fold: run GD as one weighted sum (``schedule.folded_weights``, the cpu backend's
        fold) instead of stepping it; False: always step (the ``_whole_run_kernel`` loop)."""
        self.fold = fold
        self._runners = {}  # (device, chunk_elems) -> driver.ChunkedRunner

    def available(self) -> tuple:
        # find_spec, not import: importing triton here (the registry asks every backend at
        # startup) would fix its interpreter mode before a test could set TRITON_INTERPRET.
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install triton)"
        if _cuda_available() or _interpreting():
            return True, ""
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"

    def supports_device(self, device_type: str) -> bool:
        if device_type in ("cuda", "cpu"):
            return _cuda_available() or _interpreting()
        return False

    @staticmethod
    def _stream_host_tensors(tensors) -> bool:
        """Host tensors on a GPU machine (not interpreting) go through the GPU."""
        return not _interpreting() and _cuda_available() and any(
            t is not None and t.device.type == "cpu" for t in tensors)

    def whole_run(self, inputs, plan, pivot, adaptive_pivot, out, threads: Optional[int] = None,
                  check_finite: bool = False) -> list:
        inputs = list(inputs)
        if self._stream_host_tensors(inputs + [out]):
            return self.whole_run_chunked(inputs, plan, pivot, adaptive_pivot, out, check_finite=check_finite)
        from .whole_run import whole_run

        if _interpreting() and out.device.type != "cpu":
            # The interpreter reads the pointer table's raw addresses from host memory, so
            # device tensors are merged from host copies (interpreter mode only).
            host_out = out.cpu()
            piv = pivot.cpu() if hasattr(pivot, "cpu") else pivot
            bad = whole_run([x.cpu() for x in inputs], plan, piv, adaptive_pivot, host_out, check_finite=check_finite,
                            fold=self.fold)
            out.copy_(host_out)
            return bad
        return whole_run(inputs, plan, pivot, adaptive_pivot, out, check_finite=check_finite, fold=self.fold)

    def whole_run_chunked(self, inputs, plan, pivot, adaptive_pivot, out, chunk_elems: Optional[int] = None,
                          device="cuda", check_finite: bool = False, runner=None) -> list:
        """``whole_run`` on host tensors, streamed through ``device`` chunk by chunk (driver.py).

        The runner (pinned buffers, streams) is kept per (device, chunk_elems) and reused;
        pass ``runner`` to use another one (chunk_elems/device are then its own).
        """
        from .driver import ChunkedRunner

        if runner is None:
            key = (str(device), chunk_elems)
            runner = self._runners.get(key)
            if runner is None:
                runner = self._runners[key] = ChunkedRunner(device, chunk_elems)
        return runner.run(self.whole_run, inputs, plan, pivot, adaptive_pivot, out, check_finite=check_finite)

    def step(self, w, state, batch, pivot, coeffs, t, hyper, threads: Optional[int] = None) -> None:
        from .step import step

        batch = list(batch)
        if not self._stream_host_tensors([w, state, pivot] + batch) and not (_interpreting() and w.device.type != "cpu"):
            step(w, state, batch, pivot, coeffs, t, hyper)
            return
        import torch

        # Host tensors on a GPU machine run on the GPU; device tensors under the interpreter
        # run on host copies (its pointer table is read from host memory).
        dev = torch.device("cpu") if _interpreting() else torch.device("cuda", torch.cuda.current_device())
        w_d, state_d = w.to(dev), state.to(dev)
        step(w_d, state_d, [x.to(dev) for x in batch], None if pivot is None else pivot.to(dev), coeffs, t, hyper)
        w.copy_(w_d)
        state.copy_(state_d)

    def combine(self, inputs, base, out, plan, offset: int = 0, probs=None, threads: Optional[int] = None) -> None:
        """The combine pass over one chunk (``backends/triton/combine.py``); tensors as ``_chunk_pass``."""
        from .combine import combine

        inputs, probs = list(inputs), None if probs is None else list(probs)
        n = len(inputs)
        self._chunk_pass(lambda r, w: combine(r[:n], r[n], w[0], plan, offset, None if probs is None else r[n + 1:]),
                         inputs + [base] + (probs or []), [out])

    def transform(self, inputs, base, outs, plan, offset: int = 0, threads: Optional[int] = None) -> None:
        """The transform pass over one chunk (``backends/triton/combine.py``: the combine kernel
        stopped before the mix, bitwise ``methods.transforms.transform_torch``); tensors as
        ``_chunk_pass``. Returns None: the caller checks what was written."""
        from .combine import transform

        inputs = list(inputs)
        n = len(inputs)
        self._chunk_pass(lambda r, w: transform(r[:n], r[n], w, plan, offset), inputs + [base], list(outs))
        return None

    def _chunk_pass(self, run, reads: list, writes: list) -> None:
        """``run(reads, writes)`` for one chunk. CUDA tensors: in place, one launch. Host tensors on a
        GPU machine: on copies on the current GPU, the writes copied back (one chunk; the engine
        sizes chunks). Under the interpreter, device tensors run on host copies (the pointer
        tables are read from host memory). None entries of ``reads`` stay None."""
        tensors = reads + writes
        on_host = self._stream_host_tensors(tensors)
        if not on_host and not (_interpreting() and any(t is not None and t.device.type != "cpu" for t in tensors)):
            run(reads, writes)
            return
        import torch

        dev = torch.device("cpu") if _interpreting() else torch.device("cuda", torch.cuda.current_device())
        writes_d = [w if w.device == dev else torch.empty(w.shape, dtype=w.dtype, device=dev) for w in writes]
        run([None if t is None else t.to(dev) for t in reads], writes_d)
        for w, wd in zip(writes, writes_d):
            if wd is not w:
                w.copy_(wd)
