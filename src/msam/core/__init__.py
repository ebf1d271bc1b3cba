"""The math core: batch splitting, perturbation rules, the BatchNorm rule, non-finite flags.

Pure tensor code with no I/O; it imports nothing from the layers above it.
"""

from msam.core.batch import batch_size, resolve_micro_batches, split_batch
from msam.core.batchnorm import BatchNormPolicy, combine_running_stats
from msam.core.friendlysam import FriendlySAMRule
from msam.core.gcsam import GCSAMRule
from msam.core.gsam import GSAMRule
from msam.core.nonfinite import NonFiniteFlags, NonFiniteLossError
from msam.core.perturbation import (
    EPS,
    ASAMRule,
    PerturbationRule,
    SAMRule,
    perturbation,
    perturbation_norm,
)
from msam.core.registry import RULES, check_support, make_rule, register_rule
from msam.core.schedule import Schedule
from msam.core.wsam import WSAMRule

__all__ = [
    "EPS", "RULES", "ASAMRule", "BatchNormPolicy", "FriendlySAMRule", "GCSAMRule", "GSAMRule",
    "WSAMRule", "NonFiniteFlags", "NonFiniteLossError",
    "PerturbationRule", "SAMRule", "Schedule", "batch_size", "check_support",
    "combine_running_stats", "make_rule", "register_rule",
    "perturbation", "perturbation_norm", "resolve_micro_batches", "split_batch",
]
