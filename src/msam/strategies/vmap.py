"""The ``vmap`` strategy: all micro-batches of one size in one vectorised call.

Uses :func:`torch.func.functional_call` with :func:`torch.func.grad` under
:func:`torch.func.vmap` over the micro-batch dimension: one vectorised ascent pass gives every
``g_j``, the per-micro-batch perturbations are computed batched, and one vectorised pass at the
stacked points ``w + e_j`` gives every ``h_j``. Micro-batch sizes may differ by one (with
``torch.tensor_split``), so the work runs as at most two groups of equal size.

BatchNorm under vmap: running buffers are stacked, one copy per micro-batch, so that each
micro-batch's call writes its own statistics (``momentum = 1.0`` for the ascent call) and the
policy of :mod:`msam.core.batchnorm` is applied from them; in the perturbed pass
``track_running_stats`` is off. Random operations (dropout) draw different randomness per
micro-batch (``randomness="different"``), so with dropout the result is not bit-equal to
``loop``.

Needs the model (``model=`` on the optimizer) and a ``loss_fn`` that calls that model object.
Memory holds ``m`` copies of the parameters and all micro-batches' activations at once, so it
trades memory for fewer, larger kernels; whether that is faster depends on the model and
device (see ``msam bench``; the ``auto`` strategy measures it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from msam.core.batch import stack_batches
from msam.core.batchnorm import combine_running_stats, is_tracking_batchnorm
from msam.core.perturbation import EPS
from msam.strategies.base import GradientJob, NonFiniteLossError, Strategy

__all__ = ["VmapStrategy"]

_BN_KEYS = ("running_mean", "running_var", "num_batches_tracked")


class _LossModule(nn.Module):
    """Holds the model so that functional_call re-parametrises the object ``loss_fn`` calls."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss_fn(batch)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (like.dim() - 1))


def _row_norms(s: torch.Tensor) -> torch.Tensor:
    """L2 norm of each ``s[j]`` as float64: computed in ``s``'s dtype when it is float32 / float64
    (no float64 copy of the stacked gradients), in float64 otherwise (no half overflow)."""
    flat = s.flatten(1)
    if s.dtype in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(flat, dim=1).double()
    return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)


class VmapStrategy(Strategy):
    name = "vmap"

    def accumulate(self, job: GradientJob) -> torch.Tensor:
        model = job.model
        if model is None:
            raise ValueError("strategy='vmap' needs the model: pass model=... to the optimizer")
        name_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        missing = [i for i, p in enumerate(job.params) if id(p) not in name_of]
        if missing:
            raise ValueError(
                f"strategy='vmap': {len(missing)} optimized parameter(s) do not belong to model"
            )
        names = ["model." + name_of[id(p)] for p in job.params]
        bn_modules = {n: mod for n, mod in model.named_modules() if is_tracking_batchnorm(mod)}
        bn_names = {
            f"model.{mn}.{k}" if mn else f"model.{k}": (mod, k)
            for mn, mod in bn_modules.items() for k in _BN_KEYS if mod._buffers.get(k) is not None
        }
        other_bufs = {
            "model." + n: b for n, b in model.named_buffers() if "model." + n not in bn_names
        }
        wrapper = _LossModule(model, job.loss_fn)
        loss_scale = job.loss_scale

        def loss_at(pvals, bn_bufs, mb):
            state = dict(zip(names, pvals))
            state.update(bn_bufs)
            state.update(other_bufs)
            loss = functional_call(wrapper, state, (mb,), strict=False)
            return loss.reshape(()) * loss_scale, loss.detach().reshape(())

        grad_fn = grad(loss_at, has_aux=True)
        pvals = tuple(p.detach() for p in job.params)
        pert = job.perturb
        skip_ascent = job.rho_is_zero

        # Group micro-batch indices by size (tensor_split gives at most two sizes).
        groups: dict[int, list[int]] = {}
        for j, (mb, _) in enumerate(job.micro_batches):
            from msam.core.batch import batch_size

            groups.setdefault(batch_size(mb), []).append(j)

        saved_attrs = {mod: (mod.momentum, mod.track_running_stats) for mod in bn_modules.values()}
        stats: dict[str, list[torch.Tensor]] = {n: [] for n in bn_names}
        losses = torch.zeros(len(job.micro_batches), dtype=torch.float64)
        accum = [torch.zeros_like(p) for p in job.params]
        try:
            for idx in groups.values():
                k = len(idx)
                mbs = stack_batches([job.micro_batches[j][0] for j in idx])
                weights = torch.tensor([job.micro_batches[j][1] for j in idx], dtype=torch.float64)
                stacked_bn = {
                    n: mod._buffers[key].detach().unsqueeze(0).expand(
                        (k,) + tuple(mod._buffers[key].shape)).clone()
                    for n, (mod, key) in bn_names.items()
                }
                for mod in bn_modules.values():
                    mod.momentum = 1.0
                ascent_grads, loss0 = vmap(
                    grad_fn, in_dims=(None, 0, 0), randomness="different"
                )(pvals, stacked_bn, mbs)
                for mod, (mom, _) in saved_attrs.items():
                    mod.momentum = mom
                if not bool(torch.isfinite(loss0).all()):
                    first_bad = int((~torch.isfinite(loss0)).nonzero()[0])
                    raise NonFiniteLossError("ascent", idx[first_bad])
                for n in bn_names:
                    stats[n].extend(stacked_bn[n].unbind(0))
                losses[idx] = loss0.double().cpu()
                if skip_ascent:
                    h = ascent_grads
                else:
                    g = [gr / loss_scale if loss_scale != 1.0 else gr for gr in ascent_grads]
                    sq = torch.zeros(k, dtype=torch.float64, device=g[0].device)
                    for i, gi in enumerate(g):
                        if pert[i]:
                            s = gi * (pvals[i].abs() + job.etas[i]) if job.adaptive else gi
                            sq = sq + _row_norms(s).pow(2)
                    norm = sq.sqrt()
                    if not bool(torch.isfinite(norm).all()):
                        raise NonFiniteLossError("ascent", idx[0], "gradient")
                    points = []
                    for i, (p, gi) in enumerate(zip(pvals, g)):
                        if not pert[i]:
                            points.append(p.unsqueeze(0).expand((k,) + tuple(p.shape)))
                            continue
                        scale = _bcast((job.rhos[i] / (norm + EPS)).to(gi.dtype), gi)
                        if job.adaptive:
                            t = p.abs() + job.etas[i]
                            points.append(p.unsqueeze(0) + t * t * gi * scale)
                        else:
                            points.append(p.unsqueeze(0) + gi * scale)
                    del g, ascent_grads
                    for mod in bn_modules.values():
                        mod.track_running_stats = False
                    unbatched_bn = {n: mod._buffers[key] for n, (mod, key) in bn_names.items()}
                    h, loss1 = vmap(
                        grad_fn, in_dims=(0, None, 0), randomness="different"
                    )(tuple(points), unbatched_bn, mbs)
                    for mod, (_, track) in saved_attrs.items():
                        mod.track_running_stats = track
                    if not bool(torch.isfinite(loss1).all()):
                        raise NonFiniteLossError("perturbed", idx[0])
                for i, hi in enumerate(h):
                    w = _bcast((weights * job.grad_weight).to(hi.dtype).to(hi.device), hi)
                    accum[i] += (hi * w).sum(0)
        finally:
            for mod, (mom, track) in saved_attrs.items():
                mod.momentum, mod.track_running_stats = mom, track
        with torch.no_grad():
            for p, a in zip(job.params, accum):
                if p.grad is None:
                    p.grad = a
                else:
                    p.grad.add_(a)
            if job.commit_batchnorm:
                for mn, mod in bn_modules.items():
                    pre = f"model.{mn}." if mn else "model."
                    nbt = mod._buffers.get("num_batches_tracked")
                    after = int(nbt.item()) + 1 if nbt is not None else 1
                    mod.running_mean.copy_(combine_running_stats(
                        mod.running_mean, stats[pre + "running_mean"], mod.momentum, after))
                    mod.running_var.copy_(combine_running_stats(
                        mod.running_var, stats[pre + "running_var"], mod.momentum, after))
                    if nbt is not None:
                        nbt.add_(1)
        weights_all = torch.tensor([w for _, w in job.micro_batches], dtype=torch.float64)
        return (losses * weights_all).sum()
