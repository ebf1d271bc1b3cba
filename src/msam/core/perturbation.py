"""The SAM / ASAM ascent step (the perturbation ``e``), as pure tensor math.

SAM (Foret et al., ICLR 2021) approximates ``max_{||e||_2 <= rho} L(w + e)`` by one normalised
gradient step::

    e = rho * g / (||g|| + eps)

ASAM (Kwon et al., ICML 2021) measures the neighbourhood relative to the weights, with the
elementwise operator ``T = |w| + eta``::

    e = rho * T^2 g / (||T g|| + eps)

``||.||`` is the global L2 norm over every perturbed parameter. ``eps = 1e-12`` keeps a zero
gradient from dividing by zero (then ``e = 0``). In mSAM (Behdin et al. 2023) this is evaluated
once per micro-batch ``j`` with that micro-batch's own gradient ``g_j``.

Weight decay never enters ``e``: it belongs to the base optimizer (decoupled), so ``g`` here is
the gradient of the loss alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["EPS", "perturbation", "perturbation_norm"]

#: Added to the norm so that a zero gradient gives a zero perturbation instead of NaN.
EPS = 1e-12


def _scaled(g: torch.Tensor, w: torch.Tensor, adaptive: bool, eta: float) -> torch.Tensor:
    return g * (w.abs() + eta) if adaptive else g


def perturbation_norm(
    grads: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    adaptive: bool = False,
    etas: Sequence[float] | None = None,
) -> torch.Tensor:
    """``||g||`` (SAM) or ``||T g||`` (ASAM) over all parameters with a gradient, as a 0-d tensor.

    Each parameter's contribution is computed in its own dtype and summed in float64 on the
    first gradient's device, so the norm does not overflow in half precision.
    """
    present = [(i, g) for i, g in enumerate(grads) if g is not None]
    if not present:
        return torch.zeros((), dtype=torch.float64)
    device = present[0][1].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, g in present:
        eta = etas[i] if etas is not None else 0.01
        s = _scaled(g, params[i], adaptive, eta)
        total = total + s.double().pow(2).sum().to(device)
    return total.sqrt()


@torch.no_grad()
def perturbation(
    grads: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    rhos: Sequence[float],
    adaptive: bool = False,
    etas: Sequence[float] | None = None,
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """Per-parameter perturbations ``e`` and the norm they were normalised by.

    ``rhos[i]`` (and ``etas[i]``) belong to parameter ``i`` (they come from its param group).
    A parameter whose gradient is ``None`` gets ``None`` (it is not moved).
    """
    norm = perturbation_norm(grads, params, adaptive, etas)
    out: list[torch.Tensor | None] = []
    for i, g in enumerate(grads):
        if g is None:
            out.append(None)
            continue
        eta = etas[i] if etas is not None else 0.01
        scale = (rhos[i] / (norm + EPS)).to(device=g.device, dtype=g.dtype)
        if adaptive:
            t = params[i].abs() + eta
            out.append(t * t * g * scale)
        else:
            out.append(g * scale)
    return out, norm
