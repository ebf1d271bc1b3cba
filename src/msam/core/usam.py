"""USAM: SAM without the normalisation of the ascent step.

Unnormalised SAM (Andriushchenko & Flammarion, "Towards Understanding Sharpness-Aware
Minimization", ICML 2022, Section 3) drops the division by the gradient norm, which they use to
study what SAM's normalisation does::

    e_j  = rho * g_j                                  (g_j = grad L_j(w))
    grad = sum_j (n_j / n) grad L_j(w + e_j)

``rho`` (per param group) is then a step size, not a radius: ``||e_j|| = rho ||g_j||``, so the
useful values are much larger than SAM's (the paper's range reaches 0.5 and more on CIFAR).
State: none. Extra memory: as SAM. Passes per step: 2 per micro-batch (as SAM).
"""

from __future__ import annotations

import torch

from msam.core.perturbation import PerturbationRule, global_norm, sum_of_squares

__all__ = ["USAMRule"]


class USAMRule(PerturbationRule):
    """USAM: ``e = rho g`` (see the module docstring)."""

    name = "usam"
    title = "USAM"
    elementwise = True

    @torch.no_grad()
    def __call__(self, grads, params, groups, *, owned=False, reduce_sq=None, exclusive=False):
        present = [g for g in grads if g is not None]
        # The norm is returned for the non-finite check of the ascent gradient only.
        norm = global_norm(present) if reduce_sq is None else \
            reduce_sq(sum_of_squares(present)).sqrt()
        e = [None if g is None else g * float(group["rho"]) for g, group in zip(grads, groups)]
        return e, norm
