"""The evaluator behind ``step(closure)`` and ``loss_fn`` without a batch (one micro-batch).

A closure in the ``torch.optim`` convention runs the forward pass, calls ``backward()`` itself
and returns the loss; a ``loss_fn()`` without a batch only returns the loss. Both are accepted:
each pass clears ``.grad``, calls the function and reads the gradient from ``.grad`` when the
function filled it, or takes it with ``autograd`` otherwise. The gradients that were in
``.grad`` before the pass are put back (and added to), so accumulation keeps working.
"""

from __future__ import annotations

import torch

from msam.strategies.base import Offsets, StepContext, Strategy, check_loss, fresh_autocast
from msam.strategies.loop import moved_to

__all__ = ["ClosureStrategy"]


class ClosureStrategy(Strategy):
    name = "closure"

    def _call(self, ctx: StepContext, inputs: list[torch.Tensor], coef: float
              ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """``(loss, [coef * grad of loss for each input])`` with ``.grad`` left as it was."""
        saved = [p.grad for p in ctx.params]
        for p in ctx.params:
            p.grad = None
        try:
            fresh_autocast()
            with torch.enable_grad():
                loss = check_loss(ctx.loss_fn(None))
            if any(p.grad is not None for p in ctx.params):  # the closure ran backward()
                if ctx.loss_scale is not None:
                    raise ValueError(
                        "scaler: a closure that calls backward() itself cannot be loss-scaled "
                        "by msam; pass loss_fn and batch (step(loss_fn, batch, scaler=...))"
                    )
                grads = [None if p.grad is None else p.grad * coef for p in inputs]
            else:
                raw = torch.autograd.grad(ctx.scaled(loss * coef), inputs, allow_unused=True)
                grads = _own(raw)
        finally:
            for p, g in zip(ctx.params, saved):
                p.grad = g
        return loss.detach(), grads

    def ascent(self, ctx: StepContext, idx: list[int]) -> list[tuple[torch.Tensor, Offsets]]:
        with ctx.bn.pass_(record=True):
            loss, grads = self._call(ctx, ctx.pert_params, 1.0)
        return [(loss, ctx.unscaled(grads))]

    def descent(self, ctx: StepContext, idx: list[int],
                offsets: list[Offsets] | None) -> list[torch.Tensor]:
        coef = ctx.micro_batches[0][1] * ctx.grad_weight
        if offsets is None:
            with ctx.bn.pass_(record=True):
                loss, grads = self._call(ctx, ctx.params, coef)
        else:
            e, offsets[0] = offsets[0], []
            with moved_to(ctx, e), ctx.bn.pass_(record=ctx.perturbed_stats):
                del e
                loss, grads = self._call(ctx, ctx.params, coef)
        with torch.no_grad():
            for p, g in zip(ctx.params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        return [loss]


def _own(grads: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
    """``autograd.grad``'s outputs made safe to keep as ``.grad``: it may hand one tensor to
    several inputs (``a + b``) or an expanded one (``b.sum()``), which later in-place updates
    (accumulation, a reuse schedule) would write through; those are copied."""
    seen: set[int] = set()
    out: list[torch.Tensor | None] = []
    for g in grads:
        if g is not None:
            ptr = g.untyped_storage().data_ptr()
            if ptr in seen or not g.is_contiguous():
                g = g.clone(memory_format=torch.contiguous_format)
            seen.add(g.untyped_storage().data_ptr())
        out.append(g)
    return out
