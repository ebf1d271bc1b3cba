"""GCSAM: SAM with a gradient-centralised ascent gradient.

GCSAM (Hassan et al., "GCSAM: Gradient Centralized Sharpness Aware Minimization", 2025) applies
gradient centralisation (Yong et al., "Gradient Centralization", ECCV 2020) to the ascent
gradient before SAM's normalised step. For a weight tensor with more than one dimension (a
linear layer's ``(out, in)`` matrix, a convolution's ``(out, in, kh, kw)`` kernel), each output
slice has its mean removed::

    GC(g)[o, ...] = g[o, ...] - mean(g[o, ...])          (tensors of dim > 1; biases as they are)
    e_j = rho * GC(g_j) / (||GC(g_j)|| + 1e-12)          (SAM's step on the centralised gradient)
    grad = sum_j (n_j / n) grad L_j(w + e_j)             (the descent gradient is not centralised)

The descent gradient stays as it is, as in the authors' code. Their code divides by the norm of
the *uncentralised* gradient (``||e|| <= rho``); this rule divides by ``||GC(g_j)||`` so that
``||e_j|| = rho``, SAM's radius (docs/variants.md).

Hyperparameters: ``rho`` (per param group, as SAM). State: none. Extra memory: one centralised
copy of each weight gradient per micro-batch (it becomes ``e_j``, so no more than SAM's ``e``).
Passes per step: 2 per micro-batch (as SAM).
"""

from __future__ import annotations

import torch

from msam.core.perturbation import PerturbationRule, SAMRule, check_dense

__all__ = ["GCSAMRule"]

_SAM = SAMRule()


def centralized(g: torch.Tensor) -> torch.Tensor:
    """``g`` minus its mean over every dimension but the first (tensors of dim > 1)."""
    if g.dim() < 2:
        return g
    return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)


class GCSAMRule(PerturbationRule):
    """GCSAM: ``e = rho GC(g) / (||GC(g)|| + 1e-12)`` (see the module docstring)."""

    name = "gcsam"
    title = "GCSAM"
    elementwise = True  # per output row: a Shard(0) shard holds whole rows

    def direction(self, g, w, group):
        return centralized(g)

    def norm_terms(self, g, w, group):
        return centralized(g)

    @torch.no_grad()
    def __call__(self, grads, params, groups, *, owned=False, reduce_sq=None, exclusive=False):
        # GC(g) once per tensor (direction and norm are the same), then SAM's step on it; a
        # centralised tensor is new and distinct, so e_j is written into it.
        check_dense(grads, params)
        fresh = [g is not None and g.dim() >= 2 for g in grads]
        cg = [None if g is None else centralized(g) for g in grads]
        if all(f for f, g in zip(fresh, grads) if g is not None):
            return _SAM(cg, params, groups, owned=True, exclusive=True, reduce_sq=reduce_sq)
        return _SAM(cg, params, groups, owned=owned, reduce_sq=reduce_sq)
