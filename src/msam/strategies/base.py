"""What an execution strategy is: an evaluator of micro-batch gradients.

The engine (:mod:`msam.optim.engine`) owns the mSAM math -- split, ``e_j`` from the
perturbation rule, the weights ``n_j / n``, restore, BatchNorm commit, non-finite handling. A
strategy only answers two questions for a chunk of micro-batches (``loop``: one micro-batch;
``vmap``: all micro-batches of one size):

* :meth:`Strategy.ascent`: the loss ``L_j(w)`` and the gradient ``g_j = grad L_j(w)`` of the
  perturbed parameters, for each ``j`` in the chunk (BatchNorm statistics recorded); the
  gradients are handed over (the rule may write ``e_j`` into them);
* :meth:`Strategy.descent`: add ``coef * sum_j (n_j / n) * grad L_j(w + e_j)`` to ``p.grad`` of
  every parameter (``coef`` = accumulation weight x loss scale) and return each ``L_j(w + e_j)``;
  with ``offsets=None`` the point is ``w`` itself and the statistics are recorded (``rho = 0``:
  the only pass).

It must leave the parameters at ``w`` (copied back from ``StepContext.backup``, never by
subtracting ``e_j``), run each pass inside ``ctx.bn`` (the BatchNorm rule), and may not check
values (no host sync): the engine records finiteness on the device. A strategy that needs to
communicate (``msam.distributed``) wraps the whole computation in :meth:`Strategy.session`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from msam.core.batchnorm import BatchNormStep
from msam.core.nonfinite import NonFiniteFlags, NonFiniteLossError

__all__ = [
    "NonFiniteLossError", "StepContext", "Strategy", "check_loss", "fresh_autocast", "local",
]

Offsets = list[torch.Tensor | None]
#: What a fused strategy returns for a chunk: the losses at ``w``, the norms, the losses at
#: ``w + e_j`` and the chunk's clean gradient (or ``None``); see :meth:`Strategy.sam_chunk`.
FusedChunk = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], Offsets | None]


@dataclass
class StepContext:
    """Everything a strategy needs for one gradient computation."""

    loss_fn: Callable[[Any], torch.Tensor]
    micro_batches: list[tuple[Any, float]]  # (micro-batch, n_j / n)
    params: list[torch.Tensor]              # every parameter that receives a gradient
    perturbed: list[int]                    # indices (into params) of those moved by e_j
    backup: list[torch.Tensor]              # exact copies at w of params[i], i in perturbed
    bn: BatchNormStep
    flags: NonFiniteFlags
    loss_scale: torch.Tensor | None = None  # GradScaler scale on the device (None: no scaler)
    grad_weight: float = 1.0                # e.g. 1/k for k accumulation calls
    model: nn.Module | None = None
    #: The pass at w + e_j is the step's only pass (Momentum-SAM): its BatchNorm statistics
    #: are the step's.
    perturbed_stats: bool = False

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the GradScaler scale (a device tensor: no host sync)."""
        return loss if self.loss_scale is None else loss * self.loss_scale

    def unscaled(self, grads: list) -> list:
        if self.loss_scale is None:
            return grads
        return [None if g is None else g / self.loss_scale for g in grads]

    @property
    def pert_params(self) -> list[torch.Tensor]:
        return [self.params[i] for i in self.perturbed]


def check_loss(loss: Any) -> torch.Tensor:
    """The loss as a 0-d tensor; a wrong type or shape is an error (no value check, no sync)."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
        )
    if not loss.requires_grad:
        raise ValueError("loss_fn returned a loss that does not require grad (no parameter in it?)")
    return loss.reshape(())


def local(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a sharded ``DTensor`` (FSDP2) this rank's shard: an alias, so a
    write into it (under ``no_grad``) changes the shard."""
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()


def fresh_autocast() -> None:
    """Drop autocast's cache of cast weights before a pass: the weights move between passes,
    and a cast made at ``w`` must not be reused at ``w + e_j``."""
    torch.clear_autocast_cache()


class Strategy:
    """Base class of the evaluators (see the module docstring)."""

    name = "base"
    #: A strategy that can run a whole SAM step of a chunk itself (ascent, the rule, descent:
    #: :meth:`sam_chunk`) sets this; the engine then offers it every chunk of an active step
    #: (the ``lowrank`` strategy, which never forms ``g_j``; see docs/core.md).
    fused_sam = False

    def sam_chunk(self, ctx: StepContext, idx: list[int], rule: Any, groups: Any,
                  clean: bool = False) -> FusedChunk | None:
        """(``fused_sam``) Add ``coef * sum_j (n_j / n) h_j`` of chunk ``idx`` to ``p.grad``
        with ``e_j`` from ``rule``, and return the losses ``L_j(w)``, the norms the rule
        normalised by, the losses ``L_j(w + e_j)`` and, with ``clean``, the chunk's clean
        gradient ``sum_j weight (n_j / n) g_j`` over ``ctx.pert_params`` (else ``None``); or
        ``None`` (nothing done) to leave the chunk to the ordinary ascent -> rule -> descent
        path."""
        return None

    def chunks(self, ctx: StepContext) -> list[list[int]]:
        """Micro-batch indices evaluated together; one at a time by default."""
        return [[j] for j in range(len(ctx.micro_batches))]

    def ascent(self, ctx: StepContext, idx: list[int]
               ) -> list[tuple[torch.Tensor, Offsets]]:  # pragma: no cover - interface
        raise NotImplementedError

    def descent(self, ctx: StepContext, idx: list[int],
                offsets: list[Offsets] | None) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def descent_each(self, ctx: StepContext, idx: list[int], offsets: list[Offsets]
                     ) -> list[tuple[torch.Tensor, Offsets]]:
        """As :meth:`descent`, but hands back each micro-batch's contribution ``c_j`` (one
        tensor or ``None`` per parameter: what :meth:`descent` would add to ``p.grad``)
        instead of adding it, for rules that combine ``g_j`` and ``h_j``. By default one
        :meth:`descent` per micro-batch into emptied ``.grad``; ``.grad`` is put back."""
        saved = [p.grad for p in ctx.params]
        out = []
        try:
            for k, j in enumerate(idx):
                for p in ctx.params:
                    p.grad = None
                (loss,) = self.descent(ctx, [j], [offsets[k]])
                offsets[k] = []
                out.append((loss, [p.grad for p in ctx.params]))
        finally:
            for p, g in zip(ctx.params, saved):
                p.grad = g
        return out

    def resolve(self, ctx: StepContext, trial: Callable[[Strategy], float]) -> Strategy:
        """The evaluator for this step; ``trial(candidate)`` runs the whole computation with
        ``candidate`` (nothing committed) and returns its wall time (``auto`` uses it)."""
        return self

    @contextlib.contextmanager
    def session(self, ctx: StepContext) -> Iterator[None]:
        """Wraps one whole gradient computation (communication set-up, error agreement)."""
        yield

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
