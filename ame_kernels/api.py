"""ak.merge: pick the method (``methods.split_call``), validate, plan, pick a backend, run it
per tensor, in that order: the AME schedule on the whole-run kernels, or another method's
statistics and combine pass (``methods.run``).

Every check happens before any compute, so bad input costs nothing and leaves
nothing half-done, except the NaN/Inf check of the ingredients and the base (``check_finite``)
on the kernel backends: the kernels flag them while they read the inputs anyway, so merge
raises after the kernel of the first tensor holding one, and returns nothing.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

import torch

from .backends import get_backend
from .config import AMEConfig, make_config
from .checks import (DTYPE_BY_NAME, FLOAT_DTYPES, Ingredients, as_state_dicts, check_all_finite, check_reference_finite,
                     check_structure, copy_non_float, label, resolve_pivot, resolve_reference)
from .errors import MergeError
from .io.madvise import MADV_HUGEPAGE, madvise
from .methods import split_call
from .schedule import schedule

def merge(ingredients: Ingredients, config: Optional[AMEConfig] = None, *, method: Optional[str] = None,
          base: Any = None, out: Any = None, **options: Any):
    """Merge N ingredients with a merge method (``ak.methods()`` lists them).

    ingredients: a list of tensors of one shape, a stacked tensor [N, ...], or a
        list of state dicts (name -> tensor) with identical names and shapes.
    method: 'ame' (Amortized Model Ensembling: ``config`` / AMEConfig fields such as
        optimizer, lr, epochs), 'linear', 'task_arithmetic', 'ties', 'dare_linear',
        'dare_ties', 'breadcrumbs', 'breadcrumbs_ties', 'della', 'della_linear', 'slerp',
        'model_stock'. None: 'ame' when an AME option is given, else the uniform soup.
    base: the base model (a tensor / state dict like the ingredients) of task-vector methods.
    options: the method's parameters (per-ingredient ones as a scalar or a list of N;
        ``lambda_`` for ``lambda``, ``weights`` for ``weight``) and the general options
        out_dtype, backend, threads, check_finite.
    out: optional preallocated outputs, written in place and returned (no new memory: repeated
        merges, sweeps): a contiguous tensor of the ingredients' shape and device (tensor
        ingredients), or a dict holding one for every floating tensor name (state dicts);
        float32/bfloat16/float16, each one's dtype is its output dtype (``out_dtype``, when
        given, must agree); none may share memory with an ingredient, the base or the pivot.
        A NaN/Inf found by the kernels' flags raises after they wrote: out then holds no result.
    Returns the merged tensor, or a dict with the same keys in the same order, on the
    ingredients' device; each float tensor in ``out_dtype`` (default: its dtype in the
    base, else in the first ingredient), non-float tensors copied from the first ingredient.
    Raises MergeError, before any work, on bad input.
    """
    dicts, form = as_state_dicts(ingredients)
    names = check_structure(dicts)
    call = split_call(method, options, len(dicts), base is not None, config is not None)
    outs = _check_out(out, dicts, names, form, [base, options.get("pivot"), getattr(config, "pivot", None)],
                      options.get("out_dtype", getattr(config, "out_dtype", None))) if out is not None else None
    if call.name == "ame":
        return _merge_ame(dicts, form, names, make_config(config, **call.ame_options), call.transform, base, outs)
    return _merge_method(dicts, form, names, call, base, outs)


def _tensors_of(x: Any) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [v for v in x.values() if isinstance(v, torch.Tensor)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors_of(v)]
    return []


def _span(t: torch.Tensor) -> tuple:
    st = t.untyped_storage()
    return st.data_ptr(), st.data_ptr() + st.nbytes()


def _check_out(out: Any, dicts: List[dict], names: List[str], form: str, others: list, out_dtype: Any) -> Dict[str, torch.Tensor]:
    """name -> the caller's output tensor for every floating tensor, checked before any work."""
    floats = [n for n in names if dicts[0][n].dtype in FLOAT_DTYPES]
    if form == "dict":
        if not isinstance(out, dict):
            raise MergeError(f"merge: out must be a dict of tensors for state-dict ingredients, got {type(out).__name__}")
        extra = [k for k in out if k not in floats]
        missing = [n for n in floats if n not in out]
        if extra or missing:
            raise MergeError("merge: out must hold one tensor for every floating tensor of the ingredients"
                             + (f"; missing {missing[:5]}" if missing else "")
                             + (f"; not merged tensors {extra[:5]}" if extra else ""))
        outs = dict(out)
    else:
        if not isinstance(out, torch.Tensor):
            raise MergeError(f"merge: out must be a tensor for tensor ingredients, got {type(out).__name__}")
        outs = {"": out}
    want = DTYPE_BY_NAME.get(out_dtype) if isinstance(out_dtype, str) else None
    for name, o in outs.items():
        what = f"merge: out {label(name)}"
        first = dicts[0][name]
        if not isinstance(o, torch.Tensor):
            raise MergeError(f"{what} must be a tensor, got {type(o).__name__}")
        if tuple(o.shape) != tuple(first.shape) or o.device != first.device:
            raise MergeError(f"{what} has shape {tuple(o.shape)} on {o.device}; the merge gives "
                             f"{tuple(first.shape)} on {first.device}")
        if o.dtype not in FLOAT_DTYPES or not o.is_contiguous():
            raise MergeError(f"{what} must be a contiguous float32/bfloat16/float16 tensor, got "
                             f"{'a non-contiguous ' if not o.is_contiguous() else ''}{o.dtype}")
        if want is not None and o.dtype != want:
            raise MergeError(f"{what} is {o.dtype} but out_dtype is {out_dtype!r}")
        if o.requires_grad:
            raise MergeError(f"{what} requires grad; pass a tensor that does not (or its .detach())")
    # Shared memory, in one sweep over the storages' byte ranges sorted by start: a range overlaps
    # an earlier one exactly when it starts before the furthest end seen so far (inputs may share
    # with each other; an output may share with nothing).
    inputs = [t for d in dicts for t in d.values()] + [t for o in others for t in _tensors_of(o)]
    ranges = sorted([(*_span(t), None) for t in inputs if t.device.type != "meta"]
                    + [(*_span(o), name) for name, o in outs.items()], key=lambda r: r[:2])
    end_in, end_out, out_at = -1, -1, None  # furthest end of the inputs, of the outputs (and whose)
    shared = "shares memory with an ingredient, the base or the pivot; the merge reads those while it writes out"
    for a, z, name in ranges:
        if z <= a:  # no bytes: shares nothing
            continue
        if name is None:  # an input: no output may reach into it
            if a < end_out:
                raise MergeError(f"merge: out {label(out_at)} {shared}")
            end_in = max(end_in, z)
            continue
        if a < end_in:
            raise MergeError(f"merge: out {label(name)} {shared}")
        if a < end_out:
            raise MergeError(f"merge: out {label(out_at)} and out {label(name)} share memory")
        if z > end_out:
            end_out, out_at = z, name
    return outs


def _merge_ame(dicts: List[dict], form: str, names: List[str], cfg: AMEConfig, transform=None, base: Any = None,
               outs: Optional[Dict[str, torch.Tensor]] = None):
    pivot = resolve_pivot(cfg.pivot, dicts, names, form)
    plan = schedule(cfg, len(dicts))
    base_sd = resolve_reference(base, dicts, names, form, "base", "a tensor or state dict") if base is not None else None
    device = dicts[0][names[0]].device if names else torch.device("cpu")
    backend = get_backend(cfg.backend, device.type)
    if cfg.check_finite:
        # The kernel backends flag NaN/Inf ingredients while they read them (no extra pass); the
        # reference, and a transform (which reads the ingredients first), check with torch up front.
        if backend.name == "reference" or transform is not None:
            check_all_finite(dicts, names)
        check_reference_finite(pivot, names)
        check_reference_finite(base_sd, names, "base")

    def run(name, inputs, out):
        p = pivot[name].detach().to(device).contiguous().reshape(-1) if isinstance(pivot, dict) else pivot
        if transform is not None:  # the ingredients' task vectors sparsified first (methods.transforms)
            from .methods.run import TorchOps, plan_tensor
            from .methods.transforms import unit_params

            method, params = transform
            b = base_sd[name].detach().contiguous().reshape(-1)
            tplan, _, _ = plan_tensor(method, unit_params(params, len(inputs)), name, tuple(dicts[0][name].shape),
                                      len(inputs), True, lambda: [(0, inputs, b)], TorchOps(backend, cfg.threads))
            outs = [torch.empty(x.numel(), dtype=torch.float32, device=x.device) for x in inputs]
            backend.transform(inputs, b, outs, tplan, 0, threads=cfg.threads)
            inputs = outs
        return backend.whole_run(inputs, plan, p, cfg.adaptive_pivot, out, threads=cfg.threads,
                                 check_finite=cfg.check_finite)

    return _merge_tensors(dicts, form, names, cfg.out_dtype, cfg.check_finite, None, run, outs)


def _merge_method(dicts: List[dict], form: str, names: List[str], call, base: Any,
                  outs: Optional[Dict[str, torch.Tensor]] = None):
    from .methods.run import BufferOps, TorchOps, merge_tensor, plan_tensor, unseen_hidden
    from .methods.stats import NonFinite

    general = make_config(None, **call.general)  # the general options, checked as AMEConfig checks them
    if hasattr(call.params, "bind"):  # per-tensor values (layer gradients, filters): every tensor checked first
        call.params.bind(names)
        call.params.check_tensors([n for n in names if dicts[0][n].dtype in FLOAT_DTYPES])
    base_sd = resolve_reference(base, dicts, names, form, "base", "a tensor or state dict") if base is not None else None
    device = dicts[0][names[0]].device if names else torch.device("cpu")
    backend = get_backend(general.backend, device.type)
    # host tensors on the cpu backend take the checkpoint engine's own buffer path (the same
    # kernels, and DELLA's keep bits instead of its probabilities); other backends their torch entries
    host = backend.name == "cpu" and device.type == "cpu"
    ops = BufferOps(general.threads) if host else TorchOps(backend, general.threads)
    handle = ops.handle if host else (lambda t: t)
    # The reference checks with torch up front; the kernel backends take what their passes see:
    # the statistics passes' NaN/Inf counts, the combine pass's count of Inf/NaN written (an output
    # check where a backend does not count), and a torch check of only the ingredients whose
    # entries a mask or an election could drop unseen.
    flags = general.check_finite and backend.name != "reference"
    if general.check_finite and not flags:
        check_all_finite(dicts, names)
        check_reference_finite(base_sd, names, "base")

    def culprits(name, inputs, b, among=None) -> list:
        bad = [i for i in (range(len(inputs)) if among is None else among) if not bool(torch.isfinite(inputs[i]).all())]
        if not bad and b is not None and not bool(torch.isfinite(b).all()):
            raise MergeError(f"merge: base {label(name)} contains NaN or Inf (pass check_finite=False to merge anyway)")
        return bad

    def run(name, inputs, out):
        b = base_sd[name].detach().contiguous().reshape(-1) if base_sd is not None else None
        shape = tuple(dicts[0][name].shape)
        hx, hb, ho = [handle(x) for x in inputs], handle(b), handle(out)
        if not flags:
            merge_tensor(call.method, call.params, name, shape, hx, hb, ho, ops)
            return []
        chunks = lambda: [(0, hx, hb)]  # noqa: E731
        try:
            plan, probs_fn, ctx = plan_tensor(call.method, call.params, name, shape, len(inputs), b is not None,
                                              chunks, ops, True)
        except NonFinite:
            return culprits(name, inputs, b)
        hidden = culprits(name, inputs, None, unseen_hidden(plan, ctx))
        if hidden:
            return hidden
        written = ops.combine(hx, hb, ho, plan, 0, probs_fn(0, hx, hb) if probs_fn else None)
        if written is None:  # the backend does not count what it writes
            written = not bool(torch.isfinite(out).all())
        return culprits(name, inputs, b) if written else []

    return _merge_tensors(dicts, form, names, general.out_dtype, general.check_finite, base_sd, run, outs)


HUGE_PAGE = 1 << 21


def _madvise_huge(ptr: int, nbytes: int) -> None:
    """Ask Linux for transparent huge pages on the 2 MiB-aligned pages of [ptr, ptr + nbytes)
    before anything touches them; a no-op elsewhere or when the call fails."""
    a, e = -(-ptr // HUGE_PAGE) * HUGE_PAGE, (ptr + nbytes) // HUGE_PAGE * HUGE_PAGE
    if e > a and madvise is not None and sys.platform.startswith("linux"):
        madvise(a, e - a, MADV_HUGEPAGE)


def _fresh_output(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new output tensor. On the host, a large one asks for huge pages first: the kernel is
    the first to write it, and with 4 KiB pages those first writes fault once per page, which
    measured 40 ms against the 12 ms GD kernel itself for 64 MiB (4 KiB faults are costly in
    VMs); with 2 MiB pages the same write costs 15 ms."""
    out = torch.empty(numel, dtype=dtype, device=device)
    nbytes = numel * out.element_size()
    if out.device.type == "cpu" and nbytes >= 2 * HUGE_PAGE:
        _madvise_huge(out.data_ptr(), nbytes)
    return out


def _merge_tensors(dicts: List[dict], form: str, names: List[str], out_dtype: Optional[str], check_finite: bool,
                   base_sd: Optional[dict], run, outs: Optional[Dict[str, torch.Tensor]] = None):
    """Per tensor: copy non-floating ones, else ``run(name, flat inputs, flat out)``, out a new tensor
    or the caller's (``outs``); fp16 overflow checked."""
    merged: Dict[str, torch.Tensor] = {}
    for name in names:
        first = dicts[0][name]
        if first.dtype not in FLOAT_DTYPES:
            merged[name] = copy_non_float(dicts, name)
            continue
        own = base_sd[name].dtype if base_sd is not None else first.dtype
        given = outs[name] if outs is not None else None
        dtype = given.dtype if given is not None else (DTYPE_BY_NAME[out_dtype] if out_dtype else own)
        inputs = [d[name].detach().contiguous().reshape(-1) for d in dicts]
        out = given.view(-1) if given is not None else _fresh_output(first.numel(), dtype, first.device)
        if first.numel():
            bad = run(name, inputs, out)
            if bad:  # flagged by the kernel while it read them: raise, return nothing
                raise MergeError(f"merge: {label(name)} of ingredient {bad[0]} contains NaN or Inf "
                                 "(pass check_finite=False to merge anyway)")
            if dtype == torch.float16 and check_finite and not bool(torch.isfinite(out).all()):
                # finite inputs (checked above) whose merge leaves float16's range: rounding gave Inf
                raise MergeError(f"merge: {label(name)}: merged values exceed the float16 range (|x| <= 65504) "
                                 "and were rounded to Inf; use out_dtype='bfloat16' or 'float32' "
                                 "(or check_finite=False to keep them)")
        merged[name] = given if given is not None else out.reshape(first.shape)
    if form == "dict":
        return merged
    return merged[""]
