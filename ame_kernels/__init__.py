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

# Imported now, not lazily: ``ak.diagnostics`` (the function) has its submodule's name, and the
# first import of a submodule sets the package attribute to the module. Lazily, any earlier
# ``import ame_kernels.diagnostics`` (the ``inspect`` CLI, a user's ``from ame_kernels.diagnostics
# import soup_gain``) left ``ak.diagnostics`` a module, not callable. The module is torch-free.
from .diagnostics import Diagnostics, diagnostics, soup_gain

# The same for ``ak.methods`` (the function listing every merge method) and the torch-free
# ``ame_kernels.methods`` package that holds them: imported now, then the name rebound.
from . import methods as _methods_package  # noqa: E402
from .methods import METHODS  # noqa: E402

methods = _methods_package.methods

__version__ = "0.1.0"

#: public name -> (module, attribute), imported on first access (PEP 562)
_LAZY = {
    "merge": ("api", "merge"),
    "available_backends": ("backends", "available"),
    "get_backend": ("backends", "get_backend"),
    "GreedyStep": ("greedy", "GreedyStep"),
    "greedy_merge": ("greedy", "greedy_merge"),
    "greedy_soup": ("soups", "greedy_soup"),
    "uniform_soup": ("soups", "uniform_soup"),
    "weighted_soup": ("soups", "weighted_soup"),
    "Stew": ("stew", "Stew"),
    "StewSnapshot": ("stew", "StewSnapshot"),
    # modules named sweeps / learned_soups, not sweep / learned_soup: importing a submodule sets the
    # package attribute of its name (see diagnostics above), which would shadow these functions
    "sweep": ("sweeps", "sweep"),
    "SweepResult": ("sweeps", "SweepResult"),
    "merge_many": ("sweeps", "merge_many"),
    "learned_soup": ("learned_soups", "learned_soup"),
    "ensemble": ("ensembles", "ensemble"),
    "greedy_ensemble": ("ensembles", "greedy_ensemble"),
    "compare_outputs": ("ensembles", "compare_outputs"),
    "linear_cka": ("soupability", "linear_cka"),
    "logit_kl": ("soupability", "logit_kl"),
    "logit_mse": ("soupability", "logit_mse"),
    "spearman": ("soupability", "spearman"),
    "output_diagnostics": ("soupability", "output_diagnostics"),
    "soupability_report": ("soupability", "soupability_report"),
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


__all__ = ["AMEConfig", "Diagnostics", "METHODS", "MergeError", "StepPlan", "build_info", "diagnostics", "methods",
           "schedule", "soup_gain",
           "__version__", *sorted(_LAZY)]
