"""Method parameters: declared once per method, checked before any work, resolved per ingredient.

A ``Param`` says a parameter's type, range, default, and whether it is given per
ingredient (a scalar for all, or a list of N). ``resolve`` turns what a caller passed
(keyword arguments, YAML keys, per-model YAML entries) into a ``Params`` object, or
raises a MergeError naming the key and value, with the closest valid name for a typo.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import MergeError, suggest

#: alternative spellings accepted everywhere (Python cannot take ``lambda=`` as a keyword)
ALIASES = {"lambda_": "lambda", "weights": "weight", "densities": "density"}


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # 'float', 'bool', 'int', 'choice'
    default: Any
    doc: str
    per_ingredient: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Tuple[Any, ...] = ()

    def describe(self) -> str:
        rng = ""
        if self.kind in ("float", "int") and (self.low is not None or self.high is not None):
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            rng = f" in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"
        if self.kind == "choice":
            rng = " one of " + ", ".join(map(repr, self.choices))
        per = ", per ingredient" if self.per_ingredient else ""
        return f"{self.name} ({self.kind}{rng}{per}; default {self.default!r}): {self.doc}"

    def check(self, value: Any, where: str) -> Any:
        """``value`` converted to this parameter's type; MergeError naming ``where`` otherwise."""
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, numbers.Integral) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
                return value.lower() in ("true", "yes")
            raise MergeError(f"{where}: expected true or false, got {value!r}")
        if self.kind == "choice":
            v = value.lower() if isinstance(value, str) else value
            for c in self.choices:
                if v == c or (isinstance(c, str) and isinstance(v, str) and v == c.lower()):
                    return c
            raise MergeError(f"{where}: expected one of {', '.join(map(repr, self.choices))}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
            raise MergeError(f"{where}: expected a number, got {value!r}")
        try:
            v = float(value)
        except ValueError:
            raise MergeError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(v):
            raise MergeError(f"{where}: must be finite, got {value!r}")
        if self.kind == "int":
            if v != int(v):
                raise MergeError(f"{where}: expected an integer, got {value!r}")
            v = int(v)
        lo_bad = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        hi_bad = self.high is not None and (v >= self.high if self.high_open else v > self.high)
        if lo_bad or hi_bad:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            rng = f"{'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"
            raise MergeError(f"{where}: must be in {rng}, got {value!r}")
        return v


class Params:
    """Resolved parameters of one merge: scalars and per-ingredient tuples of N values."""

    def __init__(self, method: str, values: Dict[str, Any], given: Sequence[str]):
        self.method = method
        self.values = values
        self.given = tuple(given)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.values.items()}

    def for_tensor(self, name: str, shape: tuple = ()) -> "Params":
        """The values that apply to tensor ``name`` (the same for every tensor here; a subclass
        with per-tensor rules, e.g. mergekit's filters and layer gradients, overrides this)."""
        return self


def canonical(key: str) -> str:
    return ALIASES.get(key, key)


def resolve(method: str, params: Sequence[Param], n: int, given: Dict[str, Any],
            per_model: Optional[List[Dict[str, Any]]] = None, where: str = "merge") -> Params:
    """Check and resolve ``given`` (name -> value or list of N) and ``per_model`` (one dict per
    ingredient, e.g. YAML ``models[i]`` keys) against ``params``; raise MergeError before any work."""
    by_name = {p.name: p for p in params}
    values: Dict[str, Any] = {}
    seen: List[str] = []
    for raw_key, value in given.items():
        key = canonical(raw_key)
        if key not in by_name:
            names = sorted(by_name)
            raise MergeError(
                f"{where}: method {method!r} has no parameter {raw_key!r}{suggest(key, names)}; "
                f"its parameters: {', '.join(names) or 'none'}"
            )
        if key in seen:
            raise MergeError(f"{where}: parameter {key!r} is given twice ({raw_key!r} and an alias)")
        seen.append(key)
        p = by_name[key]
        if not p.per_ingredient and isinstance(value, list) and p.kind in ("float", "int") and value:
            value = Gradient(value)  # a list for a one-value parameter: mergekit's gradient over the layers
        if isinstance(value, Rule):
            for j, leaf in enumerate(value.leaves()):
                p.check(leaf, f"{where}: {key}" + (f" (entry {j})" if len(value.leaves()) > 1 else ""))
            values[key] = tuple([value] * n) if p.per_ingredient else value
            continue
        if p.per_ingredient and isinstance(value, (list, tuple)) or (
            p.per_ingredient and hasattr(value, "shape") and getattr(value, "ndim", 0) == 1
        ):
            seq = list(value)
            if len(seq) != n:
                raise MergeError(f"{where}: {key} has {len(seq)} values but there are {n} ingredients (give one per ingredient or a scalar)")
            values[key] = tuple(p.check(v, f"{where}: {key}[{i}]") for i, v in enumerate(seq))
        else:
            if isinstance(value, (list, tuple)):
                raise MergeError(f"{where}: {key} takes one value{'' if not p.per_ingredient else ' or a list of N'}, got {value!r}")
            v = p.check(value.item() if hasattr(value, "item") and not isinstance(value, str) else value, f"{where}: {key}")
            values[key] = tuple([v] * n) if p.per_ingredient else v
    for i, entry in enumerate(per_model or []):
        for raw_key, value in entry.items():
            key = canonical(raw_key)
            p = by_name.get(key)
            if p is None or not p.per_ingredient:
                per = sorted(q.name for q in params if q.per_ingredient)
                raise MergeError(
                    f"{where}: models[{i}]: method {method!r} has no per-model parameter {raw_key!r}"
                    f"{suggest(key, per)}; per-model parameters: {', '.join(per) or 'none'}"
                )
            if isinstance(value, Rule):
                for j, leaf in enumerate(value.leaves()):
                    p.check(leaf, f"{where}: models[{i}].{key}" + (f" (entry {j})" if len(value.leaves()) > 1 else ""))
                v = value
            else:
                v = p.check(value, f"{where}: models[{i}].{key}")
            cur = list(values.get(key, (p.default,) * n))
            if key in given or raw_key in given:
                raise MergeError(f"{where}: {key} is given both at the top level and in models[{i}]")
            cur[i] = v
            values[key] = tuple(cur)
            if key not in seen:
                seen.append(key)
    for p in params:
        if p.name not in values:
            values[p.name] = tuple([p.default] * n) if p.per_ingredient else p.default
    if has_rules(values):
        return RuleParams(method, values, seen, params, where)
    return Params(method, values, seen)


# ---------------------------------------------------------------------------- per-tensor values
#
# mergekit's parameter settings: a scalar; a list of numbers interpolated over the layer index
# (a gradient); a list of ``{filter: NAME, value: ...}`` rules matched against the tensor name in
# order ("*" or no filter matches every tensor; no match falls through to the next scope); and
# scopes searched in order (a model's own parameters, then the top-level ones: ``Chain``).
# ``resolve`` accepts these objects as values; a Params holding any is a ``RuleParams``, whose
# ``for_tensor`` evaluates them for one tensor, checks each value with its Param's range and
# runs the method's cross-parameter checks, every error naming the tensor and the key.

import re as _re

#: the layer index in a tensor name: model.layers.N., transformer.h.N., encoder.layer.N., blocks.N.
LAYER_RE = _re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(name: str) -> Optional[int]:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


class Rule:
    """A setting that depends on the tensor (subclasses: Gradient, Filtered, Chain)."""

    def value(self, name: str, x: float, p: Param) -> Any:  # None: no match (next scope)
        raise NotImplementedError

    def leaves(self) -> List[Any]:
        raise NotImplementedError

    def to_yaml(self) -> Any:
        raise NotImplementedError


def evaluate(setting: Any, name: str, x: float, p: Param) -> Any:
    return setting.value(name, x, p) if isinstance(setting, Rule) else setting


class Gradient(Rule):
    """Numbers at evenly spaced layer positions x in [0, 1], linearly interpolated (mergekit's
    rule: value = interpolation of the list at x * (len - 1)); booleans/choices pick the entry
    int(x * (len - 1))."""

    def __init__(self, values: Sequence[Any]):
        self.values = tuple(values)

    def value(self, name: str, x: float, p: Param) -> Any:
        vals = self.values
        if not vals:
            return None
        if p.kind not in ("float", "int") or any(isinstance(v, bool) for v in vals):
            return vals[int(x * (len(vals) - 1))]
        fv = [float(v) for v in vals]
        scaled = x * (len(fv) - 1)
        i0 = int(scaled)
        i1 = min(len(fv) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * fv[i0] + frac * fv[i1]

    def leaves(self) -> List[Any]:
        return list(self.values)

    def to_yaml(self) -> Any:
        return list(self.values)

    def __repr__(self) -> str:
        return f"Gradient({list(self.values)!r})"


class Filtered(Rule):
    """``[(filter or None, setting), ...]``: the first whose filter is None, '*' or a substring of
    the tensor name gives the value; none matching falls through (None)."""

    def __init__(self, rules: Sequence[Tuple[Optional[str], Any]]):
        self.rules = tuple(rules)

    def value(self, name: str, x: float, p: Param) -> Any:
        for f, setting in self.rules:
            if f is None or f == "*" or (name and f in name):
                return evaluate(setting, name, x, p)
        return None

    def leaves(self) -> List[Any]:
        out: List[Any] = []
        for _, s in self.rules:
            out.extend(s.leaves() if isinstance(s, Rule) else [s])
        return out

    def to_yaml(self) -> Any:
        return [{**({"filter": f} if f is not None else {}), "value": s.to_yaml() if isinstance(s, Rule) else s}
                for f, s in self.rules]

    def __repr__(self) -> str:
        return f"Filtered({list(self.rules)!r})"


class Chain(Rule):
    """Scopes in precedence order (a model's own parameters, then the top-level ones)."""

    def __init__(self, settings: Sequence[Any]):
        self.settings = tuple(settings)

    def value(self, name: str, x: float, p: Param) -> Any:
        for s in self.settings:
            v = evaluate(s, name, x, p)
            if v is not None:
                return v
        return None

    def leaves(self) -> List[Any]:
        out: List[Any] = []
        for s in self.settings:
            out.extend(s.leaves() if isinstance(s, Rule) else [s])
        return out

    def to_yaml(self) -> Any:
        s = self.settings[0]
        return s.to_yaml() if isinstance(s, Rule) else s


class Required(Rule):
    """The end of a chain for a parameter without a default (mergekit's ``weight``): no value for a
    tensor is an error naming the tensor, the key and where it was looked for."""

    def __init__(self, key: str, where: str):
        self.key, self.where = key, where

    def value(self, name: str, x: float, p: Param) -> Any:
        raise MergeError(f"{self.where}: no {self.key} for tensor {name!r} (no filter rule matched it and there is "
                         f"no default; mergekit requires {self.key}: add a rule without a filter)")

    def leaves(self) -> List[Any]:
        return []

    def to_yaml(self) -> Any:
        return None


class RuleParams(Params):
    """Params whose values may depend on the tensor (``Rule`` values): ``for_tensor`` gives the
    plain Params of one tensor. ``bind(names)`` fixes the layer count (the largest layer index + 1
    among the tensor names) or explicit per-tensor layer positions; a layer tensor of layer i of
    L sits at x = i / (L - 1) (x = 1 when L == 1, as mergekit), every other tensor (embeddings,
    final norm, lm_head) at x = 0."""

    def __init__(self, method: str, values: Dict[str, Any], given: Sequence[str], specs: Sequence[Param],
                 where: str = "merge"):
        super().__init__(method, values, given)
        self.specs = tuple(specs)
        self.where = where
        self.checker = None  # f(Params, where): the method's cross-parameter checks
        self.num_layers: Optional[int] = None
        self.positions: Dict[str, float] = {}
        self._cache: Dict[str, Params] = {}

    def bind(self, names: Sequence[str], positions: Optional[Dict[str, float]] = None) -> "RuleParams":
        idx = [i for i in (layer_index(n) for n in names) if i is not None]
        self.num_layers = (max(idx) + 1) if idx else 0
        self.positions = dict(positions or {})
        self._cache.clear()
        return self

    def position(self, name: str) -> float:
        if name in self.positions:
            return self.positions[name]
        i = layer_index(name)
        if i is None:
            return 0.0
        L = self.num_layers if self.num_layers else i + 1
        return i / (L - 1) if L > 1 else 1.0

    def to_dict(self) -> dict:
        out = {}
        for k, v in self.values.items():
            if isinstance(v, tuple):
                out[k] = [x.to_yaml() if isinstance(x, Rule) else x for x in v]
            else:
                out[k] = v.to_yaml() if isinstance(v, Rule) else v
        return out

    def for_tensor(self, name: str, shape: tuple = ()) -> Params:
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        x = self.position(name)
        where = f"{self.where}: tensor {name!r}"
        values: Dict[str, Any] = {}
        for p in self.specs:
            v = self.values.get(p.name, p.default)
            if isinstance(v, tuple):
                got = []
                for i, e in enumerate(v):
                    r = evaluate(e, name, x, p)
                    got.append(p.default if r is None else p.check(r, f"{where}: models[{i}].{p.name}"))
                values[p.name] = tuple(got)
            else:
                r = evaluate(v, name, x, p)
                values[p.name] = p.default if r is None else p.check(r, f"{where}: {p.name}")
        out = Params(self.method, values, self.given)
        if self.checker is not None:
            self.checker(out, where)
        self._cache[name] = out
        return out

    def check_tensors(self, names: Sequence[str]) -> None:
        """Every tensor's values checked (before any tensor is read)."""
        for n in names:
            self.for_tensor(n)


def has_rules(values: Dict[str, Any]) -> bool:
    return any(isinstance(v, Rule) or (isinstance(v, tuple) and any(isinstance(e, Rule) for e in v))
               for v in values.values())
