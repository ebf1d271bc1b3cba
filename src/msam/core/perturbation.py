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


_NATIVE_NORM_DTYPES = (torch.float32, torch.float64)


def _tensor_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms: float32 / float64 tensors in their own dtype with one fused
    ``torch._foreach_norm`` call per (device, dtype); other dtypes (float16, bfloat16) in float64,
    so that squaring cannot overflow."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for (_, dtype), idx in groups.items():
        if dtype in _NATIVE_NORM_DTYPES:
            norms = torch._foreach_norm([tensors[i] for i in idx])
        else:
            norms = [torch.linalg.vector_norm(tensors[i], dtype=torch.float64) for i in idx]
        for i, n in zip(idx, norms):
            out[i] = n
    return out


def perturbation_norm(
    grads: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    adaptive: bool = False,
    etas: Sequence[float] | None = None,
) -> torch.Tensor:
    """``||g||`` (SAM) or ``||T g||`` (ASAM) over all parameters with a gradient, as a 0-d tensor.

    Each parameter's norm is computed by a fused kernel in its own dtype (float16 / bfloat16 in
    float64, so it does not overflow), and the per-parameter norms are combined in float64 on
    the first gradient's device.
    """
    present = [(i, g) for i, g in enumerate(grads) if g is not None]
    if not present:
        return torch.zeros((), dtype=torch.float64)
    device = present[0][1].device
    scaled = [_scaled(g, params[i], adaptive, etas[i] if etas is not None else 0.01)
              for i, g in present]
    norms = _tensor_norms(scaled)
    stacked = torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])
    return stacked.pow(2).sum().sqrt()


def _covers_its_storage(t: torch.Tensor) -> bool:
    """``t`` reaches every element of its storage exactly once (dense and non-overlapping, e.g.
    a contiguous or transposed tensor; not an expanded one, not a slice of a bigger buffer)."""
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return False
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _writable(g: torch.Tensor, seen: set[int]) -> bool:
    """Whether ``perturbation(..., inplace=True)`` may overwrite ``g``: it owns its whole
    storage (a gradient that autograd returned as a transposed view of a fresh buffer does; an
    expanded tensor or a slice of a flat buffer does not), shares no storage with an earlier
    gradient (autograd can hand one tensor to two inputs) and has no autograd history."""
    if g.requires_grad or g.layout != torch.strided or g.numel() == 0:
        return False
    if not _covers_its_storage(g):
        return False
    ptr = g.untyped_storage().data_ptr()
    if ptr in seen:
        return False
    seen.add(ptr)
    return True


@torch.no_grad()
def perturbation(
    grads: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    rhos: Sequence[float],
    adaptive: bool = False,
    etas: Sequence[float] | None = None,
    *,
    inplace: bool = False,
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """Per-parameter perturbations ``e`` and the norm they were normalised by.

    ``rhos[i]`` (and ``etas[i]``) belong to parameter ``i`` (they come from its param group).
    A parameter whose gradient is ``None`` gets ``None`` (it is not moved). Each ``e_i`` is
    ``g_i * s`` (ASAM: ``T_i * T_i * g_i * s``) with the scale ``s = rho_i / (norm + eps)``
    rounded to ``g_i``'s dtype; parameters sharing ``rho``, device and dtype are scaled by one
    fused ``torch._foreach_mul`` call. ``inplace=True`` (for gradients the caller owns and
    discards) writes ``e_i`` into ``grads[i]`` wherever that is safe, saving one
    parameter-sized buffer; the values are the same either way.
    """
    norm = perturbation_norm(grads, params, adaptive, etas)
    out: list[torch.Tensor | None] = [None] * len(grads)
    scales: dict[tuple[float, torch.device, torch.dtype], torch.Tensor] = {}
    seen: set[int] = set()

    def scale_for(i: int, g: torch.Tensor) -> torch.Tensor:
        key = (float(rhos[i]), g.device, g.dtype)
        if key not in scales:
            scales[key] = (rhos[i] / (norm + EPS)).to(device=g.device, dtype=g.dtype)
        return scales[key]

    own = [g is not None and inplace and _writable(g, seen) for g in grads]
    # Out-of-place results first: a gradient overwritten in place may be read by another entry.
    order = [i for i in range(len(grads)) if not own[i]] + [i for i in range(len(grads)) if own[i]]
    if adaptive:
        for i in order:
            g = grads[i]
            if g is None:
                continue
            eta = etas[i] if etas is not None else 0.01
            t = params[i].abs() + eta
            if own[i]:
                out[i] = g.mul_(t * t).mul_(scale_for(i, g))
            else:
                out[i] = t * t * g * scale_for(i, g)
        return out, norm
    groups: dict[tuple[float, torch.device, torch.dtype, bool], list[int]] = {}
    for i in order:
        g = grads[i]
        if g is not None:
            scale_for(i, g)
            groups.setdefault((float(rhos[i]), g.device, g.dtype, own[i]), []).append(i)
    for (rho, device, dtype, is_own), idx in groups.items():
        tensors = [grads[i] for i in idx]
        scale = scales[(rho, device, dtype)]
        if is_own:
            torch._foreach_mul_(tensors, scale)
            results = tensors
        else:
            results = torch._foreach_mul(tensors, scale)
        for i, e in zip(idx, results):
            out[i] = e
    return out, norm
