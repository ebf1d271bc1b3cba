"""The math core: batch splitting, perturbation rules, the BatchNorm rule, non-finite flags.

Pure tensor code with no I/O; it imports nothing from the layers above it.
"""

from msam.core.batch import batch_size, resolve_micro_batches, split_batch
from msam.core.batchnorm import BatchNormPolicy, combine_running_stats
from msam.core.nonfinite import NonFiniteFlags, NonFiniteLossError
from msam.core.perturbation import (
    EPS,
    RULES,
    ASAMRule,
    FriendlySAMRule,
    GCSAMRule,
    GSAMRule,
    PerturbationRule,
    SAMRule,
    WSAMRule,
    make_rule,
    perturbation,
    perturbation_norm,
)
from msam.core.schedule import Schedule

__all__ = [
    "EPS", "RULES", "ASAMRule", "BatchNormPolicy", "FriendlySAMRule", "GCSAMRule", "GSAMRule",
    "WSAMRule", "NonFiniteFlags", "NonFiniteLossError",
    "PerturbationRule", "SAMRule", "Schedule", "batch_size", "combine_running_stats", "make_rule",
    "perturbation", "perturbation_norm", "resolve_micro_batches", "split_batch",
]
