"""The ``cpu`` backend: fused C++ kernels (csrc/cpu) on CPU tensors, SIMD + threads.

``whole_run`` reads the N inputs straight from their own memory (bf16/fp16/fp32, mixed,
no upcast or stacking copy) and writes ``out`` once; ``step`` is one fused optimizer
step on fp32 buffers. Both follow the contract in ``base.py``.

``combine`` is the merge methods' elementwise pass (``ame_kernels.methods.combine``),
bitwise ``combine_torch``; ``magnitude_histogram``, ``gram`` and ``kept_l1`` are the
statistics primitives they stream first (``ame_kernels.methods.stats``): exact counts,
float64 sums in a fixed order (the same for every thread count and SIMD level).

``della_probs`` is DELLA's per-row magnitude-rank keep probabilities (a native radix
sort per row, bitwise ``methods.task_vectors.della_probs``).

``whole_run_buffers``, ``combine_buffers``, ``magnitude_histogram_buffers``,
``gram_buffers``, ``kept_l1_buffers`` and ``della_probs_buffers`` are the same kernels for the checkpoint engine,
on numpy arrays or any object with the buffer protocol (an ``mmap`` of a safetensors
file, a memoryview), without torch. ``info()`` reports the build and the SIMD levels.

Threads: the ``threads`` argument, else ``torch.get_num_threads()`` when torch is
imported, else ``os.cpu_count()``. SIMD level: the ``simd`` argument (``CpuBackend(simd=)``
or ``whole_run_buffers(simd=)``), else the environment variable ``AME_SIMD``
(``scalar`` / ``avx2`` / ``avx512``; for tests and benchmarks), else the best level this
CPU supports.

Arithmetic: unless exact (``default_exact``: by CPU, measured), the whole-run kernel takes the
adaptive optimizers' square roots and divisions from the CPU's estimates with Newton steps:
on AVX-512 ``vrsqrt14ps``/``vrcp14ps`` (about one ulp from the correctly rounded result), on
AVX2 ``vrsqrtps``/``vrcpps`` in the rules' register forms (about 2^-22 relative), all within
``tests/tolerances.py`` of the reference and within twice its error against a float64 oracle;
the levels' results then differ in the last bits (the scalar level and the step kernel at
every level run the exact instructions, which measured as fast there). ``exact=True``
(``CpuBackend(exact=True)``, ``whole_run_buffers(exact=True)``, or the environment variable
``AME_EXACT=1``) restores
the correctly rounded instructions everywhere, bit-identical across the SIMD levels.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from .. import _native
from ..errors import MergeError
from ..schedule import Hyper, StepPlan, folded_weights
from .base import FLOAT_DTYPE_NAMES, Backend, Pivot, check_plan_inputs, hyper_kwargs, plan_kwargs

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
_NUMPY_DTYPE_NAME = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
SIMD_LEVELS = ("auto", "scalar", "avx2", "avx512")


def _module():
    mod = _native.load("_C")
    if mod is None:
        raise MergeError(f"backend 'cpu': {_native.why_missing('_C')}")
    return mod


def default_threads(threads: Optional[int] = None) -> int:
    """``threads`` if given, else torch's thread count when torch is imported, else the core count."""
    if threads is not None:
        if isinstance(threads, bool) or int(threads) != threads or threads < 1:
            raise MergeError(f"cpu backend: threads must be an integer >= 1, got {threads!r}")
        return int(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, int(torch.get_num_threads()))
    return max(1, os.cpu_count() or 1)


def resolve_simd(simd: Optional[str] = None) -> str:
    """The SIMD level to run: ``simd`` unless None/'auto', else $AME_SIMD, else 'auto'."""
    level = simd if simd not in (None, "auto") else os.environ.get("AME_SIMD", "auto") or "auto"
    if level not in SIMD_LEVELS:
        raise MergeError(f"cpu backend: unknown SIMD level {level!r}; valid: {', '.join(SIMD_LEVELS)}")
    return level


def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, ...; '' where it cannot be read)."""
    global _VENDOR
    if _VENDOR is None:
        _VENDOR = ""
        try:
            with open("/proc/cpuinfo") as f:
                _VENDOR = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
        except OSError:
            pass
    return _VENDOR


_VENDOR: Optional[str] = None


def default_exact() -> bool:
    """The default when neither the caller nor $AME_EXACT decides: the estimates (exact False) on
    Intel, where zmm vsqrtps / vdivps cost 1.5-1.8x them, and on AMD CPUs without AVX-512 (Zen 1
    measured: the AVX2 register forms ran Adadelta 1.35x, Adam/AdamW 1.08x and Adagrad 1.00x the
    exact instructions' speed on whole runs; Zen 3 0.98-1.14x over 1 and 5 epochs; Zen 2
    unmeasured, it follows them); the exact instructions elsewhere: on the AVX-512 AMD EPYC (Zen 4) the estimates measured 0.83-0.87x
    the exact instructions' speed in cache (bench_whole_run.py --cycles; README, issue 18)."""
    vendor = cpu_vendor()
    if vendor == "GenuineIntel":
        return False
    return not (vendor == "AuthenticAMD" and "avx512" not in _supported_levels())


@functools.lru_cache(maxsize=None)
def _supported_levels() -> tuple:
    """The SIMD levels this CPU runs (empty without the native module); asked once, as the vendor."""
    return tuple(_native.build_info().get("simd_supported", []))


def default_block() -> int:
    """Elements per whole-run block (0: the kernel's L2-sized blocks, whole_run_block). 512 on
    Intel, where the adaptive optimizers' one-epoch runs took 15-20% less time with them than
    with the L2-sized 18K blocks (N = 8 bf16 x 32M, 2 threads; README, issue 18): the soup
    pass of a small block is a short burst the hardware prefetchers run through, and its
    slices are still in L1 when the steps read them. Elsewhere unmeasured, so unchanged."""
    return 512 if cpu_vendor() == "GenuineIntel" else 0


def resolve_exact(exact: Optional[bool] = None) -> bool:
    """Whether to run the exact instructions: ``exact`` unless None, else $AME_EXACT
    ('1'/'true'/'yes' on, '0'/'false'/'no'/'off' off), else ``default_exact()`` (by CPU vendor)."""
    if exact is not None:
        return bool(exact)
    env = os.environ.get("AME_EXACT", "").strip().lower()
    if env == "":
        return default_exact()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    raise MergeError(f"cpu backend: AME_EXACT={os.environ.get('AME_EXACT')!r} is not a boolean; use 1 or 0")


def info() -> dict:
    """Build and CPU information: compiler, SIMD levels compiled/supported, the level 'auto' picks."""
    mod = _native.load("_C")
    if mod is None:
        return {"available": False, "reason": _native.why_missing("_C")}
    d = dict(mod.build_info())
    d["available"] = hasattr(mod, "whole_run")
    d["simd_auto"] = d.get("simd_best")
    d["simd_env"] = os.environ.get("AME_SIMD")
    d["exact_env"] = os.environ.get("AME_EXACT")
    d["cpu_vendor"] = cpu_vendor()
    try:
        d["exact_default"] = resolve_exact(None)
    except MergeError:
        d["exact_default"] = None
    d["threads_default"] = default_threads()
    d["block_default"] = default_block()
    return d


def _linear(plan: StepPlan, adaptive: bool, mode: str, index: int, fold: bool):
    """The kernel's ``linear`` argument: GD folded into N+1 float32 weights
    (``schedule.folded_weights``, shared with the GPU backends), or None to step."""
    return folded_weights(plan, adaptive, mode, index) if fold else None


def _check_count(fn: str, n_inputs: int, plan: StepPlan) -> None:
    if not n_inputs:
        raise MergeError(f"[{fn}] inputs: need at least 1 ingredient")
    if n_inputs != plan.n:
        raise MergeError(f"[{fn}] inputs: the plan is for {plan.n} ingredients, got {n_inputs}")


def _pivot_index(fn: str, pivot: Any, n: int) -> Optional[int]:
    """The pivot as a checked ingredient index, or None (a soup, or a buffer the caller reads)."""
    if isinstance(pivot, (int, np.integer)) and not isinstance(pivot, bool):
        if not 0 <= int(pivot) < n:
            raise MergeError(f"[{fn}] pivot: index {pivot} is not in [0, {n})")
        return int(pivot)
    return None


def _launch(plan: StepPlan, ptrs: list, dtypes: list, numel: int, out_ptr: int, out_dtype: str, pivot: Any,
            adaptive: bool, threads: Optional[int], simd: Optional[str], check_finite: bool, fold: bool,
            exact: Optional[bool] = None) -> list:
    """The native whole_run on checked pointers; pivot: None (soup), an index, or (pointer, dtype)."""
    mode, index, pptr, pdtype = "soup", 0, 0, "float32"
    if isinstance(pivot, int):
        mode, index = "index", pivot
    elif pivot is not None:
        mode, (pptr, pdtype) = "pointer", pivot
    return list(
        _module().whole_run(
            inputs=ptrs, input_dtypes=dtypes, numel=numel, out=out_ptr, out_dtype=out_dtype,
            pivot_mode=mode, pivot_index=index, pivot=pptr, pivot_dtype=pdtype, adaptive=bool(adaptive),
            threads=default_threads(threads), simd=resolve_simd(simd), check_finite=bool(check_finite),
            block=default_block(), linear=_linear(plan, adaptive, mode, index, fold), exact=resolve_exact(exact),
            **plan_kwargs(plan),
        )
    )


def _torch_dtype_name(t: Any, fn: str, what: str) -> str:
    name = str(t.dtype).replace("torch.", "")
    if name not in FLOAT_DTYPE_NAMES:
        raise MergeError(f"[{fn}] {what}: dtype {t.dtype} is not supported; use float32, bfloat16 or float16")
    return name


def _check_tensor(t: Any, numel: int, fn: str, what: str) -> str:
    """Checks a CPU tensor argument; returns its dtype name."""
    if not hasattr(t, "data_ptr"):
        raise MergeError(f"[{fn}] {what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise MergeError(f"[{fn}] {what}: the cpu backend takes CPU tensors, got one on {t.device}")
    if not t.is_contiguous():
        raise MergeError(f"[{fn}] {what}: must be contiguous")
    if t.numel() != numel:
        raise MergeError(f"[{fn}] {what}: expected {numel} elements, got {t.numel()}")
    return _torch_dtype_name(t, fn, what)


# ---------------------------------------------------------------------------- combine helpers


def _native_call(fn: str, f, **kwargs):
    """A native entry point; its argument errors (ValueError "[native name] arg: ...") as MergeError
    naming the wrapper ``fn``."""
    try:
        return f(**kwargs)
    except MergeError:
        raise
    except ValueError as e:
        msg = str(e)
        if msg.startswith("[") and "]" in msg:
            msg = f"[{fn}]" + msg[msg.index("]") + 1:]
        raise MergeError(msg) from None


def _check_combine_plan(fn: str, plan: Any, inputs: Any):
    from ..methods.combine import CombinePlan

    if not isinstance(plan, CombinePlan):
        raise MergeError(f"[{fn}] plan: expected a CombinePlan, got {type(plan).__name__}")
    n = len(list(inputs))
    if not n:
        raise MergeError(f"[{fn}] inputs: need at least 1 ingredient")
    if n != plan.n:
        raise MergeError(f"[{fn}] inputs: the plan is for {plan.n} ingredients, got {n}")
    return plan


def _check_offset(fn: str, offset: Any) -> int:
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise MergeError(f"[{fn}] offset: must be an integer >= 0 (the chunk's first global index), got {offset!r}")
    return int(offset)


def _hist_kwargs(fn: str, prefix_mask: Any, prefix: Any, shift: Any, nbins: Any) -> dict:
    vals = dict(prefix_mask=prefix_mask, prefix=prefix, shift=shift, nbins=nbins)
    for k, v in vals.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise MergeError(f"[{fn}] {k}: must be an integer, got {v!r}")
    return {k: int(v) for k, v in vals.items()}


def _bracket_kwargs(fn: str, which: Any, lo: Any, hi: Any, cap: Any, shift: Any = None) -> dict:
    vals = dict(which=list(which), lo=list(lo), hi=list(hi), shift=list(shift) if shift is not None else [])
    for k, v in vals.items():
        if any(isinstance(e, bool) or not isinstance(e, (int, np.integer)) for e in v):
            raise MergeError(f"[{fn}] {k}: must be integers, got {v!r}")
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)):
        raise MergeError(f"[{fn}] cap: must be an integer, got {cap!r}")
    return dict({k: [int(e) for e in v] for k, v in vals.items()}, cap=int(cap))


def _torch_sources(fn: str, inputs: Any, base: Any, numel: int):
    """Checked CPU tensors: (input pointers, dtype names, base pointer or 0, base dtype name)."""
    inputs = list(inputs)
    if not inputs:
        raise MergeError(f"[{fn}] inputs: need at least 1 ingredient")
    dtypes = [_check_tensor(x, numel, fn, f"inputs[{i}]") for i, x in enumerate(inputs)]
    bptr, bdtype = 0, "float32"
    if base is not None:
        bdtype = _check_tensor(base, numel, fn, "base")
        bptr = base.data_ptr()
    return [x.data_ptr() for x in inputs], dtypes, bptr, bdtype


def _probs_pointers(fn: str, probs: Any, n: int, pointer) -> list:
    """[] (no per-element probabilities) or N pointers (0 for a None entry); ``pointer(i, p)`` checks
    entry i and returns its address."""
    if probs is None:
        return []
    probs = list(probs)
    if len(probs) != n:
        raise MergeError(f"[{fn}] probs: expected None or {n} entries (one per ingredient), got {len(probs)}")
    return [0 if p is None else pointer(i, p) for i, p in enumerate(probs)]


def _torch_probs(fn: str, probs: Any, n: int, numel: int) -> list:
    """``_probs_pointers`` of float32 CPU tensors of numel elements."""
    def pointer(i, p):
        if _check_tensor(p, numel, fn, f"probs[{i}]") != "float32":
            raise MergeError(f"[{fn}] probs[{i}]: must be float32, got {p.dtype}")
        return p.data_ptr()

    return _probs_pointers(fn, probs, n, pointer)


class CpuBackend(Backend):
    """Fused C++ kernels on CPU tensors; ``simd`` forces a level (None: $AME_SIMD or the best)."""

    name = "cpu"

    def __init__(self, simd: Optional[str] = None, fold: bool = True, exact: Optional[bool] = None):
        """simd: force a level (None: $AME_SIMD or the best); fold: run GD as one weighted
        sum (schedule.linear_coefficients) instead of stepping it (False: step, bit for bit
        what the step kernel gives); exact: correctly rounded sqrt/div, bit-identical across
        SIMD levels (None: $AME_EXACT, else the faster refined estimates)."""
        self.simd = simd
        self.fold = fold
        self.exact = exact

    def available(self) -> tuple:
        mod = _native.load("_C")
        if mod is None:
            return False, _native.why_missing("_C")
        if not hasattr(mod, "whole_run"):
            return False, "ame_kernels._C was built without the CPU kernels; rebuild with `make build`"
        return True, ""

    def supports_device(self, device_type: str) -> bool:
        return device_type == "cpu"

    def whole_run(
        self,
        inputs: Sequence[Any],
        plan: StepPlan,
        pivot: Pivot,
        adaptive_pivot: bool,
        out: Any,
        threads: Optional[int] = None,
        check_finite: bool = False,
    ) -> list:
        fn = "whole_run"
        inputs = check_plan_inputs(f"[{fn}]", plan, inputs)
        _check_count(fn, len(inputs), plan)
        numel = out.numel() if hasattr(out, "numel") else -1
        out_dtype = _check_tensor(out, numel, fn, "out")
        if hasattr(inputs[0], "numel") and inputs[0].numel() != numel:
            raise MergeError(f"[{fn}] out: has {numel} elements but inputs[0] has {inputs[0].numel()} (they must match)")
        dtypes = [_check_tensor(x, numel, fn, f"inputs[{i}]") for i, x in enumerate(inputs)]
        piv = _pivot_index(fn, pivot, len(inputs))
        if piv is None and pivot is not None:
            piv = (pivot.data_ptr(), _check_tensor(pivot, numel, fn, "pivot"))
        return _launch(plan, [x.data_ptr() for x in inputs], dtypes, numel, out.data_ptr(), out_dtype, piv,
                       adaptive_pivot, threads, self.simd, check_finite, self.fold, self.exact)

    def step(
        self,
        w: Any,
        state: Any,
        batch: Sequence[Any],
        pivot: Optional[Any],
        coeffs: np.ndarray,
        t: int,
        hyper: Hyper,
        threads: Optional[int] = None,
    ) -> None:
        fn = "step"
        # The native module checks these too, but raises a plain ValueError; a MergeError here, in its words.
        row = np.asarray(coeffs, dtype=np.float64).reshape(-1)
        if row.shape != (4,):
            raise MergeError(f"[{fn}] coeffs: expected 4 values (gscale, lr_eff, decay, inv_bc2_sqrt), got shape {np.shape(coeffs)}")
        if int(t) < 1:
            raise MergeError(f"[{fn}] t: steps count from 1, got {t}")
        numel = w.numel() if hasattr(w, "numel") else -1
        if _check_tensor(w, numel, fn, "w") != "float32":
            raise MergeError(f"[{fn}] w: must be float32, got {w.dtype}")
        slots = hyper.state_slots
        if slots:
            if _check_tensor(state, slots * numel, fn, "state") != "float32":
                raise MergeError(f"[{fn}] state: must be float32, got {state.dtype}")
            if state.dim() != 2 or state.shape[0] != slots:
                raise MergeError(f"[{fn}] state: expected shape [{slots}, {numel}], got {tuple(state.shape)}")
        batch = list(batch)
        if not batch:
            raise MergeError(f"[{fn}] batch: need at least 1 input")
        dtypes = [_check_tensor(x, numel, fn, f"batch[{i}]") for i, x in enumerate(batch)]
        pptr = 0
        if pivot is not None:
            if _check_tensor(pivot, numel, fn, "pivot") != "float32":
                raise MergeError(f"[{fn}] pivot: must be float32, got {pivot.dtype}")
            pptr = pivot.data_ptr()
        _module().step(
            w=w.data_ptr(),
            state=state.data_ptr() if slots else 0,
            slots=slots,
            numel=numel,
            batch=[x.data_ptr() for x in batch],
            batch_dtypes=dtypes,
            pivot=pptr,
            coeffs=np.ascontiguousarray(row, dtype=np.float32),
            t=int(t),
            threads=default_threads(threads),
            simd=resolve_simd(self.simd),
            exact=resolve_exact(self.exact),
            **hyper_kwargs(hyper),
        )

    # ------------------------------------------------------------------ merge methods

    def combine(self, inputs, base, out, plan, offset: int = 0, probs=None, threads: Optional[int] = None) -> int:
        """The combine pass over one chunk (``ame_kernels.methods.combine``), bitwise ``combine_torch``."""
        fn = "combine"
        plan = _check_combine_plan(fn, plan, inputs)
        numel = out.numel() if hasattr(out, "numel") else -1
        out_dtype = _check_tensor(out, numel, fn, "out")
        ptrs, dtypes, bptr, bdtype = _torch_sources(fn, inputs, base, numel)
        return _native_call(
            fn, _module().combine, inputs=ptrs, input_dtypes=dtypes, base=bptr, base_dtype=bdtype, out=out.data_ptr(),
            out_dtype=out_dtype, numel=numel, offset=_check_offset(fn, offset),
            probs=_torch_probs(fn, probs, plan.n, numel), threads=default_threads(threads), masks_in=[],
            simd=resolve_simd(self.simd), **plan.kernel_kwargs(),
        )

    def transform(self, inputs, base, outs, plan, offset: int = 0, threads: Optional[int] = None) -> int:
        """The transform pass over one chunk (``methods.transforms``): outs[i] (float32) the sparsified
        ingredient i, bitwise ``transform_torch``; returns the count of Inf/NaN written."""
        fn = "transform"
        plan = _check_combine_plan(fn, plan, inputs)
        inputs = list(inputs)
        numel = inputs[0].numel() if inputs and hasattr(inputs[0], "numel") else -1
        ptrs, dtypes, bptr, bdtype = _torch_sources(fn, inputs, base, numel)
        outs = list(outs)
        if len(outs) != plan.n:
            raise MergeError(f"[{fn}] outs: expected one float32 tensor per ingredient ({plan.n}), got {len(outs)}")
        for i, o in enumerate(outs):
            if _check_tensor(o, numel, fn, f"outs[{i}]") != "float32":
                raise MergeError(f"[{fn}] outs[{i}]: must be float32, got {o.dtype}")
        return _native_call(
            fn, _module().transform, inputs=ptrs, input_dtypes=dtypes, base=bptr, base_dtype=bdtype,
            outs=[o.data_ptr() for o in outs], numel=numel, offset=_check_offset(fn, offset), probs=[],
            threads=default_threads(threads), masks_in=[], simd=resolve_simd(self.simd), **plan.kernel_kwargs(),
        )

    def magnitude_histogram(self, x, base, prefix_mask: int, prefix: int, shift: int, nbins: int,
                            threads: Optional[int] = None) -> np.ndarray:
        """int64[nbins] counts of the fp32 bits of |x - b| (``methods.stats``), exact."""
        fn = "magnitude_histogram"
        numel = x.numel() if hasattr(x, "numel") else -1
        xdtype = _check_tensor(x, numel, fn, "x")
        bptr, bdtype = (0, "float32") if base is None else (base.data_ptr(), _check_tensor(base, numel, fn, "base"))
        return _native_call(
            fn, _module().magnitude_histogram, x=x.data_ptr(), x_dtype=xdtype, base=bptr, base_dtype=bdtype, numel=numel,
            **_hist_kwargs(fn, prefix_mask, prefix, shift, nbins), threads=default_threads(threads),
            simd=resolve_simd(self.simd),
        )

    def magnitude_bracket(self, inputs, base, which, lo, hi, cap: int, shift=None, threads: Optional[int] = None):
        """Per target, counts above / inside / non-finite and the entries inside a bracket of |x - b|'s
        fp32 bits (``methods.stats.magnitude_bracket_torch``), in one native pass."""
        fn = "magnitude_bracket"
        inputs = list(inputs)
        numel = inputs[0].numel() if inputs and hasattr(inputs[0], "numel") else -1
        ptrs, dtypes, bptr, bdtype = _torch_sources(fn, inputs, base, numel)
        return _native_call(fn, _module().magnitude_bracket, inputs=ptrs, input_dtypes=dtypes, base=bptr,
                            base_dtype=bdtype, numel=numel, **_bracket_kwargs(fn, which, lo, hi, cap, shift),
                            threads=default_threads(threads), simd=resolve_simd(self.simd))

    def gram(self, inputs, base, threads: Optional[int] = None) -> np.ndarray:
        """float64[N, N] of sum_j tau_i[j] tau_k[j], tau = x - b (fp32), products and sums in float64."""
        fn = "gram"
        inputs = list(inputs)
        numel = inputs[0].numel() if inputs and hasattr(inputs[0], "numel") else -1
        ptrs, dtypes, bptr, bdtype = _torch_sources(fn, inputs, base, numel)
        return _native_call(fn, _module().gram, inputs=ptrs, input_dtypes=dtypes, base=bptr, base_dtype=bdtype,
                            numel=numel, threads=default_threads(threads), simd=resolve_simd(self.simd))

    def kept_l1(self, inputs, base, plan, offset: int = 0, probs=None, threads: Optional[int] = None) -> np.ndarray:
        """float64[N, 2]: (sum |tau_i|, sum over kept entries |tau_i|) under ``plan``'s masks."""
        fn = "kept_l1"
        plan = _check_combine_plan(fn, plan, inputs)
        inputs = list(inputs)
        numel = inputs[0].numel() if hasattr(inputs[0], "numel") else -1
        ptrs, dtypes, bptr, bdtype = _torch_sources(fn, inputs, base, numel)
        return _native_call(
            fn, _module().kept_l1, inputs=ptrs, input_dtypes=dtypes, base=bptr, base_dtype=bdtype, numel=numel,
            offset=_check_offset(fn, offset), probs=_torch_probs(fn, probs, plan.n, numel),
            threads=default_threads(threads), masks_out=[], simd=resolve_simd(self.simd), **plan.kernel_kwargs(),
        )


    def della_probs(self, x, base, shape: tuple, density: float, epsilon: float, threads: Optional[int] = None):
        """float32 [C]: DELLA's keep probabilities of a chunk of whole rows (the native rank
        kernel, csrc/cpu/rank.h), bitwise ``methods.task_vectors.della_probs``."""
        import torch

        fn = "della_probs"
        numel = x.numel() if hasattr(x, "numel") else -1
        xdtype = _check_tensor(x, numel, fn, "x")
        bptr, bdtype = (0, "float32") if base is None else (base.data_ptr(), _check_tensor(base, numel, fn, "base"))
        p = _della_call(fn, x.data_ptr(), xdtype, bptr, bdtype, numel, shape, density, epsilon, threads)
        return torch.from_numpy(p)


def _della_call(fn: str, xptr: int, xdtype: str, bptr: int, bdtype: str, numel: int, shape: tuple, density: float,
                epsilon: float, threads: Optional[int], out: Optional[np.ndarray] = None) -> np.ndarray:
    from ..methods.task_vectors import della_kernel_args

    _check_out(fn, out, np.float32, numel)
    got = _native_call(fn, _module().della_probs, x=xptr, x_dtype=xdtype, base=bptr, base_dtype=bdtype, numel=numel,
                       **della_kernel_args(tuple(shape), numel, density, epsilon), threads=default_threads(threads),
                       out=0 if out is None or not numel else out.ctypes.data)
    return out if out is not None else got


# ---------------------------------------------------------------------------- buffers


def _as_array(buf: Any, fn: str, what: str, writable: bool = False) -> np.ndarray:
    """A zero-copy uint8/typed view of ``buf`` (ndarray or buffer protocol), C-contiguous."""
    if isinstance(buf, np.ndarray):
        a = buf
    else:
        try:
            a = np.frombuffer(buf, dtype=np.uint8)
        except (TypeError, ValueError) as e:
            raise MergeError(f"[{fn}] {what}: expected a numpy array or a buffer, got {type(buf).__name__} ({e})") from None
    if not a.flags.c_contiguous:
        raise MergeError(f"[{fn}] {what}: must be C-contiguous")
    if writable and not a.flags.writeable:
        raise MergeError(f"[{fn}] {what}: must be writable")
    return a


def _dtype_name(name: Any, fn: str, what: str) -> str:
    n = str(name).replace("torch.", "")
    n = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(n, n)
    if n not in _ITEMSIZE:
        raise MergeError(f"[{fn}] {what}: unsupported dtype {name!r}; valid: float32, bfloat16, float16")
    return n


def _check_buffer(a: np.ndarray, dtype: str, numel: int, fn: str, what: str) -> None:
    if a.dtype != np.uint8 and a.dtype.itemsize != _ITEMSIZE[dtype]:
        raise MergeError(f"[{fn}] {what}: array of {a.dtype} does not hold {dtype} (itemsize {_ITEMSIZE[dtype]})")
    if a.nbytes != numel * _ITEMSIZE[dtype]:
        raise MergeError(f"[{fn}] {what}: expected {numel} {dtype} elements ({numel * _ITEMSIZE[dtype]} bytes), got {a.nbytes} bytes")


def whole_run_buffers(
    inputs: Sequence[Any],
    input_dtypes: Sequence[str],
    plan: StepPlan,
    pivot: Any,
    adaptive_pivot: bool,
    out: Any,
    out_dtype: str,
    threads: Optional[int] = None,
    check_finite: bool = False,
    simd: str = "auto",
    fold: bool = True,
    exact: Optional[bool] = None,
) -> list:
    """The whole-run kernel on raw buffers, without torch (for the checkpoint engine).

    inputs: N numpy arrays or buffer-protocol objects (e.g. slices of an ``mmap``) of one
        element count C; ``input_dtypes`` names each one's dtype (bf16 arrives as uint16/int16
        or raw bytes with "bfloat16"). Read only; nothing is copied.
    pivot: None (soup), an ingredient index, a float32/float16 numpy array of C elements,
        or a ``(buffer, dtype_name)`` pair.
    out: writable, C elements of ``out_dtype``. Returns the sorted indices of inputs in
        which a NaN/Inf was read (always [] unless ``check_finite``).
    """
    fn = "whole_run_buffers"
    out_dtype = _dtype_name(out_dtype, fn, "out_dtype")
    o = _as_array(out, fn, "out", writable=True)
    numel = o.nbytes // _ITEMSIZE[out_dtype]
    _check_buffer(o, out_dtype, numel, fn, "out")
    inputs, input_dtypes = list(inputs), list(input_dtypes)
    _check_count(fn, len(inputs), plan)
    if len(input_dtypes) != len(inputs):
        raise MergeError(f"[{fn}] input_dtypes: expected {len(inputs)} dtypes (one per input), got {len(input_dtypes)}")
    arrays, dtypes = [], []
    for i, (x, d) in enumerate(zip(inputs, input_dtypes)):
        d = _dtype_name(d, fn, f"input_dtypes[{i}]")
        a = _as_array(x, fn, f"inputs[{i}]")
        _check_buffer(a, d, numel, fn, f"inputs[{i}]")
        arrays.append(a)
        dtypes.append(d)
    piv, keep = _pivot_index(fn, pivot, len(inputs)), None
    if piv is None and pivot is not None:
        if isinstance(pivot, tuple) and len(pivot) == 2:
            buf, pdtype = pivot
            pdtype = _dtype_name(pdtype, fn, "pivot dtype")
        elif isinstance(pivot, np.ndarray) and pivot.dtype in _NUMPY_DTYPE_NAME:
            buf, pdtype = pivot, _NUMPY_DTYPE_NAME[pivot.dtype]
        else:
            raise MergeError(
                f"[{fn}] pivot: expected None, an index, a float32/float16 array or (buffer, dtype), got {type(pivot).__name__}"
            )
        keep = _as_array(buf, fn, "pivot")  # held until the kernel returns
        _check_buffer(keep, pdtype, numel, fn, "pivot")
        piv = (keep.ctypes.data, pdtype)
    return _launch(plan, [a.ctypes.data for a in arrays], dtypes, numel, o.ctypes.data, out_dtype, piv,
                   adaptive_pivot, threads, simd, check_finite, fold, exact)


def _buffer_sources(fn: str, inputs: Any, input_dtypes: Any, base: Any, base_dtype: Any, numel: Optional[int] = None):
    """Checked buffers: (arrays held alive, pointers, dtype names, base pointer or 0, base dtype, numel).
    numel None: taken from inputs[0]."""
    inputs = list(inputs)
    if isinstance(input_dtypes, str):
        raise MergeError(f"[{fn}] input_dtypes: expected one dtype name per input, got the string {input_dtypes!r}")
    input_dtypes = list(input_dtypes)
    if not inputs:
        raise MergeError(f"[{fn}] inputs: need at least 1 ingredient")
    if len(input_dtypes) != len(inputs):
        raise MergeError(f"[{fn}] input_dtypes: expected {len(inputs)} dtypes (one per input), got {len(input_dtypes)}")
    arrays, dtypes = [], []
    for i, (x, d) in enumerate(zip(inputs, input_dtypes)):
        d = _dtype_name(d, fn, f"input_dtypes[{i}]")
        a = _as_array(x, fn, f"inputs[{i}]")
        if numel is None:
            numel = a.nbytes // _ITEMSIZE[d]
        _check_buffer(a, d, numel, fn, f"inputs[{i}]")
        arrays.append(a)
        dtypes.append(d)
    bptr, bdtype = 0, "float32"
    if base is not None:
        bdtype = _dtype_name(base_dtype, fn, "base_dtype")
        b = _as_array(base, fn, "base")
        _check_buffer(b, bdtype, numel, fn, "base")
        arrays.append(b)
        bptr = b.ctypes.data
    return arrays, [a.ctypes.data for a in arrays[: len(dtypes)]], dtypes, bptr, bdtype, numel


def _buffer_probs(fn: str, probs: Any, n: int, numel: int, hold: list) -> list:
    """``_probs_pointers`` of float32 buffers of numel elements; the arrays go to ``hold``."""
    def pointer(i, p):
        a = _as_array(p, fn, f"probs[{i}]")
        if a.dtype != np.uint8 and a.dtype != np.float32:
            raise MergeError(f"[{fn}] probs[{i}]: must hold float32, got an array of {a.dtype}")
        _check_buffer(a, "float32", numel, fn, f"probs[{i}]")
        hold.append(a)
        return a.ctypes.data

    return _probs_pointers(fn, probs, n, pointer)


def combine_buffers(
    inputs: Sequence[Any],
    input_dtypes: Sequence[str],
    base: Any,
    base_dtype: Optional[str],
    out: Any,
    out_dtype: str,
    plan: Any,
    offset: int = 0,
    probs: Optional[Sequence[Any]] = None,
    threads: Optional[int] = None,
    simd: str = "auto",
    masks: Optional[Sequence[Any]] = None,
) -> int:
    """The combine pass on raw buffers, without torch (the checkpoint engine): bitwise ``combine_torch``.

    inputs: N numpy arrays / buffer-protocol objects of C elements, ``input_dtypes`` their dtype names
    (bf16 as uint16 or raw bytes with "bfloat16"); base: None (zero) or such a buffer of ``base_dtype``;
    out: writable, C elements of ``out_dtype``; plan: a ``CombinePlan`` for N ingredients; offset: the
    chunk's first global element index; probs: None or N float32 buffers (or None entries); masks:
    None or N uint8 arrays (or None entries) of ceil(C / 8) bytes holding ``kept_l1_buffers``' keep
    masks of this very chunk and plan, read in place of the windows and draws (the same bits).
    Returns the count of Inf/NaN written to out (in out's dtype).
    """
    fn = "combine_buffers"
    plan = _check_combine_plan(fn, plan, inputs)
    out_dtype = _dtype_name(out_dtype, fn, "out_dtype")
    o = _as_array(out, fn, "out", writable=True)
    numel = o.nbytes // _ITEMSIZE[out_dtype]
    _check_buffer(o, out_dtype, numel, fn, "out")
    hold, ptrs, dtypes, bptr, bdtype, numel = _buffer_sources(fn, inputs, input_dtypes, base, base_dtype, numel)
    return _native_call(
        fn, _module().combine, inputs=ptrs, input_dtypes=dtypes, base=bptr, base_dtype=bdtype, out=o.ctypes.data,
        out_dtype=out_dtype, numel=numel, offset=_check_offset(fn, offset),
        probs=_buffer_probs(fn, probs, plan.n, numel, hold), threads=default_threads(threads),
        masks_in=_mask_pointers(fn, masks, plan.n, numel, writable=False), simd=resolve_simd(simd),
        **plan.kernel_kwargs(),
    )


def transform_buffers(inputs: Sequence[Any], input_dtypes: Sequence[str], base: Any, base_dtype: Optional[str],
                      outs: Sequence[np.ndarray], plan: Any, offset: int = 0, threads: Optional[int] = None,
                      simd: str = "auto", masks: Optional[Sequence[Any]] = None) -> int:
    """``CpuBackend.transform`` on buffers: outs, N writable float32 numpy arrays of C elements."""
    fn = "transform_buffers"
    plan = _check_combine_plan(fn, plan, inputs)
    hold, ptrs, dtypes, bptr, bdtype, numel = _buffer_sources(fn, inputs, input_dtypes, base, base_dtype)
    outs = list(outs)
    if len(outs) != plan.n:
        raise MergeError(f"[{fn}] outs: expected one float32 array per ingredient ({plan.n}), got {len(outs)}")
    optrs = []
    for i, o in enumerate(outs):
        a = _as_array(o, fn, f"outs[{i}]", writable=True)
        _check_buffer(a, "float32", numel, fn, f"outs[{i}]")
        optrs.append(a.ctypes.data)
    return _native_call(
        fn, _module().transform, inputs=ptrs, input_dtypes=dtypes, base=bptr, base_dtype=bdtype, outs=optrs,
        numel=numel, offset=_check_offset(fn, offset), probs=[], threads=default_threads(threads),
        masks_in=_mask_pointers(fn, masks, plan.n, numel, writable=False), simd=resolve_simd(simd),
        **plan.kernel_kwargs(),
    )


def magnitude_histogram_buffers(
    x: Any, dtype: str, base: Any, base_dtype: Optional[str], prefix_mask: int, prefix: int, shift: int, nbins: int,
    threads: Optional[int] = None, simd: str = "auto",
) -> np.ndarray:
    """int64[nbins]: counts of ((m >> shift) & (nbins - 1)) over the fp32 bits m of |x - b| with
    (m & prefix_mask) == prefix (``methods.stats.magnitude_histogram_torch``), on buffers."""
    fn = "magnitude_histogram_buffers"
    hold, ptrs, dtypes, bptr, bdtype, numel = _buffer_sources(fn, [x], [dtype], base, base_dtype)
    return _native_call(
        fn, _module().magnitude_histogram, x=ptrs[0], x_dtype=dtypes[0], base=bptr, base_dtype=bdtype, numel=numel,
        **_hist_kwargs(fn, prefix_mask, prefix, shift, nbins), threads=default_threads(threads),
        simd=resolve_simd(simd),
    )


def magnitude_sample_buffers(x: Any, dtype: str, base: Any, base_dtype: Optional[str], positions: np.ndarray,
                             threads: Optional[int] = None) -> np.ndarray:
    """uint32 bits of |x - b| at ``positions`` (``methods.stats.magnitude_sample_torch``) on buffers,
    gathered on threads."""
    fn = "magnitude_sample_buffers"
    hold, ptrs, dtypes, bptr, bdtype, numel = _buffer_sources(fn, [x], [dtype], base, base_dtype)
    pos = np.ascontiguousarray(positions, dtype=np.int64)
    return _native_call(fn, _module().magnitude_sample, x=ptrs[0], x_dtype=dtypes[0], base=bptr, base_dtype=bdtype,
                        numel=numel, positions=pos, threads=default_threads(threads))


def magnitude_bracket_buffers(inputs: Sequence[Any], dtypes: Sequence[str], base: Any, base_dtype: Optional[str],
                              which: Sequence[int], lo: Sequence[int], hi: Sequence[int], cap: int,
                              shift: Optional[Sequence[int]] = None, threads: Optional[int] = None,
                              simd: str = "auto"):
    """``CpuBackend.magnitude_bracket`` on buffers."""
    fn = "magnitude_bracket_buffers"
    hold, ptrs, dts, bptr, bdtype, numel = _buffer_sources(fn, inputs, dtypes, base, base_dtype)
    return _native_call(fn, _module().magnitude_bracket, inputs=ptrs, input_dtypes=dts, base=bptr, base_dtype=bdtype,
                        numel=numel, **_bracket_kwargs(fn, which, lo, hi, cap, shift), threads=default_threads(threads),
                        simd=resolve_simd(simd))


def gram_buffers(inputs: Sequence[Any], dtypes: Sequence[str], base: Any, base_dtype: Optional[str],
                 threads: Optional[int] = None, simd: str = "auto") -> np.ndarray:
    """float64[N, N] of sum_j tau_i[j] tau_k[j] (``methods.stats.gram_torch``), on buffers."""
    fn = "gram_buffers"
    hold, ptrs, dts, bptr, bdtype, numel = _buffer_sources(fn, inputs, dtypes, base, base_dtype)
    return _native_call(fn, _module().gram, inputs=ptrs, input_dtypes=dts, base=bptr, base_dtype=bdtype, numel=numel,
                        threads=default_threads(threads), simd=resolve_simd(simd))


def kept_l1_buffers(inputs: Sequence[Any], dtypes: Sequence[str], base: Any, base_dtype: Optional[str], plan: Any,
                    offset: int = 0, probs: Optional[Sequence[Any]] = None, threads: Optional[int] = None,
                    simd: str = "auto", masks: Optional[Sequence[Any]] = None,
                    masks_in: Optional[Sequence[Any]] = None) -> np.ndarray:
    """float64[N, 2]: (sum |tau_i|, sum over kept |tau_i|) under ``plan``'s masks (``methods.stats.kept_l1_torch``).
    masks: None or N writable uint8 arrays (or None entries) of ceil(C / 8) bytes that receive each
    ingredient's keep mask, for ``combine_buffers(masks=...)``; masks_in: the same layout, the keep bits
    of the ingredients that already have them (``della_masks_buffers``), read instead of drawn."""
    fn = "kept_l1_buffers"
    plan = _check_combine_plan(fn, plan, inputs)
    hold, ptrs, dts, bptr, bdtype, numel = _buffer_sources(fn, inputs, dtypes, base, base_dtype)
    return _native_call(
        fn, _module().kept_l1, inputs=ptrs, input_dtypes=dts, base=bptr, base_dtype=bdtype, numel=numel,
        offset=_check_offset(fn, offset), probs=_buffer_probs(fn, probs, plan.n, numel, hold),
        threads=default_threads(threads), masks_out=_mask_pointers(fn, masks, plan.n, numel, writable=True),
        simd=resolve_simd(simd), masks_in=_mask_pointers(fn, masks_in, plan.n, numel, writable=False),
        **plan.kernel_kwargs(),
    )


def _mask_pointers(fn: str, masks: Optional[Sequence[Any]], n: int, numel: int, writable: bool) -> list:
    """Pointers of N keep-mask arrays (uint8, ceil(numel / 8) bytes; None entries: 0), or []."""
    if masks is None:
        return []
    masks = list(masks)
    if len(masks) != n:
        raise MergeError(f"[{fn}] masks: expected one per ingredient ({n}), got {len(masks)}")
    out = []
    for i, m in enumerate(masks):
        if m is None:
            out.append(0)
            continue
        if not (isinstance(m, np.ndarray) and m.dtype == np.uint8 and m.flags.c_contiguous
                and (m.flags.writeable or not writable) and m.nbytes == -(-numel // 8)):
            raise MergeError(f"[{fn}] masks[{i}]: expected a contiguous{' writable' if writable else ''} uint8 array "
                             f"of {-(-numel // 8)} bytes")
        out.append(m.ctypes.data)
    return out


def _check_out(fn: str, out: Any, dtype, n: int) -> None:
    """``out`` is None or a writable contiguous 1-D array of n entries of dtype."""
    if out is not None and (not isinstance(out, np.ndarray) or out.dtype != dtype or out.shape != (n,)
                            or not out.flags.c_contiguous or not out.flags.writeable):
        what = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise MergeError(f"[{fn}] out: expected a writable contiguous {np.dtype(dtype).name} array of {n} entries, "
                         f"got {what}")


def della_probs_buffers(x: Any, dtype: str, base: Any, base_dtype: Optional[str], shape: tuple, density: float,
                        epsilon: float, threads: Optional[int] = None, out: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 [C]: DELLA's keep probabilities of a chunk of whole rows of a tensor of ``shape``
    (``methods.task_vectors.della_probs``, bitwise), from the raw ingredient and base buffers;
    written into ``out`` (float32 [C]) when given, which is returned."""
    fn = "della_probs_buffers"
    hold, ptrs, dtypes, bptr, bdtype, numel = _buffer_sources(fn, [x], [dtype], base, base_dtype)
    return _della_call(fn, ptrs[0], dtypes[0], bptr, bdtype, numel, shape, density, epsilon, threads, out)


def della_masks_buffers(x: Any, dtype: str, base: Any, base_dtype: Optional[str], shape: tuple, density: float,
                        epsilon: float, seed: int, name_key: int, ingredient: int, offset: int = 0,
                        threads: Optional[int] = None, simd: str = "auto",
                        out: Optional[np.ndarray] = None, sums: bool = False):
    """uint8 [ceil(C / 8)]: DELLA's keep bits of a chunk of whole contiguous rows of a tensor of
    ``shape`` (bit j % 8 of byte j / 8): philox_uniform(seed, name_key, ingredient, offset + j) <
    ``della_probs``' p_j, bit for bit, mostly decided from bucket counts without a sort (csrc/cpu/rank.h);
    written into ``out`` when given. For methods that need the mask only (DELLA's L1 rescale).
    With ``sums``: (bits, l1), l1 = float64 [2] (sum |tau|, sum over kept |tau|) exactly as
    ``kept_l1_buffers`` sums them with these bits as ``masks_in`` (None where the rows do not tile
    its fixed summation tasks; then it is left to kept_l1)."""
    from ..methods.task_vectors import della_kernel_args

    fn = "della_masks_buffers"
    hold, ptrs, dtypes, bptr, bdtype, numel = _buffer_sources(fn, [x], [dtype], base, base_dtype)
    args = della_kernel_args(tuple(shape), numel, density, epsilon)
    if args.pop("rest") != 1:
        raise MergeError(f"[{fn}] shape {tuple(shape)}: rows must be contiguous (no dims after dim 1)")
    nbytes = -(-numel // 8)
    _check_out(fn, out, np.uint8, nbytes)
    if out is None:
        out = np.empty(nbytes, dtype=np.uint8)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise MergeError(f"[{fn}] seed: must be an integer in [0, 2^64), got {seed!r}")
    l1 = _native_call(fn, _module().della_masks, x=ptrs[0], x_dtype=dtypes[0], base=bptr, base_dtype=bdtype,
                      numel=numel, **args, seed=int(seed), name_key=int(name_key), ingredient=int(ingredient),
                      offset=_check_offset(fn, offset), bits=out.ctypes.data if nbytes else 0,
                      threads=default_threads(threads), simd=resolve_simd(simd), sums=bool(sums))
    return (out, l1) if sums else out


__all__ = ["CpuBackend", "combine_buffers", "default_threads", "della_masks_buffers", "della_probs_buffers", "gram_buffers", "info",
           "kept_l1_buffers", "magnitude_bracket_buffers", "magnitude_histogram_buffers", "magnitude_sample_buffers", "resolve_exact",
           "resolve_simd", "transform_buffers", "whole_run_buffers"]
