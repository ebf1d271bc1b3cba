"""Optimizers and the functional entry point built on the core and the strategies."""

from msam.optim.engine import GradientEngine, GradientResult, normalization_parameters
from msam.optim.msam import ASAM, MSAM, SAM, msam_gradient

__all__ = [
    "ASAM", "MSAM", "SAM", "GradientEngine", "GradientResult", "msam_gradient",
    "normalization_parameters",
]
