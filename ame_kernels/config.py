"""AMEConfig: every hyperparameter of a merge, validated on construction.

Names follow torch.optim (``lr``, ``betas``, ``eps``, ``weight_decay``, ...).
``to_dict``/``from_dict`` round-trip through YAML-friendly plain values;
``from_dict`` also accepts values as people type them in YAML (``eps: 1e-8``
arrives as a string from a YAML 1.1 parser and is read as a float).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from .errors import MergeError, suggest

OPTIMIZERS = ("sgd", "adagrad", "adam", "adamw", "adadelta")
LR_SCHEDULES = ("constant", "harmonic", "power")
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
OUT_DTYPES = ("float32", "bfloat16", "float16")

#: lr used when ``lr`` is None: torch.optim's defaults, except GD, whose
#: natural AME step is 1 (the uniform soup is GD with lr 1).
DEFAULT_LR = {"sgd": 1.0, "adagrad": 1e-2, "adam": 1e-3, "adamw": 1e-3, "adadelta": 1.0}
#: eps used when ``eps`` is None: torch.optim's defaults.
DEFAULT_EPS = {"sgd": 0.0, "adagrad": 1e-10, "adam": 1e-8, "adamw": 1e-8, "adadelta": 1e-6}

ScheduleLike = Union[str, Sequence[float], Callable[[int], float]]
ScalarSchedule = Union[float, Sequence[float], Callable[[int], float]]


def _valid_choices(value: str, choices: Sequence[str]) -> str:
    return f"valid choices: {', '.join(map(repr, choices))}{suggest(value, choices)}"


def _as_float(name: str, value: Any) -> float:
    """Read a float as people type it: 1e-8 may arrive as the string '1e-8'."""
    if isinstance(value, bool):
        raise MergeError(f"AMEConfig.{name}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MergeError(f"AMEConfig.{name}: expected a number, got {value!r}") from None


def _is_scalar(value: Any) -> bool:
    """A single number: a Python/numpy number or a 0-dim array/tensor (not a string, not a bool)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Number):
        return True
    return getattr(value, "ndim", None) == 0 and not isinstance(value, (str, bytes))


def _as_finite(name: str, value: Any) -> float:
    v = _as_float(name, value)
    if not math.isfinite(v):
        raise MergeError(f"AMEConfig.{name}: must be a finite number, got {value!r}")
    return v


def _as_sequence(name: str, value: Any, what: str) -> tuple:
    """``value`` as a tuple of items; a lone number or a string is an error naming ``name``."""
    if isinstance(value, (str, bytes)) or _is_scalar(value) or isinstance(value, bool):
        raise MergeError(f"AMEConfig.{name}: expected {what}, got {value!r}")
    try:
        return tuple(value)
    except TypeError:
        raise MergeError(f"AMEConfig.{name}: expected {what}, got {type(value).__name__} {value!r}") from None


#: torch.Generator.manual_seed accepts seeds in [-2**63, 2**64).
_SEED_RANGE = (-(2**63), 2**64 - 1)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise MergeError(f"AMEConfig.{name}: expected an integer, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise MergeError(f"AMEConfig.{name}: expected an integer, got {value!r}") from None
    if not f.is_integer():
        raise MergeError(f"AMEConfig.{name}: expected an integer, got {value!r}")
    return int(f)


def as_bool(name: str, value: Any) -> bool:
    """A boolean option as people write it (true/yes/on/1, false/no/off/0); a MergeError naming ``name`` otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise MergeError(f"AMEConfig.{name}: expected true/false, got {value!r}")


@dataclass(frozen=True)
class AMEConfig:
    """Hyperparameters of one AME merge (defaults follow the AME paper's setup).

    optimizer: 'sgd' (GD; momentum, dampening, nesterov), 'adagrad' (lr_decay,
        initial_accumulator_value), 'adam' / 'adamw' (betas, eps, amsgrad),
        'adadelta' (rho, eps). Default 'sgd'.
    lr: base learning rate; None takes DEFAULT_LR[optimizer] (sgd 1, adagrad
        1e-2, adam/adamw 1e-3, adadelta 1).
    lr_schedule: 'harmonic' (lr/t, the paper's default), 'constant', 'power'
        (lr * t**lr_power), a sequence with one lr per step, or a callable of t.
    amplification: zeta_t, a scalar (default 1), a per-step sequence or a callable of t.
    weight_decay: torch's meaning per optimizer (coupled L2; AdamW decoupled). Default 0
        for every optimizer, AdamW included (torch's AdamW default of 1e-2 would
        shrink the merged weights).
    epochs, batch_size: passes over the ingredients and ingredients per step (1, 1).
    shuffle, seed: a fresh seeded permutation per epoch (off, 0).
    pivot: 'soup' (fp32 uniform mean, default), an ingredient index, or an explicit
        tensor / state dict; adaptive_pivot: p_t = w_{t-1} (True, eq. 5) or w_0 (eq. 4).
    order / scores, descending: ingredient order (a permutation) or scores to sort by
        (stable, descending by default).
    eps_inside_sqrt: the paper's printed Adam/Adagrad variant sqrt(v + eps); default
        False = torch.optim's sqrt(v) + eps.
    out_dtype: 'float32', 'bfloat16', 'float16' or None (the first ingredient's dtype).
    backend: 'auto', 'reference', 'cpu', 'triton', 'cuda'; threads: CPU threads
        (None: torch.get_num_threads() or the core count).
    check_finite: raise on NaN/Inf in an ingredient (default True).
    """

    optimizer: str = "sgd"
    lr: Optional[float] = None
    lr_schedule: Any = "harmonic"
    lr_power: float = -1.0
    amplification: Any = 1.0
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: Optional[float] = None
    amsgrad: bool = False
    rho: float = 0.9
    epochs: int = 1
    batch_size: int = 1
    shuffle: bool = False
    seed: int = 0
    pivot: Any = "soup"
    adaptive_pivot: bool = True
    order: Optional[tuple] = None
    scores: Optional[tuple] = None
    descending: bool = True
    eps_inside_sqrt: bool = False
    out_dtype: Optional[str] = None
    backend: str = "auto"
    threads: Optional[int] = None
    check_finite: bool = True

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass normalisation)
        opt = str(self.optimizer).lower()
        if opt not in OPTIMIZERS:
            raise MergeError(f"AMEConfig.optimizer: unknown optimizer {self.optimizer!r}; {_valid_choices(opt, OPTIMIZERS)}")
        set_("optimizer", opt)
        if self.lr is not None:
            lr = _as_float("lr", self.lr)
            if not (lr > 0 and math.isfinite(lr)):
                raise MergeError(f"AMEConfig.lr: must be a finite number > 0, got {self.lr!r}")
            set_("lr", lr)
        if isinstance(self.lr_schedule, str):
            kind = self.lr_schedule.lower()
            if kind not in LR_SCHEDULES:
                raise MergeError(
                    f"AMEConfig.lr_schedule: unknown schedule {self.lr_schedule!r}; {_valid_choices(kind, LR_SCHEDULES)}"
                )
            set_("lr_schedule", kind)
        elif _is_scalar(self.lr_schedule):
            raise MergeError(
                f"AMEConfig.lr_schedule: got the number {self.lr_schedule!r}; a schedule is 'constant', 'harmonic', "
                "'power', a per-step sequence or a callable of t (for a fixed learning rate: "
                f"lr={self.lr_schedule!r}, lr_schedule='constant')"
            )
        elif not callable(self.lr_schedule):
            seq = _as_sequence("lr_schedule", self.lr_schedule, "'constant', 'harmonic', 'power', a per-step sequence or a callable")
            set_("lr_schedule", tuple(_as_float("lr_schedule", v) for v in seq))
        if callable(self.amplification):
            pass
        elif _is_scalar(self.amplification) or isinstance(self.amplification, str):
            set_("amplification", _as_finite("amplification", self.amplification))
        else:
            seq = _as_sequence("amplification", self.amplification, "a number, a per-step sequence or a callable")
            set_("amplification", tuple(_as_float("amplification", v) for v in seq))
        for name in ("lr_power", "weight_decay", "momentum", "dampening", "lr_decay", "initial_accumulator_value", "rho"):
            set_(name, _as_finite(name, getattr(self, name)))
        for name in ("nesterov", "shuffle", "adaptive_pivot", "descending", "eps_inside_sqrt", "amsgrad", "check_finite"):
            set_(name, as_bool(name, getattr(self, name)))
        for name in ("epochs", "batch_size", "seed"):
            set_(name, _as_int(name, getattr(self, name)))
        if not _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]:
            raise MergeError(f"AMEConfig.seed: must be in [-2**63, 2**64) (torch.Generator's range), got {self.seed}")
        if self.epochs < 1:
            raise MergeError(f"AMEConfig.epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise MergeError(f"AMEConfig.batch_size: must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise MergeError(f"AMEConfig.weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.momentum <= 1.0:
            raise MergeError(f"AMEConfig.momentum: must be in [0, 1], got {self.momentum}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise MergeError("AMEConfig.nesterov: requires momentum > 0 and dampening = 0 (as torch.optim.SGD)")
        if self.lr_decay < 0:
            raise MergeError(f"AMEConfig.lr_decay: must be >= 0, got {self.lr_decay}")
        if self.initial_accumulator_value < 0:
            raise MergeError(f"AMEConfig.initial_accumulator_value: must be >= 0, got {self.initial_accumulator_value}")
        if not 0.0 <= self.rho <= 1.0:
            raise MergeError(f"AMEConfig.rho: must be in [0, 1], got {self.rho}")
        betas = tuple(_as_float("betas", b) for b in _as_sequence("betas", self.betas, "two numbers (beta1, beta2)"))
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise MergeError(f"AMEConfig.betas: expected two numbers in [0, 1), got {self.betas!r}")
        set_("betas", betas)
        if self.eps is not None:
            eps = _as_float("eps", self.eps)
            if not (eps >= 0 and math.isfinite(eps)):
                raise MergeError(f"AMEConfig.eps: must be a finite number >= 0, got {self.eps!r}")
            set_("eps", eps)
        if self.order is not None and self.scores is not None:
            raise MergeError("AMEConfig: give either order or scores, not both")
        if self.order is not None:
            set_("order", tuple(_as_int("order", i) for i in _as_sequence("order", self.order, "a permutation of the ingredient indices")))
        if self.scores is not None:
            scores = tuple(_as_float("scores", s) for s in _as_sequence("scores", self.scores, "one score per ingredient"))
            if any(math.isnan(s) for s in scores):  # NaN has no place in a sort; +-inf sorts fine
                raise MergeError(f"AMEConfig.scores: a score is NaN, so the order is undefined: {list(scores)}")
            set_("scores", scores)
        if self.out_dtype is not None:
            od = str(self.out_dtype).replace("torch.", "")
            od = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(od, od)
            if od not in OUT_DTYPES:
                raise MergeError(f"AMEConfig.out_dtype: unknown dtype {self.out_dtype!r}; {_valid_choices(od, OUT_DTYPES)}")
            set_("out_dtype", od)
        if isinstance(self.backend, str):
            set_("backend", self.backend.lower())
        if self.backend not in BACKENDS:
            raise MergeError(f"AMEConfig.backend: unknown backend {self.backend!r}; {_valid_choices(str(self.backend), BACKENDS)}")
        if self.threads is not None:
            threads = _as_int("threads", self.threads)
            if threads < 1:
                raise MergeError(f"AMEConfig.threads: must be >= 1, got {self.threads}")
            set_("threads", threads)
        if isinstance(self.pivot, str) and self.pivot != "soup":
            try:
                set_("pivot", _as_int("pivot", self.pivot))
            except MergeError:
                raise MergeError(
                    f"AMEConfig.pivot: expected 'soup', an ingredient index or a tensor/state dict, got {self.pivot!r}"
                ) from None
        if isinstance(self.pivot, numbers.Integral) and not isinstance(self.pivot, bool):
            set_("pivot", int(self.pivot))  # numpy integers (e.g. np.argmax(scores)) included
        if isinstance(self.pivot, bool) or (isinstance(self.pivot, numbers.Real) and not isinstance(self.pivot, int)):
            raise MergeError(f"AMEConfig.pivot: expected 'soup', an ingredient index or a tensor/state dict, got {self.pivot!r}")

    # -- resolved values ---------------------------------------------------
    @property
    def resolved_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    @property
    def resolved_eps(self) -> float:
        return DEFAULT_EPS[self.optimizer] if self.eps is None else self.eps

    def replace(self, **overrides: Any) -> "AMEConfig":
        return dataclasses.replace(self, **check_field_names(overrides))

    # -- YAML-friendly round trip -------------------------------------------
    def to_dict(self) -> dict:
        """Plain values only; callables and tensors cannot be serialised and raise."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if callable(v) or hasattr(v, "shape") or isinstance(v, dict):
                raise MergeError(f"AMEConfig.to_dict: field {f.name!r} holds a {type(v).__name__}, which has no plain form")
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "AMEConfig":
        return cls(**check_field_names(dict(d)))


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(AMEConfig))


def check_field_names(d: dict) -> dict:
    """Reject unknown keys, naming each and the closest valid field."""
    for key in d:
        if key not in FIELD_NAMES:
            raise MergeError(f"AMEConfig: unknown option {key!r}; {_valid_choices(key, FIELD_NAMES)}")
    return d


def resolve_config_path(p: Any, base: str, what: str, error: type = MergeError) -> str:
    """A path written in a config file at ``base``: relative ones are taken beside the config
    first (a missing one is reported with that path), else from the working directory."""
    if not isinstance(p, str) or not p.strip():
        raise error(f"{what}: expected a path, got {p!r}")
    p = os.path.expanduser(p)
    if os.path.isabs(p):
        return p
    beside = os.path.join(base, p)
    return os.path.abspath(beside if os.path.exists(beside) or not os.path.exists(p) else p)


class _DuplicateKey(Exception):
    pass


_LOADER = None


def _unique_key_loader():
    """The bounded YAML loader (``io.yaml_bounded``: alias bombs, deep nesting and huge values are
    refused before anything is built) refusing a key given twice in one mapping (PyYAML keeps the
    last one silently, so a config with two 'lr:' lines would merge with the second without a word)."""
    global _LOADER
    if _LOADER is None:
        from .io.yaml_bounded import bounded_loader

        class UniqueKeyLoader(bounded_loader()):
            def construct_mapping(self, node, deep=False):
                seen = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges, not a key
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise _DuplicateKey(f"duplicate key {_brief(key)} at line {line} (first at line {seen[key]})")
                        seen[key] = line
                    except TypeError:  # an unhashable key: reported by the caller
                        continue
                return super().construct_mapping(node, deep=deep)

        _LOADER = UniqueKeyLoader
    return _LOADER


def _brief(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...'"


def read_yaml(path: str, error: type = MergeError) -> Any:
    """The YAML document in ``path``; a missing file or bad YAML raises ``error`` naming the file
    (and the line and column of a syntax error). Torch-free: the CLI reads configs with it.

    Hostile files are errors too, never a hang, a traceback or an exhausted machine: a FIFO or
    device (opened without blocking, refused), a file over ``io.yaml_bounded.MAX_FILE_BYTES``,
    bytes that are not UTF-8, and documents beyond the bounded loader's limits (alias bombs,
    nesting deeper than 64 levels, huge integers)."""
    import stat

    import yaml

    from .io.yaml_bounded import MAX_FILE_BYTES, YAMLLimitError

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise error(f"{path}: not a regular file (a FIFO, socket or device); a config must be a YAML file")
            if st.st_size > MAX_FILE_BYTES:
                raise error(f"{path}: the config file has {st.st_size} bytes (at most {MAX_FILE_BYTES})")
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise error(f"{path}: the config file has more than {MAX_FILE_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise error(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line})") from None
        return yaml.load(text, Loader=_unique_key_loader())
    except MergeError:  # ours, above (a ValueError: not to be caught below)
        raise
    except _DuplicateKey as e:
        raise error(f"{path}: {e}") from None
    except YAMLLimitError as e:
        raise error(f"{path}: config refused: {e}") from None
    except FileNotFoundError:
        raise error(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, expected a YAML config file") from None
    except OSError as e:
        raise error(f"{path}: cannot read the config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = str(getattr(e, "problem", None) or str(e).splitlines()[0])
        problem = problem if len(problem) <= 200 else problem[:195] + " ..."
        raise error(f"{path}: invalid YAML{where}: {problem}") from None
    except (RecursionError, ValueError, OverflowError) as e:  # a value PyYAML's constructors cannot build
        raise error(f"{path}: invalid YAML: {type(e).__name__}: {_brief(str(e), 200)}") from None


def make_config(config: Optional[AMEConfig] = None, **overrides: Any) -> AMEConfig:
    """``config`` with ``overrides`` applied (a fresh default config when None)."""
    if config is None:
        return AMEConfig(**check_field_names(overrides))
    if isinstance(config, dict):
        return AMEConfig.from_dict({**config, **overrides})
    if not isinstance(config, AMEConfig):
        raise MergeError(f"merge: config must be an AMEConfig or a dict, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config
