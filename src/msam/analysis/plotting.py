"""PNG plots of loss slices, surfaces, interpolations and spectral densities.

They live in :mod:`msam.plotting` (every plot of msam, one matplotlib setup); this module keeps
the names importable from ``msam.analysis.plotting``.
"""

from msam.plotting import (
    plot_interpolation,
    plot_loss_slice,
    plot_loss_surface,
    plot_spectral_density,
)

__all__ = [
    "plot_interpolation",
    "plot_loss_slice",
    "plot_loss_surface",
    "plot_spectral_density",
]
