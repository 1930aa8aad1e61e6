"""ame-kernels: Amortized Model Ensembling with fused kernels.

    import ame_kernels as ak
    merged = ak.merge(ingredients, optimizer="adam", lr=1e-3, epochs=3)
"""

from ._native import build_info
from .api import merge
from .backends import available as available_backends
from .backends import get_backend
from .config import AMEConfig
from .diagnostics import Diagnostics, diagnostics, soup_gain
from .errors import MergeError
from .greedy import GreedyStep, greedy_merge
from .schedule import StepPlan, schedule
from .soups import greedy_soup, uniform_soup, weighted_soup
from .stew import Stew, StewSnapshot

__version__ = "0.1.0"

__all__ = [
    "AMEConfig",
    "Diagnostics",
    "GreedyStep",
    "MergeError",
    "StepPlan",
    "Stew",
    "StewSnapshot",
    "available_backends",
    "build_info",
    "diagnostics",
    "get_backend",
    "greedy_merge",
    "greedy_soup",
    "merge",
    "schedule",
    "soup_gain",
    "uniform_soup",
    "weighted_soup",
    "__version__",
]
