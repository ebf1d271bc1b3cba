"""What an execution strategy receives and must do.

A strategy computes the mSAM gradient of one batch and **adds** it into ``p.grad``::

    p.grad += grad_weight * loss_scale * sum_j (n_j / n) * h_j,   h_j = grad L_j(w + e_j)

and returns the weighted mean loss at ``w``. It must leave the parameters at ``w`` (restored
from ``GradientJob.backup``, never by subtracting ``e_j``) and apply the BatchNorm policy of
:mod:`msam.core.batchnorm`. Strategies differ only in how they schedule the work (one
micro-batch after another, or vectorised with ``torch.func.vmap``); results agree to rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["GradientJob", "NonFiniteLossError", "Strategy", "check_loss"]


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient was inf/NaN; ``phase`` is ``"ascent"`` or ``"perturbed"``."""

    def __init__(self, phase: str, micro_batch: int, what: str = "loss") -> None:
        self.phase, self.micro_batch, self.what = phase, micro_batch, what
        super().__init__(
            f"non-finite {what} in the {phase} pass of micro-batch {micro_batch}; parameters, "
            "BatchNorm buffers and optimizer state were left as before the step"
        )


def _null_descent(j: int, m: int) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class GradientJob:
    loss_fn: Callable[[Any], torch.Tensor]
    micro_batches: list[tuple[Any, float]]  # (micro_batch, n_j / n)
    params: list[torch.Tensor]              # every parameter that receives a gradient
    perturb: list[bool]                     # which of them are moved by e_j
    rhos: list[float]
    etas: list[float]
    adaptive: bool
    backup: list[torch.Tensor]              # exact copies of params at w
    loss_scale: float = 1.0                 # GradScaler scale (1.0 without one)
    grad_weight: float = 1.0                # extra factor, e.g. 1/k for k accumulation calls
    model: nn.Module | None = None
    ascent_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    descent_context: Callable[[int, int], contextlib.AbstractContextManager] = field(
        default=_null_descent
    )
    commit_batchnorm: bool = True
    # Optional transform of the ascent gradients g_j (after unscaling, before e_j is computed),
    # e.g. msam.distributed's all-reduce for its "synchronized" mode. Honoured by the loop
    # strategy only; it receives and returns one entry (tensor or None) per perturbed parameter.
    ascent_grad_hook: Callable[[tuple], tuple] | None = None

    @property
    def rho_is_zero(self) -> bool:
        return all(r == 0 for r, k in zip(self.rhos, self.perturb) if k) or not any(self.perturb)


def check_loss(loss: Any, phase: str, j: int) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
        )
    if not loss.requires_grad:
        raise ValueError("loss_fn returned a loss that does not require grad (no parameter in it?)")
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteLossError(phase, j)
    return loss.reshape(())


class Strategy:
    """Base class; subclasses implement :meth:`accumulate`."""

    name = "base"

    def accumulate(self, job: GradientJob) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
