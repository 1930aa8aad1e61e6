"""ame-kernels: Amortized Model Ensembling with fused kernels.

    import ame_kernels as ak
    merged = ak.merge(ingredients, optimizer="adam", lr=1e-3, epochs=3)
"""

from ._native import build_info
from .config import AMEConfig
from .errors import MergeError
from .schedule import StepPlan, schedule

__version__ = "0.1.0"

__all__ = ["AMEConfig", "MergeError", "StepPlan", "build_info", "schedule", "__version__"]
