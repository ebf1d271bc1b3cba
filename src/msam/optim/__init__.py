"""Optimizers and the functional entry point built on the core and the strategies."""

from msam.optim.aliases import ASAM, SAM
from msam.optim.engine import GradientEngine, GradientResult, normalization_parameters
from msam.optim.msam import MSAM, msam_gradient

__all__ = [
    "ASAM", "MSAM", "SAM", "GradientEngine", "GradientResult", "msam_gradient",
    "normalization_parameters",
]
