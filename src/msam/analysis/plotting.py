"""PNG plots of landscape slices, interpolations and Hessian spectral densities.

The only module of :mod:`msam.analysis` that performs I/O. It uses matplotlib's Agg canvas
directly (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``), so it neither needs a display
nor touches pyplot's global state or the user's selected backend. matplotlib is imported
lazily; it is an optional dependency (``pip install msam[experiments]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .hessian import SpectralDensity
from .landscape import Interpolation, LossSlice, LossSurface

__all__ = [
    "plot_interpolation",
    "plot_loss_slice",
    "plot_loss_surface",
    "plot_spectral_density",
]


def _figure(figsize: tuple[float, float] = (5.0, 3.6)) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'msam[experiments]'") from exc
    fig = Figure(figsize=figsize, dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


def plot_loss_slice(
    result: LossSlice | Sequence[LossSlice],
    path: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
    title: str | None = None,
    log_scale: bool = False,
) -> Path:
    """Line plot of one or several 1-D loss slices; returns the PNG path."""
    slices = [result] if isinstance(result, LossSlice) else list(result)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for i, sl in enumerate(slices):
        label = labels[i] if labels is not None else None
        ax.plot(sl.alphas, sl.losses, marker=".", label=label)
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel(r"$L(w + \alpha d)$")
    if log_scale:
        ax.set_yscale("log")
    if labels is not None:
        ax.legend()
    ax.set_title(title or "1-D loss slice")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_loss_surface(
    result: LossSurface,
    path: str | os.PathLike[str],
    levels: int = 30,
    title: str | None = None,
    log_scale: bool = False,
) -> Path:
    """Filled contour plot of a 2-D loss surface; returns the PNG path."""
    z = np.asarray(result.losses, dtype=np.float64).T  # rows: betas, cols: alphas
    if log_scale:
        z = np.log10(np.maximum(z, np.finfo(np.float64).tiny))
    fig = _figure((5.0, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    if len(result.alphas) > 1 and len(result.betas) > 1:
        cs = ax.contourf(result.alphas, result.betas, z, levels=levels, cmap="viridis")
        ax.contour(result.alphas, result.betas, z, levels=levels, colors="k", linewidths=0.3)
        fig.colorbar(cs, ax=ax, label="log10 loss" if log_scale else "loss")
    else:
        ax.plot(result.alphas if len(result.alphas) > 1 else result.betas, z.reshape(-1))
    ax.set_xlabel(r"$\alpha$ (direction 1)")
    ax.set_ylabel(r"$\beta$ (direction 2)")
    ax.set_title(title or "2-D loss surface")
    return _save(fig, path)


def plot_interpolation(
    result: Interpolation,
    path: str | os.PathLike[str],
    title: str | None = None,
    log_scale: bool = False,
) -> Path:
    """Loss along the line between two checkpoints (marks the endpoints); returns the path."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(result.alphas, result.losses, marker=".")
    for x in (0.0, 1.0):
        ax.axvline(x, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(r"$\alpha$  ($\theta = (1-\alpha)\theta_a + \alpha\theta_b$)")
    ax.set_ylabel("loss")
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title or "linear interpolation")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_spectral_density(
    result: SpectralDensity,
    path: str | os.PathLike[str],
    title: str | None = None,
    log_scale: bool = True,
) -> Path:
    """Hessian eigenvalue density (SLQ), log-scaled density axis by default."""
    grid = np.asarray(result.grid, dtype=np.float64)
    dens = np.asarray(result.density, dtype=np.float64)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if log_scale:
        floor = max(float(dens.max()) * 1e-12, np.finfo(np.float64).tiny)
        ax.semilogy(grid, np.maximum(dens, floor))
    else:
        ax.plot(grid, dens)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title or f"Hessian spectral density (SLQ, sigma={result.sigma:.3g})")
    ax.grid(alpha=0.3)
    return _save(fig, path)
