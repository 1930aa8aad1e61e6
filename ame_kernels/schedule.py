"""The host schedule: one StepPlan per merge, consumed by every backend.

All per-step scalars are derived here, once, so no backend re-derives t, the
batch members, lr_t, zeta_t or a bias correction (and none can disagree).

Kernel coefficient table ``coeffs`` (float32 ``[T, 4]``, computed in float64):

====  ==============  =========================================================
col   name            meaning
====  ==============  =========================================================
0     ``gscale``      gscale_t = zeta_t / (N * |B_t|)  (DESIGN 1.4); the kernels form
                      g_t = fp32(gscale_t * |B_t|) * (p_t - mean_{B_t} x), the batch
                      mean summed in ascending index (backends/base.py, "Batch mean")
1     ``lr_eff``      sgd, adadelta: lr_t; adagrad: lr_t / (1 + (t-1) lr_decay);
                      adam, adamw: lr_t / (1 - beta1^t)
2     ``decay``       adamw: 1 - lr_t * weight_decay (decoupled); else 1
3     ``inv_bc2_sqrt`` adam, adamw: 1 / sqrt(1 - beta2^t); else 1
====  ==============  =========================================================

Scalar hyperparameters (same for every step) are in ``StepPlan.hyper``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .config import OPTIMIZERS, AMEConfig
from .errors import MergeError

#: kernel codes: the position in config.OPTIMIZERS (csrc/common/dispatch.h optimizer_name agrees)
OPTIMIZER_CODES = {name: code for code, name in enumerate(OPTIMIZERS)}
COEFF_COLUMNS = ("gscale", "lr_eff", "decay", "inv_bc2_sqrt")


@dataclass(frozen=True)
class Hyper:
    """Scalar hyperparameters a kernel needs, already resolved (no None)."""

    optimizer: str
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float  # coupled L2 (grad += wd * w); 0 for adamw, whose decay is in coeffs
    beta1: float
    beta2: float
    eps: float
    rho: float
    amsgrad: bool
    eps_inside_sqrt: bool
    initial_accumulator_value: float
    # Folded into plan.coeffs for the kernels; kept so torch.optim (the reference) gets them.
    lr_decay: float = 0.0
    adamw_weight_decay: float = 0.0

    @property
    def code(self) -> int:
        return OPTIMIZER_CODES[self.optimizer]

    @property
    def state_slots(self) -> int:
        """fp32 state buffers per element: sgd 1 if momentum else 0; adagrad 1;
        adam/adamw 2 (+1 max_exp_avg_sq with amsgrad); adadelta 2."""
        return {
            "sgd": 1 if self.momentum != 0 else 0,
            "adagrad": 1,
            "adam": 3 if self.amsgrad else 2,
            "adamw": 3 if self.amsgrad else 2,
            "adadelta": 2,
        }[self.optimizer]

    def initial_state(self) -> list:
        """Initial value of each state slot (all zero except Adagrad's accumulator)."""
        if self.optimizer == "adagrad":
            return [self.initial_accumulator_value]
        return [0.0] * self.state_slots


@dataclass(frozen=True)
class StepPlan:
    """Everything per step, for N ingredients and T steps.

    batch_ptr: int32 [T+1]; step t (0-based row t-1) uses ingredients
        batch_idx[batch_ptr[t-1]:batch_ptr[t]] (int32 indices in [0, N)).
    lr, zeta: float64 [T], the schedules as the user defined them.
    coeffs: float32 [T, 4], see the module docstring.
    """

    n: int
    hyper: Hyper
    order: tuple
    batch_ptr: np.ndarray
    batch_idx: np.ndarray
    lr: np.ndarray
    zeta: np.ndarray
    coeffs: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.lr.shape[0])

    def batch(self, t: int) -> list:
        """0-based ingredient indices of step t (1-based, as in the paper), in the order drawn."""
        return [int(i) for i in self.batch_idx[self.batch_ptr[t - 1] : self.batch_ptr[t]]]

    def summation_idx(self) -> np.ndarray:
        """``batch_idx`` with each step's members sorted ascending (int32): the order in which
        every backend sums a batch mean (backends/base.py, "Batch mean"), the soup's order."""
        idx = np.array(self.batch_idx, dtype=np.int32, copy=True)
        for t in range(self.steps):
            lo, hi = int(self.batch_ptr[t]), int(self.batch_ptr[t + 1])
            if hi - lo > 1:
                idx[lo:hi].sort()
        return idx


def resolve_hyper(config: AMEConfig) -> Hyper:
    b1, b2 = config.betas
    return Hyper(
        optimizer=config.optimizer,
        momentum=config.momentum,
        dampening=config.dampening,
        nesterov=config.nesterov,
        weight_decay=0.0 if config.optimizer == "adamw" else config.weight_decay,
        beta1=b1,
        beta2=b2,
        eps=config.resolved_eps,
        rho=config.rho,
        amsgrad=config.amsgrad,
        eps_inside_sqrt=config.eps_inside_sqrt,
        initial_accumulator_value=config.initial_accumulator_value,
        lr_decay=config.lr_decay,
        adamw_weight_decay=config.weight_decay if config.optimizer == "adamw" else 0.0,
    )


def ingredient_order(config: AMEConfig, n: int) -> list:
    """The base order: given, sorted by scores (stable), or 0..n-1."""
    if config.order is not None:
        if sorted(config.order) != list(range(n)):
            raise MergeError(f"AMEConfig.order: expected a permutation of 0..{n - 1}, got {list(config.order)}")
        return list(config.order)
    if config.scores is not None:
        if len(config.scores) != n:
            raise MergeError(f"AMEConfig.scores: expected {n} scores (one per ingredient), got {len(config.scores)}")
        # Python's sort is stable also with reverse=True: ties keep their given order.
        return sorted(range(n), key=lambda i: config.scores[i], reverse=config.descending)
    return list(range(n))


def randperms(seed: int, n: int, count: int) -> list:
    """``count`` successive ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` draws,
    without importing torch: torch's CPU generator is MT19937 seeded with the low 32 bits of the seed
    (the standard init_genrand, as numpy's legacy seeding), and its randperm swaps r[i] with
    r[i + u % (n - i)] for i = 0..n-2, u one 32-bit draw each (tests/test_reference.py checks the
    equality against torch)."""
    bg = np.random.MT19937()
    bg._legacy_seeding(int(seed) & 0xFFFFFFFF)
    out = []
    for _ in range(count):
        r = list(range(n))
        draws = bg.random_raw(max(n - 1, 0)) if n > 1 else []
        for i in range(n - 1):
            z = int(draws[i]) % (n - i)
            r[i], r[i + z] = r[i + z], r[i]
        out.append(r)
    return out


def epoch_orders(config: AMEConfig, n: int) -> list:
    """One order per epoch; with shuffle, exactly the torch.randperm recipe of the API contract
    (``randperms``, so shuffling does not import torch)."""
    base = ingredient_order(config, n)
    if not config.shuffle:
        return [base] * config.epochs
    return [[base[j] for j in perm] for perm in randperms(config.seed, n, config.epochs)]


def call_schedule(name: str, fn: Callable[[int], Any], t: int) -> float:
    """``float(fn(t))`` for a user's per-step callable; whatever it raises or returns that is not a
    number becomes a MergeError naming the option and the step."""
    try:
        value = fn(t)
    except Exception as e:  # noqa: BLE001 (the user's code: any failure is reported the same way)
        raise MergeError(f"{name}: the callable raised {type(e).__name__} at t={t}: {e}") from e
    try:
        if isinstance(value, bool):
            raise TypeError("a bool")
        return float(value)
    except (TypeError, ValueError):
        raise MergeError(f"{name}: the callable returned {value!r} at t={t}, not a number") from None


def _per_step(name: str, spec: Any, steps: int, default: Callable[[int], float], first: int = 1) -> np.ndarray:
    """Expand a scalar / sequence / callable into float64 values for t = first..steps."""
    ts = range(first, steps + 1)
    if spec is None or isinstance(spec, str):
        vals = [default(t) for t in ts]
    elif callable(spec):
        vals = [call_schedule(f"AMEConfig.{name}", spec, t) for t in ts]
    elif isinstance(spec, (int, float)):
        vals = [float(spec)] * len(ts)
    else:
        vals = [float(v) for v in spec]
        if len(vals) != steps:
            raise MergeError(f"AMEConfig.{name}: expected {steps} values (one per step), got {len(vals)}")
        vals = vals[first - 1 :]
    out = np.asarray(vals, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise MergeError(f"AMEConfig.{name}: every per-step value must be finite")
    return out


def lr_values(config: AMEConfig, steps: int, first: int = 1) -> np.ndarray:
    """lr_t for t = first..steps (float64)."""
    lr = config.resolved_lr
    kind = config.lr_schedule
    if kind == "constant":
        fn = lambda t: lr  # noqa: E731
    elif kind == "harmonic":
        fn = lambda t: lr / t  # noqa: E731
    elif kind == "power":
        fn = lambda t: lr * t ** config.lr_power  # noqa: E731
    else:
        fn = None
    out = _per_step("lr_schedule", None if fn else kind, steps, fn or (lambda t: lr), first)
    if np.any(out <= 0):
        raise MergeError("AMEConfig.lr_schedule: every lr_t must be > 0")
    return out


def _coeffs(hyper: Hyper, lr: np.ndarray, t: np.ndarray, gscale: np.ndarray) -> np.ndarray:
    """The coefficient table (module docstring) for steps ``t`` with learning rates ``lr``."""
    coeffs = np.ones((len(t), 4), dtype=np.float64)
    coeffs[:, 0] = gscale
    coeffs[:, 1] = lr
    if hyper.optimizer == "adagrad":
        coeffs[:, 1] = lr / (1.0 + (t - 1.0) * hyper.lr_decay)
    elif hyper.optimizer in ("adam", "adamw"):
        coeffs[:, 1] = lr / (1.0 - hyper.beta1**t)
        coeffs[:, 3] = 1.0 / np.sqrt(1.0 - hyper.beta2**t)
        if hyper.optimizer == "adamw":
            coeffs[:, 2] = 1.0 - lr * hyper.adamw_weight_decay
    return np.ascontiguousarray(coeffs.astype(np.float32))


#: A plan's batch indices are int32 (``batch_idx``): epochs x N must fit.
#: the most ingredient visits (epochs x N) a plan holds: about 60 bytes per step on the host
#: (indices, lr, zeta, coefficients), so 1e7 visits is under 1 GB; far beyond any merge schedule
#: (the paper's longest is 100s of steps), and a clear error instead of an exhausted machine
MAX_PLAN_VISITS = 10**7


def schedule(config: AMEConfig, n: int) -> StepPlan:
    """Build the StepPlan of ``config`` for ``n`` ingredients (pure, host-side, tiny)."""
    if n < 1:
        raise MergeError(f"merge: need at least 1 ingredient, got {n}")
    if config.epochs * n > MAX_PLAN_VISITS:
        raise MergeError(
            f"AMEConfig.epochs: {config.epochs} epochs x {n} ingredients = {config.epochs * n} ingredient visits, "
            f"more than a plan holds ({MAX_PLAN_VISITS:.0e}; a merge schedule needs far fewer: fewer epochs, or a "
            "larger batch_size)"
        )
    hyper = resolve_hyper(config)
    orders = epoch_orders(config, n)
    bsz = config.batch_size
    # batches are consecutive slices of each epoch's order: compact arrays, no per-step Python objects
    batch_idx = np.asarray(orders, dtype=np.int32).reshape(-1)
    sizes_per_epoch = [min(bsz, n - s) for s in range(0, n, bsz)]
    steps = len(sizes_per_epoch) * len(orders)
    batch_ptr = np.zeros(steps + 1, dtype=np.int32)
    batch_ptr[1:] = np.cumsum(np.tile(np.asarray(sizes_per_epoch, dtype=np.int64), len(orders)))

    lr = lr_values(config, steps)
    zeta = _per_step("amplification", config.amplification, steps, lambda t: 1.0)
    t = np.arange(1, steps + 1, dtype=np.float64)
    sizes = np.diff(batch_ptr).astype(np.float64)

    coeffs = _coeffs(hyper, lr, t, zeta / (n * sizes))
    return StepPlan(
        n=n,
        hyper=hyper,
        order=tuple(orders[0]),
        batch_ptr=batch_ptr,
        batch_idx=batch_idx,
        lr=lr,
        zeta=zeta,
        coeffs=coeffs,
    )


def step_coeffs(config: AMEConfig, t: int, gscale: float) -> np.ndarray:
    """Coefficient row (float32 [4]) of global step ``t`` for the step kernel (stateful APIs).

    ``gscale`` is the caller's, since online ensembling defines its own
    pseudogradient scale; lr_t, bias corrections and decay follow ``config``.
    """
    if t < 1:
        raise MergeError(f"step_coeffs: step t counts from 1, got {t}")
    if not isinstance(config.lr_schedule, str) and not callable(config.lr_schedule):
        if t > len(config.lr_schedule):
            raise MergeError(f"AMEConfig.lr_schedule: has {len(config.lr_schedule)} values, step {t} needs one more")
        lr = np.array([config.lr_schedule[t - 1]], dtype=np.float64)
    else:
        lr = lr_values(config, t, first=t)  # lr_t alone: a stew's t-th step costs O(1), not O(t)
    return _coeffs(resolve_hyper(config), lr, np.array([float(t)]), np.array([gscale]))[0]


#: Folding is skipped when the coefficients' absolute sum exceeds this: large coefficients
#: of opposite sign would cancel in fp32 (an unstable GD schedule), where the step loop
#: rounds the way torch.optim does.
MAX_LINEAR_GAIN = 16.0


def linear_coefficients(plan: StepPlan, adaptive_pivot: bool, max_gain: float = MAX_LINEAR_GAIN) -> "np.ndarray | None":
    """GD folded into one weighted sum: float64 [N+1] with w_T = sum_i c[i] x_i + c[N] w_0.

    SGD (with or without momentum, nesterov, dampening and coupled weight decay) is
    linear in (w_0, x_1..x_N): every quantity of the recurrence (w, p, g, the momentum
    buffer) is a fixed combination of them, tracked here as float64 vectors of length
    N+1 over the same batches, lr_t and zeta_t the step kernels read. A kernel then
    reads each input once, whatever the number of epochs. None for other optimizers,
    or when sum |c| exceeds ``max_gain`` (default MAX_LINEAR_GAIN): too ill-conditioned for fp32.
    """
    h = plan.hyper
    if h.optimizer != "sgd":
        return None
    n = plan.n
    w0 = np.zeros(n + 1)
    w0[n] = 1.0
    w = w0.copy()
    buf = None
    for t in range(1, plan.steps + 1):
        batch = plan.batch(t)
        s = plan.zeta[t - 1] / (n * len(batch))
        g = (s * len(batch)) * (w if adaptive_pivot else w0)
        np.subtract.at(g, batch, s)
        if h.weight_decay:
            g = g + h.weight_decay * w
        if h.momentum:
            buf = g.copy() if buf is None else h.momentum * buf + (1.0 - h.dampening) * g
            g = g + h.momentum * buf if h.nesterov else buf
        w = w - plan.lr[t - 1] * g
    if not np.all(np.isfinite(w)) or np.abs(w).sum() > max_gain:
        return None
    return w


#: Pivot modes of ``folded_weights``: a soup and an index pivot are folded into the input
#: weights; a tensor pivot ("tensor", the cpu binding's "pointer") keeps its own weight c[N].
FOLD_PIVOT_MODES = ("soup", "index", "tensor", "pointer")
_MAX_FOLDS = 8
_folds: dict = {}  # (id(plan), adaptive) -> (plan, coefficients or None); bounded memo, see folded_weights


def folded_weights(plan: StepPlan, adaptive_pivot: bool, mode: str, index: int = 0) -> "np.ndarray | None":
    """A kernel's GD fold: float32 [N+1] weights with out = sum_i w[i] x_i + w[N] * pivot, or None to step.

    Shared by the cpu, triton and cuda backends. ``linear_coefficients`` gives
    w_T = sum_i c_i x_i + c_N w_0; a soup pivot (mode "soup", w_0 = mean x) or an index
    pivot (mode "index", w_0 = x_index) is folded into the input weights here (w[N] = 0),
    so the kernel reads each input once; a tensor pivot ("tensor" / "pointer") keeps
    c_N for the kernel to apply. None when the plan is not sgd or the fold is
    ill-conditioned (``linear_coefficients``): the caller then steps. The coefficients are
    memoised per plan object: a merge calls the kernel once per tensor (or chunk) with the
    same plan, and the fold costs O(T N) on the host; the returned array is a fresh copy.
    """
    if mode not in FOLD_PIVOT_MODES:
        raise MergeError(f"folded_weights: unknown pivot mode {mode!r}; valid: {', '.join(FOLD_PIVOT_MODES)}")
    if plan.hyper.optimizer != "sgd":
        return None
    key = (id(plan), bool(adaptive_pivot))
    hit = _folds.get(key)
    if hit is None or hit[0] is not plan:  # id() reused by a new plan: replace
        if len(_folds) >= _MAX_FOLDS:
            _folds.pop(next(iter(_folds)))
        hit = _folds[key] = (plan, linear_coefficients(plan, bool(adaptive_pivot)))
    c = hit[1]
    if c is None:
        return None
    c = c.copy()
    n = plan.n
    if mode == "soup":
        c[:n] += c[n] / n
        c[n] = 0.0
    elif mode == "index":
        if not 0 <= int(index) < n:
            raise MergeError(f"folded_weights: pivot index {index} is not in [0, {n})")
        c[int(index)] += c[n]
        c[n] = 0.0
    return c.astype(np.float32)
