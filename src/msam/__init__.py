"""msam: micro-batch-averaged Sharpness-Aware Minimization (mSAM), SAM and ASAM for PyTorch.

References:
    Behdin et al., "mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization", arXiv 2302.09693.
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    ICLR 2021.
    Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of
    Deep Neural Networks", ICML 2021.
"""

from msam.core.batchnorm import BatchNormPolicy
from msam.core.nonfinite import NonFiniteLossError
from msam.core.perturbation import ASAMRule, PerturbationRule, SAMRule
from msam.core.radius import rho_for_m
from msam.core.registry import RULES, register_rule
from msam.core.schedule import Schedule
from msam.optim import (
    ASAM,
    MSAM,
    SAM,
    GradientEngine,
    GradientResult,
    msam_gradient,
    normalization_parameters,
)
from msam.strategies.compiled import NotCompiledWarning

__version__ = "0.1.0"

__all__ = [
    "ASAM", "MSAM", "SAM", "ASAMRule", "BatchNormPolicy", "GradientEngine", "GradientResult",
    "NonFiniteLossError", "NotCompiledWarning", "PerturbationRule", "RULES", "SAMRule",
    "Schedule", "__version__", "msam_gradient", "normalization_parameters", "register_rule",
    "rho_for_m",
]
