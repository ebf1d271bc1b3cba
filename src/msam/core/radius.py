"""Choosing rho when changing m: the radius that matches SAM's at m = 1.

In this library's equal-budget studies on an MLP and a BatchNorm CNN the radius chosen on
validation halved each time the number of micro-batches grew 4x: ``rho x sqrt(m)`` stayed
constant. On a GroupNorm CNN it did not: there m barely changed what a radius does, and SAM's
radius is the better start (docs/choosing_rho.md has the evidence, its limits and a check for
your model). :func:`rho_for_m` turns a SAM radius into the rule's mSAM radius::

    import msam, torch
    rho = msam.rho_for_m(0.4, 16)          # 0.1: SAM's 0.4, spread over 16 micro-batches
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=rho, micro_batches=16, lr=0.05)

It is an opt-in helper (run configs: ``rho_scaling: sqrt_m``), never a default: ``MSAM(rho=...)``
is always the radius of each micro-batch's perturbation, as in Behdin et al. (2023).
"""

from __future__ import annotations

import math

__all__ = ["rho_for_m"]


def rho_for_m(rho: float, m: int) -> float:
    """``rho / sqrt(m)``: the per-micro-batch radius matching SAM's radius ``rho`` at ``m``
    micro-batches, by the ``rho x sqrt(m) = const`` rule the studies found."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m: the number of micro-batches must be an int >= 1, got {m!r}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) \
            or rho < 0:
        raise ValueError(f"rho: must be a finite number >= 0, got {rho!r}")
    return float(rho) / math.sqrt(m)
