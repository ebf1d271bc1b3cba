"""Sharpness and flatness analysis of trained models.

Curvature (``hessian``), worst-/average-case sharpness (``sharpness``), loss-landscape slices
and interpolation (``landscape``), PNG plots (``plotting``, the only module with I/O) and the
one-call :func:`measure` / :func:`format_table` used by the CLI.

Convention: ``loss_fn(model, batch) -> scalar mean loss``; ``batches`` is a list of batches
(tensor / tuple / dict of tensors, split on ``dim 0``); the loss of interest is the
example-weighted mean over all batches; parameters are those with ``requires_grad``. Every
function evaluates the model in ``eval()`` mode and leaves its parameters, buffers and
training flags exactly as it found them. See ``docs/sharpness.md``.
"""

from ._common import batch_size, split_batch, trainable_parameters
from .hessian import (
    EigenResult,
    SpectralDensity,
    TraceResult,
    hessian_trace,
    hvp,
    spectral_density,
    top_hessian_eigenvalues,
)
from .landscape import (
    Interpolation,
    LossSlice,
    LossSurface,
    filter_normalized_direction,
    interpolate,
    loss_slice_1d,
    loss_surface_2d,
)
from .measure import AVAILABLE_METRICS, DEFAULT_METRICS, format_table, measure
from .plotting import (
    plot_interpolation,
    plot_loss_slice,
    plot_loss_surface,
    plot_spectral_density,
)
from .sharpness import (
    AverageSharpnessResult,
    MSharpnessResult,
    average_sharpness,
    m_sharpness,
)

__all__ = [
    "AVAILABLE_METRICS",
    "DEFAULT_METRICS",
    "AverageSharpnessResult",
    "EigenResult",
    "Interpolation",
    "LossSlice",
    "LossSurface",
    "MSharpnessResult",
    "SpectralDensity",
    "TraceResult",
    "average_sharpness",
    "batch_size",
    "filter_normalized_direction",
    "format_table",
    "hessian_trace",
    "hvp",
    "interpolate",
    "loss_slice_1d",
    "loss_surface_2d",
    "m_sharpness",
    "measure",
    "plot_interpolation",
    "plot_loss_slice",
    "plot_loss_surface",
    "plot_spectral_density",
    "spectral_density",
    "split_batch",
    "top_hessian_eigenvalues",
    "trainable_parameters",
]
