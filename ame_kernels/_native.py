"""Loads the native extensions; their absence disables a backend, never the package."""

from __future__ import annotations

import importlib

_cache: dict = {}


def load(name: str):
    """Return ``ame_kernels.<name>`` ('_C' or '_C_cuda'), or None; the reason is in ``why_missing``."""
    if name not in _cache:
        try:
            _cache[name] = (importlib.import_module(f"ame_kernels.{name}"), "")
        except ImportError as e:  # not built, or built for another Python
            _cache[name] = (
                None,
                f"ame_kernels.{name} is not built ({e}); run `make build` "
                "(or `pip install --no-build-isolation -e .`)",
            )
    return _cache[name][0]


def why_missing(name: str) -> str:
    load(name)
    return _cache[name][1]


def build_info() -> dict:
    """What the extension was built with (compiler, SIMD levels, CUDA), or why it is missing."""
    mod = load("_C")
    if mod is None:
        return {"native": False, "reason": why_missing("_C")}
    info = dict(mod.build_info())
    info["native"] = True
    return info
