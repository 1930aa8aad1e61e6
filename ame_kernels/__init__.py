"""ame-kernels: Amortized Model Ensembling with fused kernels.

    import ame_kernels as ak
    merged = ak.merge(ingredients, optimizer="adam", lr=1e-3, epochs=3)
"""

from ._native import build_info
from .api import merge
from .backends import available as available_backends
from .backends import get_backend
from .config import AMEConfig
from .errors import MergeError
from .schedule import StepPlan, schedule

__version__ = "0.1.0"

__all__ = [
    "AMEConfig",
    "MergeError",
    "StepPlan",
    "available_backends",
    "build_info",
    "get_backend",
    "merge",
    "schedule",
    "__version__",
]
