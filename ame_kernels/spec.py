"""The merge config file (YAML): read and checked in one place for the CLI, strategies and inspect.

    method: ties                 # any of ak.methods(); absent: ame when an AME option is
    base: path/to/base           #   given (optimizer, lr, ...), else the uniform soup
    models:
      - path: a/                 # a folder or file; per-model parameters beside it:
        weight: 0.6              #   weight, density, gamma, epsilon (per the method), score
        density: 0.5
      - b/
    lambda: 1.0                  # the method's global parameters
    out_dtype: bfloat16          # general options: out_dtype, backend, threads, check_finite
    shard_size: 5GB              # engine keys: device, chunk_mb, shard_size

AME configs keep their keys (``pivot``, every ``AMEConfig`` field, per-model ``score``);
``strategy:`` names an in-memory strategy (greedy, stew, greedy_soup) or a soup
(uniform_soup, weighted_soup), which run as the ``linear`` / ``task_arithmetic`` methods.
Every key is checked here, before any checkpoint is opened: an unknown key is an error
naming the file and the closest valid key, never ignored.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .config import FIELD_NAMES, AMEConfig, read_yaml, resolve_config_path
from .errors import MergeError, suggest

ENGINE_KEYS = ("device", "chunk_mb", "shard_size")
STRATEGIES = ("greedy", "stew", "greedy_soup", "uniform_soup", "weighted_soup")
#: keys of the in-memory strategies (strategies.py)
STRATEGY_KEYS = ("strategy", "evaluate", "start", "mode")
#: soups that are merge methods on the streaming engine: strategy -> method
SOUP_STRATEGIES = ("uniform_soup", "weighted_soup")


class UsageError(MergeError):
    """Bad usage or config: exit code 2."""


class MergekitOnly(UsageError):
    """A valid mergekit config or flag using a feature mergekit has and this engine lacks
    (``mergekit-yaml`` may hand such a run to mergekit: ame_merge_entry.mergekit_yaml_main)."""


def method_param_names() -> tuple:
    from .methods import METHODS
    from .methods.params import ALIASES

    names = {q.name for m in METHODS.values() for q in m.params}
    return tuple(sorted(names | set(ALIASES)))


def per_model_param_names() -> tuple:
    from .methods import METHODS

    return tuple(sorted({q.name for m in METHODS.values() for q in m.params if q.per_ingredient} | {"weights"}))




@dataclass
class MergeSpec:
    """What a config file asks for, paths resolved and every key checked."""

    source: str
    models: List[str]
    method: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)  # method parameters, AME fields, general options
    per_model: List[Dict[str, Any]] = field(default_factory=list)
    base: Optional[str] = None
    pivot_path: Optional[str] = None
    engine: Dict[str, Any] = field(default_factory=dict)
    strategy: Optional[str] = None
    strategy_keys: Dict[str, Any] = field(default_factory=dict)
    folder: str = ""
    #: which schema read the file: 'ame' (this module) or 'mergekit' (a file with merge_method:)
    schema: str = "ame"
    #: a folder whose tokenizer files replace the copied ones (mergekit's tokenizer_source)
    tokenizer_from: Optional[str] = None
    #: lines for --dry-run (the schema used, keys without effect)
    notes: List[str] = field(default_factory=list)

    @property
    def config(self) -> AMEConfig:
        """The AMEConfig of an AME or in-memory strategy config (general options only otherwise)."""
        from .config import FIELD_NAMES as F

        return AMEConfig.from_dict({k: v for k, v in self.options.items() if k in F})


def check_finite_value(value: Any, what: str) -> None:
    """NaN or Inf, typed as .nan / .inf / "nan" / "inf" (alone or in a list), is an error naming the key.

    No option takes them, and one slipping through would surface only mid-merge (a kernel refusing
    the coefficient) or as a silently wrong order (a NaN score)."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError, OverflowError):
            continue
        if not math.isfinite(f):
            raise UsageError(f"{what}: must be a finite number, got {v!r}")


def _resolve(p: Any, folder: str, what: str) -> str:
    return resolve_config_path(p, folder, what, UsageError)


def _path_value(value: Any, path: str, key: str) -> Any:
    if isinstance(value, dict):
        if set(value) != {"path"}:
            raise UsageError(f"{path}: {key}: expected a path or {{path: ...}}, got {value!r}")
        value = value["path"]
    return value


def load_spec(path: str) -> MergeSpec:
    """Read and check a config file; raises UsageError naming the file and key at fault."""
    doc = read_yaml(path, UsageError)
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: expected a mapping with a 'models:' list, got {type(doc).__name__}")
    if "merge_method" in doc:  # mergekit's schema (ame_kernels/mergekit_schema.py)
        from .mergekit_schema import load_mergekit

        return load_mergekit(doc, path)
    params = method_param_names()
    top = ("models", "method", "base", "pivot", "transform") + ENGINE_KEYS + STRATEGY_KEYS + tuple(
        f for f in FIELD_NAMES if f != "pivot") + params
    for key in doc:
        if key not in top:
            from .mergekit_schema import TOP_KEYS as MK_KEYS

            if key in MK_KEYS:  # a mergekit config that lost its merge_method line
                raise UsageError(f"{path}: unknown key {key!r} (a key of mergekit's schema: a mergekit config "
                                 "needs 'merge_method:', e.g. merge_method: linear)")
            raise UsageError(f"{path}: unknown key {key!r}{suggest(key, top)}")
    for key, value in doc.items():
        if key != "models":
            check_finite_value(value, f"{path}: {key}")
    folder = os.path.dirname(os.path.abspath(path))
    spec = MergeSpec(path, [], folder=folder)
    strategy = doc.get("strategy")
    if strategy not in (None, "ame"):
        if strategy not in STRATEGIES:
            raise UsageError(f"{path}: strategy: expected one of {', '.join(STRATEGIES)} (or 'ame'), got {strategy!r}"
                             f"{suggest(strategy, STRATEGIES)}")
        spec.strategy = strategy
    spec.strategy_keys = {k: doc[k] for k in STRATEGY_KEYS if k in doc and k != "strategy"}
    if spec.strategy_keys and spec.strategy not in ("greedy", "stew", "greedy_soup"):
        k = next(iter(spec.strategy_keys))
        raise UsageError(f"{path}: {k!r} is a key of strategies greedy, stew and greedy_soup, and this config "
                         f"names {'no strategy' if spec.strategy is None else 'strategy ' + repr(spec.strategy)}")
    if spec.strategy in ("greedy", "greedy_soup") and "evaluate" not in spec.strategy_keys:
        raise UsageError(f"{path}: strategy {spec.strategy!r} needs 'evaluate: module:function' "
                         "(candidate state dict -> score)")
    models_raw = doc.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise UsageError(f"{path}: 'models' must be a non-empty list of {{path: ..., score: ...}} entries")
    model_keys = ("path", "score") + per_model_param_names()
    scores = []
    for i, m in enumerate(models_raw):
        if isinstance(m, str):
            m = {"path": m}
        if not isinstance(m, dict):
            raise UsageError(f"{path}: models[{i}]: expected a mapping with 'path', got {m!r}")
        for key in m:
            if key not in model_keys:
                raise UsageError(f"{path}: models[{i}]: unknown key {key!r}{suggest(key, model_keys)}")
        if "path" not in m:
            raise UsageError(f"{path}: models[{i}]: missing 'path'")
        spec.models.append(_resolve(m["path"], folder, f"{path}: models[{i}].path"))
        for key, value in m.items():
            if key != "path":
                check_finite_value(value, f"{path}: models[{i}].{key}")
        scores.append(m.get("score"))
        spec.per_model.append({k: v for k, v in m.items() if k not in ("path", "score")})
    options = {k: v for k, v in doc.items() if k in FIELD_NAMES or k in params or k == "transform"}
    options.pop("pivot", None)
    given = [s is not None for s in scores]
    if any(given):
        if not all(given):
            missing = [i for i, g in enumerate(given) if not g]
            raise UsageError(f"{path}: models{missing}: missing 'score' (give a score to every model or to none)")
        if "scores" in options:
            raise UsageError(f"{path}: give scores either per model or as 'scores:', not both")
        options["scores"] = scores
    if "pivot" in doc:
        pivot = _path_value(doc["pivot"], path, "pivot")
        if isinstance(pivot, bool) or pivot is None:
            raise UsageError(f"{path}: pivot: expected 'soup', a model index or a checkpoint path, got {pivot!r}")
        if isinstance(pivot, str) and pivot.strip() != "soup" and not pivot.strip().lstrip("-").isdigit():
            if spec.strategy is not None:
                raise UsageError(f"{path}: pivot: strategies take 'soup' or a model index, got {pivot!r}")
            spec.pivot_path = _resolve(pivot, folder, f"{path}: pivot")
        else:
            options["pivot"] = pivot
    if "base" in doc:
        spec.base = _resolve(_path_value(doc["base"], path, "base"), folder, f"{path}: base")
    spec.method = doc.get("method")
    if spec.strategy in SOUP_STRATEGIES:
        _soup_as_method(spec, options, path)
    spec.options = options
    spec.engine = {k: doc[k] for k in ENGINE_KEYS if k in doc}
    _check_engine(spec.engine, path)
    check_call(spec)
    return spec


def _soup_as_method(spec: MergeSpec, options: dict, path: str) -> None:
    """strategy: uniform_soup / weighted_soup -> the linear or task_arithmetic method (streamed)."""
    if spec.method is not None:
        raise UsageError(f"{path}: give either strategy: {spec.strategy} or method: {spec.method}, not both")
    if spec.strategy == "uniform_soup":
        if spec.base is not None or any(spec.per_model) or set(options) - {"out_dtype", "backend", "threads", "check_finite"}:
            raise UsageError(f"{path}: strategy uniform_soup takes no weights, base or AME options "
                             "(for weights use strategy: weighted_soup or method: linear)")
        spec.method = "linear"
    else:
        if "weight" not in options and "weights" not in options and not any("weight" in m for m in spec.per_model):
            raise UsageError(f"{path}: strategy 'weighted_soup': needs 'weights: [a_1, ..., a_N]'")
        normalize = options.get("normalize", True)
        # base + sum a_i (x_i - base) without normalisation: task arithmetic; with it the base cancels
        spec.method = "task_arithmetic" if (spec.base is not None and normalize is False) else "linear"
        if spec.method == "linear" and spec.base is not None:
            raise UsageError(f"{path}: weighted_soup with normalize: true has no use for base: (the base cancels "
                             "in sum a_i x_i / sum a_i); drop base, or set normalize: false for base + sum a_i (x_i - base)")
        if spec.method == "task_arithmetic":
            options.setdefault("normalize", False)
    spec.strategy = None


def _check_engine(engine: dict, path: str) -> None:
    """chunk_mb, shard_size and device of a config file, each error naming the file and the key."""
    from .engine import parse_size

    if "chunk_mb" in engine:
        v = float_arg(engine["chunk_mb"], f"{path}: chunk_mb")
        if not v > 0:
            raise UsageError(f"{path}: chunk_mb: must be a number > 0, got {engine['chunk_mb']!r}")
        engine["chunk_mb"] = v
    if "shard_size" in engine:
        try:
            engine["shard_size"] = parse_size(engine["shard_size"], f"{path}: shard_size")
        except MergeError as e:
            raise UsageError(str(e)) from None
    if "device" in engine and not isinstance(engine["device"], str):
        raise UsageError(f"{path}: device: expected 'cpu', 'cuda' or 'cuda:N', got {engine['device']!r}")


def float_arg(value: Any, what: str) -> float:
    if isinstance(value, bool):  # YAML's true/yes/on
        raise UsageError(f"{what}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what}: expected a number, got {value!r}") from None


def check_call(spec: MergeSpec, overrides: Optional[dict] = None):
    """The method and its options checked as the merge will check them (UsageError naming the file)."""
    from .methods import split_call

    if spec.strategy is not None:  # the in-memory strategies take AMEConfig fields
        try:
            return AMEConfig.from_dict({**{k: v for k, v in spec.options.items() if k in FIELD_NAMES},
                                        **(overrides or {})})
        except MergeError as e:
            raise UsageError(f"{spec.source}: {e}") from None
    opts = {**spec.options, **(overrides or {})}
    try:
        call = split_call(spec.method, opts, len(spec.models), spec.base is not None, False, spec.per_model,
                          where=spec.source)
        if call.name == "ame":
            AMEConfig.from_dict(call.ame_options)
        else:
            AMEConfig.from_dict(call.general)
    except MergeError as e:
        msg = str(e)
        raise UsageError(msg if msg.startswith(spec.source) else f"{spec.source}: {msg}") from None
    if call.name != "ame" and spec.pivot_path is not None:
        raise UsageError(f"{spec.source}: pivot: method {call.name!r} has no pivot (a task-vector method takes base: PATH)")
    return call
