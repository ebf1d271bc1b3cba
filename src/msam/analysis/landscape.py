"""Loss-landscape slices (Li et al. 2018) and linear interpolation between checkpoints.

* Li, H., Xu, Z., Taylor, G., Studer, C., Goldstein, T. (2018). Visualizing the loss
  landscape of neural nets. *NeurIPS*. -- filter-normalised random directions.
* Goodfellow, I., Vinyals, O., Saxe, A. (2015). Qualitatively characterizing neural network
  optimization problems. *ICLR*. -- 1-D linear interpolation between two solutions.

All functions evaluate the example-weighted mean loss over ``batches`` in ``eval()`` mode,
never build autograd graphs, and restore parameters, buffers and training flags exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._common import (
    LossFn,
    as_batch_list,
    as_param_list,
    eval_mode,
    make_generator,
    mean_loss,
    preserved_state,
    set_params,
    trainable_parameters,
)

__all__ = [
    "Interpolation",
    "LossSlice",
    "LossSurface",
    "filter_normalized_direction",
    "interpolate",
    "loss_slice_1d",
    "loss_surface_2d",
]


def filter_normalized_direction(
    model: nn.Module,
    seed: int = 0,
    ignore_bias_and_norm: bool = True,
    normalization: str = "filter",
) -> list[Tensor]:
    """A random Gaussian direction ``d`` rescaled filter-wise (Li et al. 2018, Sec. 4).

    For every parameter tensor with at least two dimensions, each *filter* ``d_i`` -- the slice
    along ``dim 0`` (a convolution's output channel; a linear layer's row, i.e. a neuron
    treated as a 1x1 convolution) -- is rescaled to ``d_i <- d_i / ||d_i|| * ||w_i||``, so the
    direction has the same per-filter scale as the weights. This removes the scale invariance
    that makes un-normalised plots of ReLU/BN networks misleading.

    One-dimensional parameters (biases, BatchNorm/LayerNorm scales and shifts) get a zero
    direction by default (``ignore_bias_and_norm=True``), as recommended by Li et al.: they
    are few and perturbing them mostly shifts activations. With ``ignore_bias_and_norm=False``
    they are normalised as a single filter (``d <- d / ||d|| * ||w||``).

    ``normalization="layer"`` normalises each tensor as a whole instead of per filter;
    ``"none"`` returns the raw Gaussian direction (for 2-D+ tensors). Note that for layers
    whose ``dim 0`` is not the output channel (e.g. ``ConvTranspose``) "filter" means the
    ``dim 0`` slice.

    Returns a list of tensors shaped like the trainable parameters. Draws use a seeded CPU
    generator, so the direction does not depend on the device.
    """
    if normalization not in ("filter", "layer", "none"):
        raise ValueError("normalization must be 'filter', 'layer' or 'none'")
    gen = make_generator(seed)
    out = []
    for p in trainable_parameters(model):
        w = p.detach()
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        d = d.to(dtype=w.dtype, device=w.device)
        if w.dim() <= 1:
            if ignore_bias_and_norm:
                d = torch.zeros_like(w)
            else:
                d = _rescale(d, w)
        elif normalization == "filter":
            d = torch.stack([_rescale(di, wi) for di, wi in zip(d, w)])
        elif normalization == "layer":
            d = _rescale(d, w)
        out.append(d)
    return out


def _rescale(d: Tensor, w: Tensor) -> Tensor:
    dn = torch.linalg.vector_norm(d)
    if float(dn) == 0.0:
        return torch.zeros_like(d)
    return d * (torch.linalg.vector_norm(w) / dn)


@dataclass
class LossSlice:
    """``losses[i] = L(w + alphas[i] d)``."""

    alphas: list[float]
    losses: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"alphas": list(map(float, self.alphas)), "losses": list(map(float, self.losses))}


@dataclass
class LossSurface:
    """``losses[i][j] = L(w + alphas[i] d1 + betas[j] d2)`` (shape ``len(alphas) x
    len(betas)``)."""

    alphas: list[float]
    betas: list[float]
    losses: list[list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "alphas": list(map(float, self.alphas)),
            "betas": list(map(float, self.betas)),
            "losses": [list(map(float, row)) for row in self.losses],
        }


def _as_floats(values: Sequence[float] | np.ndarray | Tensor) -> list[float]:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return [float(x) for x in np.asarray(values, dtype=np.float64).reshape(-1)]


def loss_slice_1d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    direction: Tensor | Sequence[Tensor],
    alphas: Sequence[float] | np.ndarray | Tensor,
) -> LossSlice:
    """Loss along a line: ``L(w + alpha d)`` for each ``alpha`` (Li et al. 2018).

    ``direction`` is a list of parameter-shaped tensors (e.g. from
    :func:`filter_normalized_direction`) or one flat tensor. Each point is evaluated from the
    saved weights (``w + alpha d``, not by accumulating steps).
    """
    surface = loss_surface_2d(model, loss_fn, batches, direction, None, alphas, [0.0])
    return LossSlice(surface.alphas, [row[0] for row in surface.losses])


def loss_surface_2d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    d1: Tensor | Sequence[Tensor],
    d2: Tensor | Sequence[Tensor] | None,
    alphas: Sequence[float] | np.ndarray | Tensor,
    betas: Sequence[float] | np.ndarray | Tensor,
) -> LossSurface:
    """Loss on a plane: ``L(w + alpha d1 + beta d2)`` on the grid ``alphas x betas``.

    Li et al. (2018) use two independent filter-normalised directions (nearly orthogonal in
    high dimension). Cost: ``len(alphas) * len(betas)`` loss evaluations over all batches.
    ``d2=None`` means a zero second direction.
    """
    batches = as_batch_list(batches)
    params = trainable_parameters(model)
    u = [t.detach() for t in as_param_list(d1, params)]
    v = None if d2 is None else [t.detach() for t in as_param_list(d2, params)]
    a_list, b_list = _as_floats(alphas), _as_floats(betas)
    losses: list[list[float]] = []
    with eval_mode(model), preserved_state(model) as base:
        for a in a_list:
            row = []
            for b in b_list:
                if v is None:
                    point = [w + a * x for w, x in zip(base, u)]
                else:
                    point = [w + a * x + b * y for w, x, y in zip(base, u, v)]
                set_params(params, point)
                row.append(mean_loss(model, loss_fn, batches))
            losses.append(row)
    return LossSurface(a_list, b_list, losses)


@dataclass
class Interpolation:
    """``losses[i] = L((1 - alphas[i]) theta_a + alphas[i] theta_b)``."""

    alphas: list[float]
    losses: list[float]
    recompute_bn: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "alphas": list(map(float, self.alphas)),
            "losses": list(map(float, self.losses)),
            "recompute_bn": bool(self.recompute_bn),
        }


def _recompute_bn_stats(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any]) -> None:
    """Re-estimate BatchNorm running statistics (cumulative average over ``batches``)."""
    bns = [mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    try:
        for bn in bns:
            if bn.track_running_stats:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative moving average
            bn.train()
        with torch.no_grad():
            for batch in batches:
                loss_fn(model, batch)
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
            bn.eval()


def interpolate(
    model_a_state: Mapping[str, Tensor],
    model_b_state: Mapping[str, Tensor],
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    alphas: Sequence[float] | np.ndarray | Tensor | None = None,
    num_points: int = 21,
    recompute_bn: bool = False,
) -> Interpolation:
    """Loss along the straight line between two checkpoints (Goodfellow et al. 2015).

    ``theta(alpha) = (1 - alpha) theta_a + alpha theta_b`` for every floating-point entry of
    the two state dicts (parameters *and* floating buffers such as BatchNorm running
    statistics); non-floating entries (e.g. ``num_batches_tracked``) are taken from
    ``model_a_state``. ``alphas`` defaults to ``np.linspace(0, 1, num_points)``; values
    outside ``[0, 1]`` extrapolate beyond the endpoints.

    Caveat: interpolated BatchNorm running statistics do not match the interpolated weights.
    ``recompute_bn=True`` re-estimates them at each point by forward passes over ``batches``
    in BatchNorm-train mode (dropout stays off), which is usually what one wants for
    BN networks.

    ``model`` is used as the evaluation vehicle: it is loaded with each interpolated state
    and restored to its own original state (and training flags) afterwards.
    """
    batches = as_batch_list(batches)
    if set(model_a_state) != set(model_b_state):
        raise ValueError("the two state dicts have different keys")
    a_list = _as_floats(np.linspace(0.0, 1.0, num_points) if alphas is None else alphas)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses = []
    with eval_mode(model):
        try:
            for t in a_list:
                state = {}
                for key, va in model_a_state.items():
                    vb = model_b_state[key]
                    if torch.is_floating_point(va):
                        state[key] = (1.0 - t) * va.detach() + t * vb.detach().to(va)
                    else:
                        state[key] = va
                model.load_state_dict(state)
                if recompute_bn:
                    _recompute_bn_stats(model, loss_fn, batches)
                losses.append(mean_loss(model, loss_fn, batches))
        finally:
            model.load_state_dict(original)
    return Interpolation(a_list, losses, recompute_bn)
