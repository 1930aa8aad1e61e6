"""Stewing (online AME, paper Appendix D): ingredients arrive one at a time (or a batch at a time).

    stew = Stew(x0, AMEConfig(optimizer="adagrad", lr=0.1, lr_schedule="constant"))
    for w_t in client_rounds():            # each w_t: a tensor or a state dict like x0
        stew.add(w_t)                      # one fused optimizer step per tensor
    merged = stew.weights

A Stew holds the ensemble x_t (fp32), the optimizer state (fp32 ``[S, C]`` per
tensor, S = ``Hyper.state_slots``) and the step count t. Each ``add`` runs one
``backend.step`` per tensor with the coefficient row of ``schedule.step_coeffs``:
the same fused step kernels as every backend's ``whole_run`` (cpu, triton, cuda;
the reference backend steps torch.optim with the state loaded and stored).

Two pseudogradient scales (``mode``):

``"server"`` (default; the paper's server-side stew, Appendix D, FedOPT step 2):
    g_t = zeta_t / (t+1) * (x_{t-1} - w_t), w_t the ingredient (a batch of M
    ingredients: their uniform soup, i.e. step 1 of FedOPT), so
    gscale_t = zeta_t / ((t+1) * M). ``amplification=None`` means zeta_t = t+1,
    so g_t = x_{t-1} - w_t: with ``optimizer=X, lr_schedule="constant"`` the step
    is exactly FedOPT's ServerOPT=X update on Delta_t = w_t - x_{t-1}. With the
    config defaults (GD, harmonic lr 1/t) the stew is the running uniform soup of
    everything added (x_1 = w_1, x_2 = (w_1 + w_2) / 2, ...).

``"merge"`` (``n`` = N): the batch semantics of ``ak.merge``:
    gscale_t = zeta_t / (N * M), zeta_t from ``amplification`` (default: the
    config's). Adding N ingredients one by one (M = 1) from pivot x0 equals
    ``ak.merge(ingredients, config, pivot=x0)`` with epochs=1, batch_size=1; adding
    batches of B equals batch_size=B; re-adding them E times equals epochs=E.

The pivot of each step is x_{t-1} with ``config.adaptive_pivot`` (default) and x0
otherwise. Config fields about a merge's schedule (``pivot``, ``order``,
``scores``, ``descending``, ``shuffle``, ``seed``, ``epochs``, ``batch_size``) do
not apply: the caller decides what is added and when. All arithmetic is fp32;
ingredients may be float32, bfloat16 or float16; ``weights`` are returned in
``config.out_dtype`` or the pivot's dtype. Non-floating tensors are kept from x0.
"""

from __future__ import annotations

import json
import numbers
import os
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .checks import DTYPE_BY_NAME, FLOAT_DTYPES, check_tensor_kind, label
from .backends import get_backend
from .config import AMEConfig, make_config
from .errors import MergeError
from .schedule import call_schedule, resolve_hyper, step_coeffs

MODES = ("server", "merge")
STEW_JSON = "stew.json"
STEW_TENSORS = "stew.safetensors"
FORMAT_VERSION = 1

Amplification = Union[None, float, Sequence[float], Callable[[int], float]]


@dataclass(frozen=True)
class StewSnapshot:
    """An in-memory copy of a Stew's mutable part: step count, fp32 weights and optimizer state."""

    step: int
    weights: Dict[str, torch.Tensor]
    state: Dict[str, torch.Tensor]


def _zeta(spec: Amplification, t: int, what: str) -> float:
    """zeta_t of a scalar / per-step sequence / callable (t is 1-based)."""
    if callable(spec):
        z = call_schedule(what, spec, t)
    elif isinstance(spec, (int, float)):
        z = float(spec)
    else:
        seq = list(spec)
        if t > len(seq):
            raise MergeError(f"{what}: has {len(seq)} values, step {t} needs one more")
        z = float(seq[t - 1])
    if not np.isfinite(z):
        raise MergeError(f"{what}: zeta_{t} = {z} is not finite")
    return z


def _check_amplification(amplification: Amplification) -> Amplification:
    if amplification is None or callable(amplification):
        return amplification
    if isinstance(amplification, bool):
        raise MergeError(f"Stew: amplification must be None, a number, a sequence or a callable, got {amplification!r}")
    if isinstance(amplification, (numbers.Real, str)) or getattr(amplification, "ndim", None) == 0:
        try:
            return float(amplification)
        except ValueError:
            raise MergeError(f"Stew: amplification must be None, a number, a sequence or a callable, got {amplification!r}") from None
    try:
        return tuple(float(v) for v in amplification)
    except (TypeError, ValueError):
        raise MergeError(f"Stew: amplification must be None, a number, a sequence or a callable, got {amplification!r}") from None


class Stew:
    """The online ensemble: x_t, the optimizer state and t (see the module docstring).

    pivot: x0, a tensor or a state dict (name -> tensor); ingredients must match it.
    config / overrides: AMEConfig (or dict) and keyword overrides, as for ``ak.merge``.
    mode: 'server' (default, FedOPT server stew) or 'merge' (``ak.merge`` semantics; needs ``n``).
    n: the N of 'merge' mode (number of ingredients of the equivalent merge).
    amplification: zeta_t; None = t+1 in 'server' mode, ``config.amplification`` in 'merge' mode.
    dtypes_like: a tensor or state dict in the pivot's form whose float dtypes the output (``weights``)
        takes when ``config.out_dtype`` is None; default: the pivot's. ``ak.merge``'s rule (the first
        ingredient's dtypes) is ``dtypes_like=ingredients[0]``.
    """

    def __init__(
        self,
        pivot: Union[torch.Tensor, Dict[str, torch.Tensor]],
        config: Optional[AMEConfig] = None,
        *,
        mode: str = "server",
        n: Optional[int] = None,
        amplification: Amplification = None,
        dtypes_like: Union[None, torch.Tensor, Dict[str, torch.Tensor]] = None,
        **overrides: Any,
    ):
        cfg = make_config(config, **overrides)
        # The merge-schedule pivot has no meaning here (x0 is the argument); a tensor in it
        # would also keep the config from being saved.
        if not (isinstance(cfg.pivot, str) and cfg.pivot == "soup"):
            cfg = cfg.replace(pivot="soup")
        if mode not in MODES:
            raise MergeError(f"Stew: mode must be one of {MODES}, got {mode!r}")
        if mode == "merge":
            if n is None or isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise MergeError(f"Stew: mode='merge' needs n (the number of ingredients, an int >= 1), got {n!r}")
            n = int(n)
        elif n is not None:
            raise MergeError("Stew: n only applies to mode='merge' (the server stew scales by 1/(t+1))")
        if mode == "server" and amplification is None and cfg.amplification != 1.0:
            raise MergeError(
                "Stew: in mode='server' zeta_t is t+1 unless Stew(amplification=...) says otherwise; "
                f"the config's amplification {cfg.amplification!r} would be ignored, so pass it as Stew(amplification=...)"
            )
        self.config = cfg
        self.mode = mode
        self.n = n
        self.amplification = _check_amplification(amplification)
        self.hyper = resolve_hyper(cfg)

        if isinstance(pivot, torch.Tensor):
            self._form, pivot_dict = "tensor", {"": pivot}
        elif isinstance(pivot, dict):
            self._form, pivot_dict = "dict", dict(pivot)
        else:
            raise MergeError(f"Stew: pivot must be a tensor or a state dict, got {type(pivot).__name__}")
        devices = set()
        for name, x in pivot_dict.items():
            if not isinstance(x, torch.Tensor):
                raise MergeError(f"Stew: pivot {label(name)} is a {type(x).__name__}, not a tensor")
            check_tensor_kind(x, f"Stew: pivot {label(name)}", "a stew")
            devices.add(x.device)
        if len(devices) > 1:
            raise MergeError(f"Stew: pivot tensors are spread over several devices: {sorted(map(str, devices))}")
        if cfg.check_finite:
            for name, x in pivot_dict.items():
                if x.dtype in FLOAT_DTYPES and not bool(torch.isfinite(x).all()):
                    raise MergeError(f"Stew: pivot {label(name)} contains NaN or Inf")
        self.device = devices.pop() if devices else torch.device("cpu")
        self.backend = get_backend(cfg.backend, self.device.type)

        self.names: List[str] = list(pivot_dict)
        self._shapes = {k: tuple(v.shape) for k, v in pivot_dict.items()}
        self._float = {k: v.dtype in FLOAT_DTYPES for k, v in pivot_dict.items()}
        like = self._dtypes_like(dtypes_like, pivot_dict)
        self._out_dtype = {
            k: (DTYPE_BY_NAME[cfg.out_dtype] if cfg.out_dtype else like[k].dtype) for k in pivot_dict if self._float[k]
        }
        self._buffers = {k: v.detach().clone() for k, v in pivot_dict.items() if not self._float[k]}
        self._w: Dict[str, torch.Tensor] = {}
        self._state: Dict[str, torch.Tensor] = {}
        init = self.hyper.initial_state()
        for k, v in pivot_dict.items():
            if not self._float[k]:
                continue
            self._w[k] = v.detach().reshape(-1).to(dtype=torch.float32, copy=True).contiguous()
            st = torch.empty(self.hyper.state_slots, v.numel(), dtype=torch.float32, device=self.device)
            for s, value in enumerate(init):
                st[s].fill_(value)
            self._state[k] = st
        self._w0 = None if cfg.adaptive_pivot else {k: w.clone() for k, w in self._w.items()}
        self.t = 0

    def _dtypes_like(self, like: Any, pivot_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``dtypes_like`` as a name -> tensor dict with a supported float dtype for every float tensor."""
        if like is None:
            return pivot_dict
        if self._form == "tensor" and isinstance(like, torch.Tensor):
            like = {"": like}
        elif not (self._form == "dict" and isinstance(like, dict)):
            want = "a tensor" if self._form == "tensor" else "a state dict"
            raise MergeError(f"Stew: dtypes_like must be {want}, as the pivot is, got {type(like).__name__}")
        for k in pivot_dict:
            if not self._float[k]:
                continue
            x = like.get(k)
            if not isinstance(x, torch.Tensor):
                raise MergeError(f"Stew: dtypes_like has no tensor for {label(k)}")
            if x.dtype not in FLOAT_DTYPES:
                raise MergeError(f"Stew: dtypes_like {label(k)} has dtype {x.dtype}, expected float32/bfloat16/float16")
        return like

    # -- stepping -------------------------------------------------------------
    def _batch(self, ingredient: Any) -> List[Dict[str, torch.Tensor]]:
        """The ingredient(s) of one add() as a list of name -> tensor dicts, checked against x0."""
        if self._form == "tensor":
            if isinstance(ingredient, torch.Tensor):
                items = [ingredient]
            elif isinstance(ingredient, (list, tuple)) and ingredient and all(isinstance(x, torch.Tensor) for x in ingredient):
                items = list(ingredient)
            else:
                raise MergeError("Stew.add: the stew holds a tensor, so add a tensor or a non-empty list of tensors")
            dicts = [{"": x} for x in items]
        else:
            if isinstance(ingredient, dict):
                dicts = [ingredient]
            elif isinstance(ingredient, (list, tuple)) and ingredient and all(isinstance(x, dict) for x in ingredient):
                dicts = list(ingredient)
            else:
                raise MergeError("Stew.add: the stew holds a state dict, so add a state dict or a non-empty list of them")
        names = set(self.names)
        for i, d in enumerate(dicts):
            keys = set(d)
            if keys != names:
                raise MergeError(
                    f"Stew.add: ingredient {i} of the batch does not match the pivot: missing "
                    f"{sorted(names - keys) or 'none'}, extra {sorted(keys - names) or 'none'}"
                )
            for name in self.names:
                x = d[name]
                if not isinstance(x, torch.Tensor):
                    raise MergeError(f"Stew.add: {label(name)} of ingredient {i} is a {type(x).__name__}, not a tensor")
                check_tensor_kind(x, f"Stew.add: {label(name)} of ingredient {i}", "a stew")
                if tuple(x.shape) != self._shapes[name]:
                    raise MergeError(
                        f"Stew.add: {label(name)} has shape {tuple(x.shape)} in ingredient {i} but {self._shapes[name]} in the pivot"
                    )
                if (x.dtype in FLOAT_DTYPES) != self._float[name]:
                    raise MergeError(
                        f"Stew.add: {label(name)} is {x.dtype} in ingredient {i}, not the pivot's kind "
                        "(floating and non-floating tensors cannot be mixed)"
                    )
                if self.config.check_finite and self._float[name] and not bool(torch.isfinite(x).all()):
                    raise MergeError(
                        f"Stew.add: {label(name)} of ingredient {i} contains NaN or Inf (check_finite=False to add anyway)"
                    )
        return dicts

    def gscale(self, t: int, m: int) -> float:
        """Pseudogradient scale of step t with a batch of m ingredients (module docstring)."""
        if self.mode == "server":
            zeta = float(t + 1) if self.amplification is None else _zeta(self.amplification, t, "Stew.amplification")
            return zeta / ((t + 1) * m)
        spec = self.config.amplification if self.amplification is None else self.amplification
        return _zeta(spec, t, "AMEConfig.amplification" if self.amplification is None else "Stew.amplification") / (self.n * m)

    def add(self, ingredient: Any) -> "Stew":
        """One fused step with ``ingredient`` (a tensor/state dict like the pivot, or a list: one batch)."""
        dicts = self._batch(ingredient)
        t = self.t + 1
        coeffs = step_coeffs(self.config, t, self.gscale(t, len(dicts)))
        # Every input is staged (moved to the stew's device, flattened) before the first tensor
        # is stepped, so a failure there leaves the stew as it was, never half-stepped.
        batches = {}
        for name in self.names:
            if not self._float[name]:
                buf = self._buffers[name]
                differing = [i for i, d in enumerate(dicts)
                             if d[name].dtype != buf.dtype or not torch.equal(d[name].to(self.device), buf)]
                if differing:
                    warnings.warn(
                        f"Stew.add: non-floating {label(name)} differs from the pivot's (in value or dtype) in batch "
                        f"ingredients {differing}; the pivot's is kept, not averaged",
                        stacklevel=2,
                    )
            elif self._w[name].numel():
                batches[name] = [d[name].detach().to(self.device).contiguous().reshape(-1) for d in dicts]
        for name, batch in batches.items():
            pivot = None if self._w0 is None else self._w0[name]
            self.backend.step(self._w[name], self._state[name], batch, pivot, coeffs, t, self.hyper,
                              threads=self.config.threads)
        self.t = t
        return self

    # -- reading --------------------------------------------------------------
    @property
    def step(self) -> int:
        """Steps taken so far (t)."""
        return self.t

    @property
    def weights(self) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """The current ensemble x_t in the pivot's form, float tensors in the output dtype (fresh tensors)."""
        out = {}
        for name in self.names:
            if self._float[name]:
                out[name] = self._w[name].to(self._out_dtype[name], copy=True).reshape(self._shapes[name])
            else:
                out[name] = self._buffers[name].clone()
        return out[""] if self._form == "tensor" else out

    @property
    def out_dtypes(self) -> Dict[str, torch.dtype]:
        """name -> the dtype ``weights`` gives each float tensor ('' for a tensor stew)."""
        return dict(self._out_dtype)

    @property
    def weights_fp32(self) -> Dict[str, torch.Tensor]:
        """The fp32 ensemble as a name -> tensor dict ('' for a tensor stew); views, not copies."""
        return {k: w.reshape(self._shapes[k]) for k, w in self._w.items()}

    @property
    def optimizer_state(self) -> Dict[str, torch.Tensor]:
        """name -> fp32 [S, *shape] optimizer state (slot order as in backends/base.py); views, not copies."""
        return {k: s.reshape((s.shape[0],) + self._shapes[k]) for k, s in self._state.items()}

    # -- snapshot / restore ---------------------------------------------------
    def snapshot(self) -> StewSnapshot:
        """Copy the step count, weights and optimizer state (in memory, on the stew's device)."""
        return StewSnapshot(
            step=self.t,
            weights={k: w.clone() for k, w in self._w.items()},
            state={k: s.clone() for k, s in self._state.items()},
        )

    def restore(self, snapshot: StewSnapshot) -> "Stew":
        """Put back a snapshot of this stew: afterwards no trace remains of the steps taken since."""
        if not isinstance(snapshot, StewSnapshot):
            raise MergeError(f"Stew.restore: expected a StewSnapshot, got {type(snapshot).__name__}")
        self._check_tensors("Stew.restore", snapshot.weights, snapshot.state, flat=True)
        for k in self._w:
            self._w[k].copy_(snapshot.weights[k])
            self._state[k].copy_(snapshot.state[k])
        self.t = snapshot.step
        return self

    def _check_tensors(self, what: str, weights: dict, state: dict, flat: bool) -> None:
        if set(weights) != set(self._w) or set(state) != set(self._state):
            raise MergeError(f"{what}: the tensor names do not match this stew's")
        for k, w in self._w.items():
            shape_w = tuple(w.shape) if flat else self._shapes[k]
            if tuple(weights[k].shape) != shape_w:
                raise MergeError(f"{what}: {label(k)} has shape {tuple(weights[k].shape)}, this stew has {shape_w}")
            s = self._state[k]
            shape_s = tuple(s.shape) if flat else (s.shape[0],) + self._shapes[k]
            if tuple(state[k].shape) != shape_s:
                raise MergeError(f"{what}: optimizer state of {label(k)} has shape {tuple(state[k].shape)}, expected {shape_s}")

    # -- resumable state ------------------------------------------------------
    def _meta(self) -> dict:
        amp = self.amplification
        if callable(amp):
            raise MergeError("Stew: a callable amplification cannot be saved; pass a number or a per-step list")
        return {
            "format": "ame-kernels stew",
            "version": FORMAT_VERSION,
            "step": self.t,
            "mode": self.mode,
            "n": self.n,
            "amplification": list(amp) if isinstance(amp, tuple) else amp,
            "form": self._form,
            "names": self.names,
            "shapes": {k: list(v) for k, v in self._shapes.items()},
            "out_dtypes": {k: str(v).replace("torch.", "") for k, v in self._out_dtype.items()},
            "config": self.config.to_dict(),
        }

    def state_dict(self) -> dict:
        """Everything needed to resume (like ``torch.optim.Optimizer.state_dict``): plain metadata
        plus ``weights`` (fp32), ``state`` (fp32 [S, *shape]), ``pivot`` (x0, fixed-pivot stews only)
        and ``buffers`` (non-floating tensors), all copies on the stew's device.
        For the ensemble itself use ``weights``."""
        sd = self._meta()
        sd["weights"] = {k: w.clone().reshape(self._shapes[k]) for k, w in self._w.items()}
        sd["state"] = {k: s.clone() for k, s in self.optimizer_state.items()}
        sd["pivot"] = None if self._w0 is None else {k: w.clone().reshape(self._shapes[k]) for k, w in self._w0.items()}
        sd["buffers"] = {k: b.clone() for k, b in self._buffers.items()}
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, backend: Optional[str] = None, threads: Optional[int] = None) -> "Stew":
        """Rebuild a stew from ``state_dict()`` (optionally on another backend / thread count)."""
        try:
            if sd.get("format") != "ame-kernels stew":
                raise MergeError("Stew.from_state_dict: not a stew state dict (no 'format': 'ame-kernels stew')")
            if int(sd["version"]) > FORMAT_VERSION:
                raise MergeError(f"Stew.from_state_dict: format version {sd['version']} is newer than this library's {FORMAT_VERSION}")
            cfg = AMEConfig.from_dict(sd["config"])
            names, weights, state = list(sd["names"]), sd["weights"], sd["state"]
            buffers, pivot = sd.get("buffers") or {}, sd.get("pivot")
            shapes = {k: tuple(v) for k, v in sd["shapes"].items()}
            out_dtypes = sd["out_dtypes"]
            step, mode, n, amp, form = int(sd["step"]), sd["mode"], sd["n"], sd["amplification"], sd["form"]
        except KeyError as e:
            raise MergeError(f"Stew.from_state_dict: missing entry {e}") from None
        overrides = {}
        if backend is not None:
            overrides["backend"] = backend
        if threads is not None:
            overrides["threads"] = threads
        if overrides:
            cfg = cfg.replace(**overrides)
        missing = [k for k in names if k not in weights and k not in buffers]
        if missing:
            raise MergeError(f"Stew.from_state_dict: no weights or buffer for {missing}")
        # x0 as the pivot: weights for its shapes/dtypes; values are overwritten below.
        x0 = {}
        for k in names:
            if k in buffers:
                x0[k] = buffers[k]
            else:
                x0[k] = (pivot[k] if pivot is not None else weights[k]).to(DTYPE_BY_NAME[out_dtypes[k]])
        # Build with check_finite off (an fp32 weight may overflow a fp16 out dtype in the dummy x0).
        stew = cls(x0["" ] if form == "tensor" else x0, cfg.replace(check_finite=False), mode=mode, n=n,
                   amplification=amp)
        stew.config = cfg
        stew._check_tensors("Stew.from_state_dict", weights, state, flat=False)
        for k in stew._w:
            stew._w[k].copy_(weights[k].reshape(-1))
            stew._state[k].copy_(state[k].reshape(stew._state[k].shape))
            if stew._w0 is not None:
                if pivot is None or k not in pivot:
                    raise MergeError(f"Stew.from_state_dict: a fixed-pivot stew needs its pivot for {label(k)}")
                stew._w0[k].copy_(pivot[k].reshape(-1))
            if shapes.get(k) != stew._shapes[k]:
                raise MergeError(f"Stew.from_state_dict: {label(k)} has shape {stew._shapes[k]}, metadata says {shapes.get(k)}")
        stew.t = step
        return stew

    def load_state_dict(self, sd: dict) -> "Stew":
        """Replace this stew's content with ``sd`` (from ``state_dict()``); config and backend included."""
        other = Stew.from_state_dict(sd)
        self.__dict__.update(other.__dict__)
        return self

    # -- files ------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write ``path/stew.safetensors`` (fp32 weights, state, pivot, buffers) and ``path/stew.json``.

        Each file is written under a temporary name and renamed into place, tensors first;
        both carry the same save id, so a crash between the two renames is detected by ``load``.
        """
        from safetensors.torch import save_file

        meta = self._meta()
        save_id = uuid.uuid4().hex
        meta["save_id"] = save_id
        tensors = {}
        for i, k in enumerate(self.names):
            if self._float[k]:
                tensors[f"weights.{i}"] = self._w[k].cpu().contiguous()
                if self._state[k].shape[0]:
                    tensors[f"state.{i}"] = self._state[k].cpu().contiguous()
                if self._w0 is not None:
                    tensors[f"pivot.{i}"] = self._w0[k].cpu().contiguous()
            else:
                tensors[f"buffer.{i}"] = self._buffers[k].cpu().contiguous()
        meta["slots"] = self.hyper.state_slots
        os.makedirs(path, exist_ok=True)
        tpath, jpath = os.path.join(path, STEW_TENSORS), os.path.join(path, STEW_JSON)
        save_file(tensors, tpath + ".tmp", metadata={"save_id": save_id})
        os.replace(tpath + ".tmp", tpath)
        with open(jpath + ".tmp", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(jpath + ".tmp", jpath)

    @classmethod
    def load(cls, path: str, backend: Optional[str] = None, threads: Optional[int] = None,
             device: Union[str, torch.device, None] = None) -> "Stew":
        """Resume a stew written by ``save`` (on the CPU unless ``device`` is given)."""
        from safetensors import safe_open

        tpath, jpath = os.path.join(path, STEW_TENSORS), os.path.join(path, STEW_JSON)
        for p in (tpath, jpath):
            if not os.path.isfile(p):
                raise MergeError(f"Stew.load: {p}: no such file (is {path} a folder written by Stew.save?)")
        try:
            with open(jpath, "r", encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise MergeError(f"Stew.load: {jpath}: unreadable ({e})") from None
        dev = torch.device(device) if device is not None else torch.device("cpu")
        try:
            with safe_open(tpath, framework="pt", device="cpu") as f:
                file_id = (f.metadata() or {}).get("save_id")
                keys = set(f.keys())
                tensors = {k: f.get_tensor(k).to(dev) for k in keys}
        except Exception as e:  # noqa: BLE001 (safetensors raises several kinds for a bad file)
            raise MergeError(f"Stew.load: {tpath}: unreadable ({e})") from None
        if file_id != meta.get("save_id"):
            raise MergeError(f"Stew.load: {tpath} and {jpath} come from different saves (interrupted save?)")
        names = meta.get("names")
        if not isinstance(names, list):
            raise MergeError(f"Stew.load: {jpath}: no tensor names")
        slots = int(meta.get("slots", 0))
        sd = dict(meta)
        sd["weights"], sd["state"], sd["buffers"] = {}, {}, {}
        pivot = {}
        for i, k in enumerate(names):
            if f"buffer.{i}" in tensors:
                sd["buffers"][k] = tensors[f"buffer.{i}"]
                continue
            if f"weights.{i}" not in tensors:
                raise MergeError(f"Stew.load: {tpath} lacks the weights of {label(k)}")
            w = tensors[f"weights.{i}"]
            sd["weights"][k] = w
            sd["state"][k] = tensors.get(f"state.{i}", torch.empty(slots, w.numel(), device=dev))
            if f"pivot.{i}" in tensors:
                pivot[k] = tensors[f"pivot.{i}"]
        sd["pivot"] = pivot or None
        sd["shapes"] = {k: v for k, v in meta["shapes"].items()}
        # Saved tensors are flat: give them their shapes for from_state_dict.
        for k in sd["weights"]:
            shape = tuple(meta["shapes"][k])
            sd["weights"][k] = sd["weights"][k].reshape(shape)
            sd["state"][k] = sd["state"][k].reshape((slots,) + shape)
            if sd["pivot"] is not None and k in sd["pivot"]:
                sd["pivot"][k] = sd["pivot"][k].reshape(shape)
        return cls.from_state_dict(sd, backend=backend, threads=threads)

    def __repr__(self) -> str:
        return (
            f"Stew(mode={self.mode!r}, step={self.t}, optimizer={self.config.optimizer!r}, "
            f"tensors={len(self.names)}, backend={self.backend.name!r})"
        )


__all__ = ["Stew", "StewSnapshot"]
