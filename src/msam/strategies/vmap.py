"""The ``vmap`` strategy: all micro-batches of one size in one vectorised call.

Uses :func:`torch.func.functional_call` with :func:`torch.func.grad` under
:func:`torch.func.vmap` over the micro-batch dimension: one vectorised ascent pass gives every
``g_j``, and one vectorised pass at the stacked points ``w + e_j`` gives every ``h_j``
(``e_j`` comes from the engine's perturbation rule, as for every strategy). Micro-batch sizes
may differ by one (``torch.tensor_split``), so the work runs as at most two chunks of equal size.

BatchNorm: the same rule as ``loop`` (:mod:`msam.core.batchnorm`), with the scratch buffers
stacked, one copy per micro-batch, and passed through ``functional_call``. Random operations
(dropout) draw different randomness per micro-batch (``randomness="different"``), so with
dropout the result is not bit-equal to ``loop``.

Needs the model (``model=`` on the optimizer) and a ``loss_fn`` that calls that model object.
Memory holds ``m`` copies of the parameters and all micro-batches' activations at once, so it
trades memory for fewer, larger kernels; whether that is faster depends on the model and
device (see ``msam bench``; the ``auto`` strategy measures it).

``torch.compile``: dynamo does not compile a model called inside ``vmap(grad(...))`` from eager
code, so a compiled model runs eagerly here, announced once by a
:class:`~msam.strategies.compiled.NotCompiledWarning`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from msam.core.batch import batch_size, stack_batches
from msam.strategies.base import Offsets, StepContext, Strategy, fresh_autocast
from msam.strategies.compiled import eager, warn_not_compiled

__all__ = ["VmapStrategy"]


class _LossModule(nn.Module):
    """Holds the model so that functional_call re-parametrises the object ``loss_fn`` calls."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss_fn(batch)


class VmapStrategy(Strategy):
    name = "vmap"

    def chunks(self, ctx: StepContext) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for j, (mb, _) in enumerate(ctx.micro_batches):
            groups.setdefault(batch_size(mb), []).append(j)
        return list(groups.values())

    def ascent(self, ctx: StepContext, idx: list[int]) -> list[tuple[torch.Tensor, Offsets]]:
        losses, grads = self._grads(ctx, idx, None, record=True)
        grads = ctx.unscaled(grads)
        pert = [grads[i] for i in ctx.perturbed]
        return [(losses[r], [g[r] for g in pert]) for r in range(len(idx))]

    @staticmethod
    def _points(ctx: StepContext, offsets: list[Offsets]) -> dict[int, torch.Tensor]:
        """The stacked points ``w + e_j`` of the perturbed parameters (``offsets`` emptied)."""
        points = {}
        for col, i in enumerate(ctx.perturbed):
            w = ctx.backup[col]
            rows = [torch.zeros_like(w) if (x := e[col]) is None else x for e in offsets]
            points[i] = torch.stack(rows) + w
        offsets.clear()  # the stacked points hold what is needed
        return points

    @staticmethod
    def _weighted(ctx: StepContext, idx: list[int], h: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each stacked gradient times ``(n_j / n) x accumulation weight`` along dim 0."""
        weights = torch.tensor([ctx.micro_batches[j][1] * ctx.grad_weight for j in idx],
                               dtype=torch.float64)
        out = []
        for hi in h:
            w = weights.to(device=hi.device, dtype=hi.dtype)
            out.append(hi * w.reshape((-1,) + (1,) * (hi.dim() - 1)))
        return out

    def descent(self, ctx: StepContext, idx: list[int],
                offsets: list[Offsets] | None) -> list[torch.Tensor]:
        points = None if offsets is None else self._points(ctx, offsets)
        losses, h = self._grads(ctx, idx, points, record=offsets is None)
        with torch.no_grad():
            for p, hw in zip(ctx.params, self._weighted(ctx, idx, h)):
                total = hw.sum(0)
                p.grad = total if p.grad is None else p.grad.add_(total)
        return list(losses.unbind(0))

    def descent_each(self, ctx: StepContext, idx: list[int], offsets: list[Offsets]
                     ) -> list[tuple[torch.Tensor, Offsets]]:
        """One vectorised pass at the stacked ``w + e_j`` for the whole chunk; each
        micro-batch's contribution ``c_j`` is its row (for rules that combine ``g_j`` and
        ``h_j``). ``.grad`` is not touched."""
        losses, h = self._grads(ctx, idx, self._points(ctx, offsets), record=False)
        perturbed = set(ctx.perturbed)
        with torch.no_grad():
            rows = self._weighted(ctx, idx, h)
            # A row of a parameter the rule does not combine may become its .grad: own copy.
            return [(losses[r], [hw[r] if i in perturbed else hw[r].clone()
                                 for i, hw in enumerate(rows)]) for r in range(len(idx))]

    def _grads(self, ctx: StepContext, idx: list[int], points: dict[int, torch.Tensor] | None,
               record: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Losses ``(k,)`` and stacked gradients of every parameter, loss-scaled, for the
        micro-batches ``idx`` at ``w`` (``points=None``) or at ``points[i]`` (stacked)."""
        model = ctx.model
        if model is None:
            raise ValueError("strategy='vmap' needs the model: pass model=... to the optimizer")
        name_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        missing = [i for i, p in enumerate(ctx.params) if id(p) not in name_of]
        if missing:
            raise ValueError(
                f"strategy='vmap': {len(missing)} optimized parameter(s) do not belong to model"
            )
        names = ["model." + name_of[id(p)] for p in ctx.params]
        prefix_of = {id(mod): (f"model.{n}." if n else "model.")
                     for n, mod in model.named_modules()}
        k = len(idx)
        scratch = ctx.bn.stacked_scratch(prefix_of, k)
        others = {"model." + n: b for n, b in model.named_buffers() if "model." + n not in scratch}
        wrapper = _LossModule(model, ctx.loss_fn)

        def loss_at(pvals, bufs, mb):
            state = dict(zip(names, pvals))
            state.update(bufs)
            state.update(others)
            loss = functional_call(wrapper, state, (mb,), strict=False).reshape(())
            return ctx.scaled(loss), loss.detach()

        detached = [p.detach() for p in ctx.params]
        if points is None:
            pvals, p_dims = tuple(detached), None
        else:
            pvals = tuple(points[i] if i in points else detached[i].unsqueeze(0).expand(
                (k,) + tuple(detached[i].shape)) for i in range(len(detached)))
            p_dims = 0
        mbs = stack_batches([ctx.micro_batches[j][0] for j in idx])
        warn_not_compiled(self, self.name, model, "dynamo does not compile a model called "
                          "inside torch.func.vmap / grad from eager code")
        fresh_autocast()
        with eager():  # what dynamo would do after a failed attempt, without the attempt
            grads, losses = vmap(grad(loss_at, has_aux=True), in_dims=(p_dims, 0, 0),
                                 randomness="different")(pvals, scratch, mbs)
        if record:
            ctx.bn.record_stacked(prefix_of, scratch)
        return losses, list(grads)
