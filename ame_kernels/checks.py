"""The checks of in-memory ingredients, written once: ak.merge, soups, greedy, stew and the
strategies call these (names, shapes, devices and kinds across ingredients; NaN/Inf; an
explicit pivot or base against the ingredients; non-floating tensors copied, not averaged).
Each raises a MergeError naming the tensor and ingredient before any work."""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Dict, List, Sequence, Union

import torch

from .errors import MergeError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Ingredients = Union[torch.Tensor, Sequence[torch.Tensor], Sequence[Dict[str, torch.Tensor]]]


def as_state_dicts(ingredients: Ingredients) -> tuple:
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


def label(name: str) -> str:
    return f"tensor {name!r}" if name else "the tensor"


def check_tensor_kind(x: torch.Tensor, what: str, where: str) -> None:
    """Reject what no backend can merge, naming ``what`` (``'merge: tensor 'w' of ingredient 1'``):
    meta tensors (no data), complex tensors, and floating dtypes other than float32/bfloat16/float16."""
    if x.layout != torch.strided:
        raise MergeError(f"{what} is a {str(x.layout).replace('torch.', '')} tensor; merging needs dense tensors "
                         "(convert it with .to_dense())")
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


def check_structure(dicts: List[dict]) -> List[str]:
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
            raise MergeError(f"merge: {label(name)} of ingredient 0 is a {type(first).__name__}, not a tensor")
        check_tensor_kind(first, f"merge: {label(name)} of ingredient 0", "merge")
        for i, d in enumerate(dicts[1:], start=1):
            x = d[name]
            if not isinstance(x, torch.Tensor):
                raise MergeError(f"merge: {label(name)} of ingredient {i} is a {type(x).__name__}, not a tensor")
            check_tensor_kind(x, f"merge: {label(name)} of ingredient {i}", "merge")
            if x.shape != first.shape:
                raise MergeError(
                    f"merge: {label(name)} has shape {tuple(x.shape)} in ingredient {i} but {tuple(first.shape)} in ingredient 0"
                )
            if x.device != first.device:
                raise MergeError(f"merge: {label(name)} is on {x.device} in ingredient {i} but on {first.device} in ingredient 0")
            if (x.dtype in FLOAT_DTYPES) != (first.dtype in FLOAT_DTYPES):
                raise MergeError(
                    f"merge: {label(name)} is {x.dtype} in ingredient {i} but {first.dtype} in ingredient 0 "
                    "(floating and non-floating tensors cannot be mixed)"
                )
    devices = {dicts[0][n].device for n in names}
    if len(devices) > 1:
        raise MergeError(f"merge: ingredient tensors are spread over several devices: {sorted(map(str, devices))}")
    return names


def check_all_finite(dicts: List[dict], names: List[str]) -> None:
    for i, d in enumerate(dicts):
        for name in names:
            x = d[name]
            if x.dtype in FLOAT_DTYPES and not bool(torch.isfinite(x).all()):
                raise MergeError(
                    f"merge: {label(name)} of ingredient {i} contains NaN or Inf "
                    "(pass check_finite=False to merge anyway)"
                )


def check_reference_finite(pivot: Any, names: List[str], what: str = "pivot") -> None:
    """An explicit pivot or base (name -> tensor) holds no NaN/Inf in the tensors it provides."""
    if not isinstance(pivot, dict):
        return
    for name in names:
        p = pivot.get(name)
        if isinstance(p, torch.Tensor) and p.dtype in FLOAT_DTYPES and not bool(torch.isfinite(p).all()):
            raise MergeError(f"merge: {what} {label(name)} contains NaN or Inf (pass check_finite=False to merge anyway)")


def resolve_pivot(pivot: Any, dicts: List[dict], names: List[str], form: str) -> Any:
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
    return resolve_reference(pivot, dicts, names, form, "pivot", "'soup', an ingredient index or a tensor/state dict")


def resolve_reference(value: Any, dicts: List[dict], names: List[str], form: str, what: str, expected: str) -> dict:
    """An explicit pivot or base (a tensor, or a state dict) checked against the ingredients: the
    floating tensors' names and shapes; returns name -> tensor."""
    if isinstance(value, torch.Tensor):
        if form == "dict":
            raise MergeError(f"merge: ingredients are state dicts, so an explicit {what} must be a state dict too")
        value = {"": value}
    if not isinstance(value, dict):
        raise MergeError(f"merge: {what} must be {expected}, got {type(value).__name__}")
    # Non-floating tensors are copied from ingredient 0, so the pivot needs only the floating ones
    # (a dict(model.named_parameters()) pivot has no buffers).
    missing = sorted(k for k in set(names) - set(value) if dicts[0][k].dtype in FLOAT_DTYPES)
    if missing:
        raise MergeError(f"merge: the {what} state dict is missing {missing}")
    for name in names:
        ref = dicts[0][name]
        if ref.dtype not in FLOAT_DTYPES:
            continue
        p = value[name]
        if isinstance(p, torch.Tensor):
            check_tensor_kind(p, f"merge: {what} {label(name)}", "merge")
        if not isinstance(p, torch.Tensor) or p.dtype not in FLOAT_DTYPES:
            raise MergeError(f"merge: {what} {label(name)} must be a floating tensor (float32/bfloat16/float16)")
        if p.shape != ref.shape:
            raise MergeError(f"merge: {what} {label(name)} has shape {tuple(p.shape)}, ingredients have {tuple(ref.shape)}")
        if p.device != ref.device and what == "base":
            raise MergeError(f"merge: base {label(name)} is on {p.device}, the ingredients on {ref.device}")
    return value


def copy_non_float(dicts: List[dict], name: str) -> torch.Tensor:
    first = dicts[0][name]
    differing = [i for i, d in enumerate(dicts[1:], start=1) if d[name].dtype != first.dtype or not torch.equal(d[name], first)]
    if differing:
        warnings.warn(
            f"merge: non-floating {label(name)} differs between ingredients (ingredients {differing} differ from "
            "ingredient 0 in value or dtype); it is copied from ingredient 0, not averaged",
            stacklevel=3,
        )
    return first.clone()
