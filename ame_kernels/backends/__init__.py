"""Backend registry: ``get_backend('auto' | name, device_type)`` and ``available()``.

Backends are imported lazily, so a missing native module or Triton disables
that backend only. ``auto`` picks, for CPU tensors: cpu, else reference; for
CUDA tensors: cuda, else triton, else reference (see README for the rule).
"""

from __future__ import annotations

import importlib

from ..errors import MergeError
from .base import Backend

_REGISTRY = {
    "reference": "ame_kernels.backends.reference:ReferenceBackend",
    "cpu": "ame_kernels.backends.cpu:CpuBackend",
    "triton": "ame_kernels.backends.triton:TritonBackend",
    "cuda": "ame_kernels.backends.cuda:CudaBackend",
}
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_instances: dict = {}


def _load(name: str):
    """(backend or None, reason)."""
    if name not in _instances:
        module, cls = _REGISTRY[name].split(":")
        try:
            backend = getattr(importlib.import_module(module), cls)()
            ok, why = backend.available()
            _instances[name] = (backend if ok else None, why)
        except Exception as e:  # a broken backend disables itself, never the package
            _instances[name] = (None, f"{module} could not be loaded: {type(e).__name__}: {e}")
    return _instances[name]


def available() -> dict:
    """{name: (usable, reason)} for every known backend."""
    return {name: (_load(name)[0] is not None, _load(name)[1]) for name in _REGISTRY}


def get_backend(name: str = "auto", device_type: str = "cpu") -> Backend:
    """The backend called ``name``, or the automatic choice for tensors on ``device_type``."""
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
            backend, _ = _load(candidate)
            if backend is not None and backend.supports_device(device_type):
                return backend
        raise MergeError(f"backend 'auto': no backend supports device {device_type!r}")
    if name not in _REGISTRY:
        raise MergeError(f"backend: unknown backend {name!r}; valid choices: 'auto', {', '.join(map(repr, _REGISTRY))}")
    backend, why = _load(name)
    if backend is None:
        raise MergeError(f"backend {name!r} is not available here: {why}")
    if not backend.supports_device(device_type):
        raise MergeError(f"backend {name!r} does not run on {device_type!r} tensors")
    return backend
