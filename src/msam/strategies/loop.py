"""The ``loop`` strategy: micro-batches one after another.

Per micro-batch ``j``: forward + ``autograd.grad`` at ``w`` (ascent; nothing written to
``.grad``); then, once the engine has turned ``g_j`` into ``e_j``, move the perturbed parameters
by ``e_j``, forward + ``backward`` at ``w + e_j`` with the loss scaled by ``n_j / n`` (so
``.grad`` accumulates the weighted average), and copy ``w`` back from the backup. Peak memory is
SAM's plus the backup of the weights: one micro-batch's activations are alive at a time. Works
with any model, including ones that ``vmap`` cannot trace.
"""

from __future__ import annotations

import torch

from msam.strategies.base import Offsets, StepContext, Strategy, check_loss, fresh_autocast

__all__ = ["LoopStrategy", "moved_to"]


class moved_to:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within the block, the perturbed parameters are at ``w + e``; ``w`` is copied back from
    ``ctx.backup`` on leaving it, whatever happens inside."""

    def __init__(self, ctx: StepContext, e: Offsets) -> None:
        self.ctx, self.e = ctx, e

    def __enter__(self) -> None:
        moved = [(p, e) for p, e in zip(self.ctx.pert_params, self.e) if e is not None]
        with torch.no_grad():
            torch._foreach_add_([p for p, _ in moved], [e for _, e in moved])
        self.e = []  # e_j is not needed during the pass: free it before the forward

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.ctx.pert_params, self.ctx.backup)


class LoopStrategy(Strategy):
    name = "loop"

    def ascent(self, ctx: StepContext, idx: list[int]) -> list[tuple[torch.Tensor, Offsets]]:
        (j,) = idx
        with ctx.bn.pass_(record=True):
            fresh_autocast()
            loss = check_loss(ctx.loss_fn(ctx.micro_batches[j][0]))
            grads = torch.autograd.grad(ctx.scaled(loss), ctx.pert_params, allow_unused=True)
        return [(loss.detach(), ctx.unscaled(list(grads)))]

    def descent(self, ctx: StepContext, idx: list[int],
                offsets: list[Offsets] | None) -> list[torch.Tensor]:
        (j,) = idx
        if offsets is None:  # rho = 0: one pass at w, whose statistics are the step's
            with ctx.bn.pass_(record=True):
                return [self._backward(ctx, j)]
        e_j, offsets[0] = offsets[0], []   # take it: the pass runs with e_j freed
        with moved_to(ctx, e_j), ctx.bn.pass_(record=ctx.perturbed_stats):
            del e_j
            return [self._backward(ctx, j)]

    def _backward(self, ctx: StepContext, j: int) -> torch.Tensor:
        mb, weight = ctx.micro_batches[j]
        fresh_autocast()
        loss = check_loss(ctx.loss_fn(mb))
        ctx.scaled(loss * (weight * ctx.grad_weight)).backward(inputs=ctx.params)
        return loss.detach()
