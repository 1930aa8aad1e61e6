"""Method parameters: declared once per method, checked before any work, resolved per ingredient.

A ``Param`` says a parameter's type, range, default, and whether it is given per
ingredient (a scalar for all, or a list of N). ``resolve`` turns what a caller passed
(keyword arguments, YAML keys, per-model YAML entries) into a ``Params`` object, or
raises a MergeError naming the key and value, with the closest valid name for a typo.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import MergeError

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


def suggest(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
    return Params(method, values, seen)
