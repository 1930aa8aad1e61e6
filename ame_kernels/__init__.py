"""ame-kernels: Amortized Model Ensembling with fused kernels.

    import ame_kernels as ak
    merged = ak.merge(ingredients, optimizer="adam", lr=1e-3, epochs=3)

Importing the package does not import torch: the names that need it (``merge``, the
stew, soups, greedy and diagnostics APIs, the backend registry) load on first use, so
the checkpoint CLI on safetensors files starts in a fraction of a second.
"""

import importlib

from ._native import build_info
from .config import AMEConfig
from .errors import MergeError
from .schedule import StepPlan, schedule

__version__ = "0.1.0"

#: public name -> (module, attribute), imported on first access (PEP 562)
_LAZY = {
    "merge": ("api", "merge"),
    "available_backends": ("backends", "available"),
    "get_backend": ("backends", "get_backend"),
    "Diagnostics": ("diagnostics", "Diagnostics"),
    "diagnostics": ("diagnostics", "diagnostics"),
    "soup_gain": ("diagnostics", "soup_gain"),
    "GreedyStep": ("greedy", "GreedyStep"),
    "greedy_merge": ("greedy", "greedy_merge"),
    "greedy_soup": ("soups", "greedy_soup"),
    "uniform_soup": ("soups", "uniform_soup"),
    "weighted_soup": ("soups", "weighted_soup"),
    "Stew": ("stew", "Stew"),
    "StewSnapshot": ("stew", "StewSnapshot"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'ame_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["AMEConfig", "MergeError", "StepPlan", "build_info", "schedule", "__version__", *sorted(_LAZY)]
