"""The math core: batch splitting, the SAM/ASAM perturbation and the BatchNorm rule.

Pure tensor code with no I/O; it imports nothing from the layers above it.
"""

from msam.core.batch import batch_size, resolve_micro_batches, split_batch
from msam.core.batchnorm import BatchNormPolicy, combine_running_stats
from msam.core.perturbation import EPS, perturbation, perturbation_norm

__all__ = [
    "EPS", "BatchNormPolicy", "batch_size", "combine_running_stats", "perturbation",
    "perturbation_norm", "resolve_micro_batches", "split_batch",
]
