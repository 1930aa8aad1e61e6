"""Merge methods: the registry ``METHODS`` (name -> Method) and how a call picks one.

    ak.merge(sds, method="ties", base=base_sd, weights=[1, 1], density=0.5)
    ak.methods()            # every method with its parameters and defaults

``ame`` (Amortized Model Ensembling, every optimizer) runs the AME schedule
(``ame_kernels.schedule``) on the whole-run kernels; every other method plans one
``combine`` pass per tensor (``methods.combine``) after its streamed statistics
(``methods.stats``). Adding a method: one class in this package (its parameters,
``plan`` and ``reference``) and one line in ``METHODS``.

A call that names no method runs ``ame`` when it names any AME option (optimizer, lr,
epochs, pivot, ...: every earlier call is unchanged), and otherwise the uniform soup
(``linear`` with equal weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..errors import MergeError, suggest
from .base import BASE_NEVER, BASE_REQUIRED, Method, TensorContext
from .combine import CombinePlan
from .interpolation import Linear, ModelStock, Slerp
from .params import Params, RuleParams, canonical, resolve
from .task_vectors import (Breadcrumbs, BreadcrumbsTies, DareLinear, DareTies, Della, DellaLinear, TaskArithmetic,
                           Ties)


class Ame(Method):
    """Marker for the AME path: its options are ``AMEConfig``'s fields, its plan a ``StepPlan``."""

    name, title = "ame", "Amortized Model Ensembling"
    paper = "AME: On defining neural averaging (shared/papers/ame-on-defining-neural-averaging.md)"
    formula = "w_t = OptimizerStep(w_{t-1}, zeta_t/N * (p_t - mean_{i in batch} x_i), lr_t); see DESIGN 1"


METHODS: Dict[str, Method] = {m.name: m for m in (
    Ame(), Linear(), TaskArithmetic(), Ties(), DareLinear(), DareTies(), Breadcrumbs(), BreadcrumbsTies(),
    Della(), DellaLinear(), Slerp(), ModelStock(),
)}

#: options every method takes (the engine's and output's, not the arithmetic's)
GENERAL_KEYS = ("out_dtype", "backend", "threads", "check_finite")


def get_method(name: Any, where: str = "merge") -> Method:
    key = str(name).lower() if isinstance(name, str) else name
    if key not in METHODS:
        raise MergeError(f"{where}: unknown method {name!r}{suggest(str(name).lower(), list(METHODS))}; "
                         f"valid: {', '.join(METHODS)}")
    return METHODS[key]


def methods() -> Dict[str, dict]:
    """Every method: its title, paper, formula, base requirement, ingredient count and parameters."""
    from ..config import FIELD_NAMES

    out = {name: m.describe() for name, m in METHODS.items()}
    out["ame"]["params"] = {f: {"doc": "an AMEConfig field (see ak.AMEConfig)"} for f in FIELD_NAMES
                            if f not in GENERAL_KEYS}
    return out


@dataclass
class MethodCall:
    """What a call asks for once split: the method, its parameters and the general options."""

    method: Method
    params: Optional[Params]          # None for ame
    ame_options: Dict[str, Any]       # AMEConfig fields for ame (general options included)
    general: Dict[str, Any]
    #: ame only: (method, params) of a task-vector transform applied to the ingredients first
    transform: Any = None

    @property
    def name(self) -> str:
        return self.method.name


def split_call(method: Any, options: Dict[str, Any], n: int, has_base: bool, has_config: bool = False,
               per_model: Optional[List[Dict[str, Any]]] = None, where: str = "merge") -> MethodCall:
    """Pick the method and check its options (MergeError naming the key before any work).

    options: every keyword the caller gave besides ingredients/base/config/method.
    per_model: per-ingredient parameter dicts (YAML ``models[i]`` keys), or None.
    """
    from ..config import FIELD_NAMES

    general = {k: v for k, v in options.items() if k in GENERAL_KEYS}
    rest = {k: v for k, v in options.items() if k not in GENERAL_KEYS}
    ame_keys = [k for k in rest if k in FIELD_NAMES or k == "transform"]
    if method is None:
        if ame_keys or has_config:
            method = "ame"
        elif rest or per_model and any(per_model):
            named = sorted(rest) or sorted({k for m in per_model or [] for k in m})
            known = {canonical(q.name) for m in METHODS.values() for q in m.params}
            for k in named:
                if canonical(k) not in known:
                    raise MergeError(f"{where}: unknown option {k!r}{suggest(k, sorted(known | set(FIELD_NAMES)))}")
            takers = [m.name for m in METHODS.values() if any(q.name == canonical(named[0]) for q in m.params)]
            raise MergeError(f"{where}: {', '.join(map(repr, named))} given without a method; name one "
                             f"(method=...; {named[0]!r} is a parameter of {', '.join(takers)})")
        elif has_base:
            raise MergeError(f"{where}: a base is given but no method; name one (e.g. method='task_arithmetic'; "
                             f"the default, the uniform soup, takes no base)")
        else:
            method = "linear"
    m = get_method(method, where)
    if m.name == "ame":
        from .transforms import split_transform

        transform_name = rest.get("transform")
        transform, rest = split_transform(rest, n, where)
        if has_base and transform is None:
            raise MergeError(f"{where}: method 'ame' takes a pivot, not a base (pivot=<state dict> with "
                             "adaptive_pivot=False runs AME around a fixed point; a base is for transform=...)")
        if transform is not None and not has_base:
            raise MergeError(f"{where}: transform {transform_name!r} needs a base model "
                             "(its task vectors are x_i - base)")
        unknown = [k for k in rest if k not in FIELD_NAMES]
        if unknown:
            raise MergeError(f"{where}: method 'ame' has no option {unknown[0]!r}"
                             f"{suggest(canonical(unknown[0]), FIELD_NAMES)}")
        if per_model and any(per_model):
            keys = sorted({k for d in per_model for k in d})
            raise MergeError(f"{where}: method 'ame' takes no per-model parameters, got {', '.join(map(repr, keys))}")
        return MethodCall(m, None, {**rest, **general}, general, transform)
    if "transform" in rest:
        raise MergeError(f"{where}: transform is an option of method 'ame' (a transform under the AME optimizers); "
                         f"{m.name!r} sparsifies by its own parameters")
    own = {q.name for q in m.params}
    ame_keys = [k for k in ame_keys if canonical(k) not in own]  # 'seed' is both AME's and DARE's
    if ame_keys:
        k = ame_keys[0]
        raise MergeError(f"{where}: {k!r} is an option of method 'ame', not of {m.name!r}; {m.name!r} takes: "
                         f"{', '.join(q.name for q in m.params) or 'no parameters'}")
    m.check_count(n, where)
    if m.base == BASE_REQUIRED and not has_base:
        raise MergeError(f"{where}: method {m.name!r} needs a base model (base=...; in YAML, base: PATH)")
    if m.base == BASE_NEVER and has_base:
        raise MergeError(f"{where}: method {m.name!r} takes no base model"
                         + (" (task_arithmetic is the weighted sum of task vectors around a base)" if m.name == "linear" else ""))
    params = resolve(m.name, m.params, n, rest, per_model, where)
    if isinstance(params, RuleParams):  # per-tensor values: checked per tensor (RuleParams.for_tensor)
        params.checker = lambda p, w, _m=m, _n=n: _m.check(p, _n, w)
    else:
        m.check(params, n, where)
    return MethodCall(m, params, {}, general)


__all__ = ["METHODS", "GENERAL_KEYS", "CombinePlan", "Method", "MethodCall", "TensorContext", "get_method",
           "methods", "split_call"]
