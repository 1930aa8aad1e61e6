"""ak.merge: validate, schedule, pick a backend, run it per tensor, in that order.

Every check happens before any compute, so bad input costs nothing and leaves
nothing half-done, except the NaN/Inf check of the ingredients (``check_finite``) on the
kernel backends: the kernels flag them while they read the inputs anyway, so merge
raises after the kernel of the first tensor holding one, and returns nothing.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .backends import get_backend
from .config import AMEConfig, make_config
from .errors import MergeError
from .schedule import schedule

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Ingredients = Union[torch.Tensor, Sequence[torch.Tensor], Sequence[Dict[str, torch.Tensor]]]


def _as_state_dicts(ingredients: Ingredients) -> tuple:
    """(list of name->tensor dicts, form) where form is 'stacked', 'list' or 'dict'."""
    if isinstance(ingredients, torch.Tensor):
        if ingredients.dim() < 1 or ingredients.shape[0] < 1:
            raise MergeError(f"merge: a stacked tensor needs shape [N, ...] with N >= 1, got {tuple(ingredients.shape)}")
        return [{"": x} for x in ingredients.unbind(0)], "stacked"
    if isinstance(ingredients, dict):
        raise MergeError("merge: ingredients must be a list of state dicts, not a single dict")
    items = list(ingredients)
    if not items:
        raise MergeError("merge: need at least 1 ingredient, got 0")
    if all(isinstance(x, torch.Tensor) for x in items):
        return [{"": x} for x in items], "list"
    if all(isinstance(x, dict) for x in items):
        return [dict(x) for x in items], "dict"
    kinds = sorted({type(x).__name__ for x in items})
    raise MergeError(f"merge: ingredients must be all tensors or all state dicts, got {', '.join(kinds)}")


def _label(name: str) -> str:
    return f"tensor {name!r}" if name else "the tensor"


def check_tensor_kind(x: torch.Tensor, what: str, where: str) -> None:
    """Reject what no backend can merge, naming ``what`` (``'merge: tensor 'w' of ingredient 1'``):
    meta tensors (no data), complex tensors, and floating dtypes other than float32/bfloat16/float16."""
    if x.device.type == "meta":
        raise MergeError(
            f"{what} is a meta tensor (shape only, no data); materialise it first "
            "(e.g. load the checkpoint with load_state_dict(..., assign=True) or module.to_empty())"
        )
    if x.dtype.is_complex:
        raise MergeError(
            f"{what} has complex dtype {x.dtype}, which {where} does not support "
            "(merge torch.view_as_real(x) instead and convert back with torch.view_as_complex)"
        )
    if x.dtype.is_floating_point and x.dtype not in FLOAT_DTYPES:
        raise MergeError(
            f"{what} has unsupported dtype {x.dtype}; supported: float32, bfloat16, float16 "
            "(convert it, e.g. with .float(); the arithmetic is fp32 either way)"
        )


def _check_structure(dicts: List[dict]) -> List[str]:
    """Same names, shapes and devices in every ingredient; returns the names in order."""
    names = list(dicts[0].keys())
    ref = set(names)
    problems = []
    for i, d in enumerate(dicts[1:], start=1):
        keys = set(d.keys())
        if keys != ref:
            missing, extra = sorted(ref - keys), sorted(keys - ref)
            problems.append(f"ingredient {i}: missing {missing or 'none'}, extra {extra or 'none'}")
    if problems:
        raise MergeError(f"merge: tensor names differ from ingredient 0's: {'; '.join(problems)}")
    for name in names:
        first = dicts[0][name]
        if not isinstance(first, torch.Tensor):
            raise MergeError(f"merge: {_label(name)} of ingredient 0 is a {type(first).__name__}, not a tensor")
        check_tensor_kind(first, f"merge: {_label(name)} of ingredient 0", "merge")
        for i, d in enumerate(dicts[1:], start=1):
            x = d[name]
            if not isinstance(x, torch.Tensor):
                raise MergeError(f"merge: {_label(name)} of ingredient {i} is a {type(x).__name__}, not a tensor")
            check_tensor_kind(x, f"merge: {_label(name)} of ingredient {i}", "merge")
            if x.shape != first.shape:
                raise MergeError(
                    f"merge: {_label(name)} has shape {tuple(x.shape)} in ingredient {i} but {tuple(first.shape)} in ingredient 0"
                )
            if x.device != first.device:
                raise MergeError(f"merge: {_label(name)} is on {x.device} in ingredient {i} but on {first.device} in ingredient 0")
            if (x.dtype in FLOAT_DTYPES) != (first.dtype in FLOAT_DTYPES):
                raise MergeError(
                    f"merge: {_label(name)} is {x.dtype} in ingredient {i} but {first.dtype} in ingredient 0 "
                    "(floating and non-floating tensors cannot be mixed)"
                )
    devices = {dicts[0][n].device for n in names}
    if len(devices) > 1:
        raise MergeError(f"merge: ingredient tensors are spread over several devices: {sorted(map(str, devices))}")
    return names


def _check_finite(dicts: List[dict], names: List[str]) -> None:
    for i, d in enumerate(dicts):
        for name in names:
            x = d[name]
            if x.dtype in FLOAT_DTYPES and not bool(torch.isfinite(x).all()):
                raise MergeError(
                    f"merge: {_label(name)} of ingredient {i} contains NaN or Inf "
                    "(pass check_finite=False to merge anyway)"
                )


def _check_pivot_finite(pivot: Any, names: List[str]) -> None:
    """An explicit pivot (name -> tensor) holds no NaN/Inf in the tensors it provides."""
    if not isinstance(pivot, dict):
        return
    for name in names:
        p = pivot.get(name)
        if isinstance(p, torch.Tensor) and p.dtype in FLOAT_DTYPES and not bool(torch.isfinite(p).all()):
            raise MergeError(f"merge: pivot {_label(name)} contains NaN or Inf (pass check_finite=False to merge anyway)")


def _resolve_pivot(pivot: Any, dicts: List[dict], names: List[str], form: str) -> Any:
    """None (soup), an ingredient index, or a dict name -> tensor of explicit pivots."""
    n = len(dicts)
    if isinstance(pivot, str):
        if pivot != "soup":
            raise MergeError(f"merge: pivot must be 'soup', an ingredient index or a tensor/state dict, got {pivot!r}")
        return None
    if isinstance(pivot, numbers.Integral) and not isinstance(pivot, bool):  # numpy integers too
        pivot = int(pivot)
    if isinstance(pivot, int) and not isinstance(pivot, bool):
        if not -n <= pivot < n:
            raise MergeError(f"merge: pivot index {pivot} is out of range for {n} ingredients")
        return pivot % n
    if isinstance(pivot, torch.Tensor):
        if form == "dict":
            raise MergeError("merge: ingredients are state dicts, so an explicit pivot must be a state dict too")
        pivot = {"": pivot}
    if not isinstance(pivot, dict):
        raise MergeError(f"merge: pivot must be 'soup', an ingredient index or a tensor/state dict, got {type(pivot).__name__}")
    # Non-floating tensors are copied from ingredient 0, so the pivot needs only the floating ones
    # (a dict(model.named_parameters()) pivot has no buffers).
    missing = sorted(k for k in set(names) - set(pivot) if dicts[0][k].dtype in FLOAT_DTYPES)
    if missing:
        raise MergeError(f"merge: the pivot state dict is missing {missing}")
    for name in names:
        ref = dicts[0][name]
        if ref.dtype not in FLOAT_DTYPES:
            continue
        p = pivot[name]
        if isinstance(p, torch.Tensor):
            check_tensor_kind(p, f"merge: pivot {_label(name)}", "merge")
        if not isinstance(p, torch.Tensor) or p.dtype not in FLOAT_DTYPES:
            raise MergeError(f"merge: pivot {_label(name)} must be a floating tensor (float32/bfloat16/float16)")
        if p.shape != ref.shape:
            raise MergeError(f"merge: pivot {_label(name)} has shape {tuple(p.shape)}, ingredients have {tuple(ref.shape)}")
    return pivot


def _copy_non_float(dicts: List[dict], name: str) -> torch.Tensor:
    first = dicts[0][name]
    differing = [i for i, d in enumerate(dicts[1:], start=1) if d[name].dtype != first.dtype or not torch.equal(d[name], first)]
    if differing:
        warnings.warn(
            f"merge: non-floating {_label(name)} differs between ingredients (ingredients {differing} differ from "
            "ingredient 0 in value or dtype); it is copied from ingredient 0, not averaged",
            stacklevel=3,
        )
    return first.clone()


def merge(ingredients: Ingredients, config: Optional[AMEConfig] = None, **overrides: Any):
    """Merge N ingredients with Amortized Model Ensembling.

    ingredients: a list of tensors of one shape, a stacked tensor [N, ...], or a
        list of state dicts (name -> tensor) with identical names and shapes.
    config / overrides: an AMEConfig (or dict) and/or keyword overrides of its
        fields (see ``AMEConfig`` for every hyperparameter and its default).
    Returns the merged tensor, or a dict with the same keys in the same order, on
    the ingredients' device; each float tensor in ``out_dtype`` (default: its dtype
    in the first ingredient), non-float tensors copied from the first ingredient.
    Raises MergeError, before any work, on bad input.
    """
    cfg = make_config(config, **overrides)
    dicts, form = _as_state_dicts(ingredients)
    names = _check_structure(dicts)
    pivot = _resolve_pivot(cfg.pivot, dicts, names, form)
    plan = schedule(cfg, len(dicts))
    device = dicts[0][names[0]].device if names else torch.device("cpu")
    backend = get_backend(cfg.backend, device.type)
    if cfg.check_finite:
        # The kernel backends flag NaN/Inf ingredients while they read them (below: no extra
        # pass); the reference checks with torch first, before any compute.
        if backend.name == "reference":
            _check_finite(dicts, names)
        _check_pivot_finite(pivot, names)

    merged: Dict[str, torch.Tensor] = {}
    for name in names:
        first = dicts[0][name]
        if first.dtype not in FLOAT_DTYPES:
            merged[name] = _copy_non_float(dicts, name)
            continue
        out_dtype = _DTYPE_BY_NAME[cfg.out_dtype] if cfg.out_dtype else first.dtype
        inputs = [d[name].detach().contiguous().reshape(-1) for d in dicts]
        if isinstance(pivot, dict):
            p = pivot[name].detach().to(device).contiguous().reshape(-1)
        else:
            p = pivot
        out = torch.empty(first.numel(), dtype=out_dtype, device=device)
        if first.numel():
            bad = backend.whole_run(inputs, plan, p, cfg.adaptive_pivot, out, threads=cfg.threads,
                                    check_finite=cfg.check_finite)
            if bad:  # flagged by the kernel while it read them: raise, return nothing
                raise MergeError(f"merge: {_label(name)} of ingredient {bad[0]} contains NaN or Inf "
                                 "(pass check_finite=False to merge anyway)")
            if out_dtype == torch.float16 and cfg.check_finite and not bool(torch.isfinite(out).all()):
                # finite inputs (checked above) whose merge leaves float16's range: rounding gave Inf
                raise MergeError(f"merge: {_label(name)}: merged values exceed the float16 range (|x| <= 65504) "
                                 "and were rounded to Inf; use out_dtype='bfloat16' or 'float32' "
                                 "(or check_finite=False to keep them)")
        merged[name] = out.reshape(first.shape)
    if form == "dict":
        return merged
    return merged[""]
