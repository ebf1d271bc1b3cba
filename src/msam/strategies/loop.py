"""The ``loop`` strategy: micro-batches one after another.

Per micro-batch ``j``: forward + ``autograd.grad`` at ``w`` (ascent, nothing written to
``.grad``), move the perturbed parameters by ``e_j``, forward + ``backward`` at ``w + e_j`` with
the loss scaled by ``n_j / n`` (so ``.grad`` accumulates the weighted average), then copy ``w``
back from the backup. Peak memory is SAM's plus the backup of the weights: only one micro-batch's
activations are alive at a time. Works with any model, including ones that ``vmap`` cannot trace.
"""

from __future__ import annotations

import torch

from msam.core.batchnorm import BatchNormPolicy
from msam.core.perturbation import perturbation
from msam.strategies.base import GradientJob, NonFiniteLossError, Strategy, check_loss

__all__ = ["LoopStrategy"]


class LoopStrategy(Strategy):
    name = "loop"

    def accumulate(self, job: GradientJob) -> torch.Tensor:
        m = len(job.micro_batches)
        pert_idx = [i for i, k in enumerate(job.perturb) if k]
        pert_params = [job.params[i] for i in pert_idx]
        rhos = [job.rhos[i] for i in pert_idx]
        etas = [job.etas[i] for i in pert_idx]
        pert_backup = [job.backup[i] for i in pert_idx]
        skip_ascent = job.rho_is_zero
        policy = BatchNormPolicy()
        total = None
        with policy.active():
            for j, (mb, weight) in enumerate(job.micro_batches):
                if skip_ascent:
                    # rho = 0: one pass at w; its BatchNorm statistics are the step's statistics.
                    with job.descent_context(j, m), policy.phase("ascent"):
                        loss = check_loss(job.loss_fn(mb), "ascent", j)
                        coef = weight * job.grad_weight * job.loss_scale
                        (loss * coef).backward(inputs=job.params)
                else:
                    with job.ascent_context(), policy.phase("ascent"):
                        loss = check_loss(job.loss_fn(mb), "ascent", j)
                        scaled = loss * job.loss_scale if job.loss_scale != 1.0 else loss
                        grads = torch.autograd.grad(scaled, pert_params, allow_unused=True)
                    if job.loss_scale != 1.0:
                        grads = tuple(None if g is None else g / job.loss_scale for g in grads)
                    if job.ascent_grad_hook is not None:
                        grads = tuple(job.ascent_grad_hook(grads))
                    # The ascent gradients are ours and discarded: e_j is written into them.
                    e, norm = perturbation(grads, pert_params, rhos, job.adaptive, etas,
                                           inplace=True)
                    del grads
                    if not bool(torch.isfinite(norm)):
                        raise NonFiniteLossError("ascent", j, "gradient")
                    moved = [i for i, ei in enumerate(e) if ei is not None]
                    with torch.no_grad():
                        torch._foreach_add_([pert_params[i] for i in moved], [e[i] for i in moved])
                    del e
                    try:
                        with job.descent_context(j, m), policy.phase("perturbed"):
                            loss_p = check_loss(job.loss_fn(mb), "perturbed", j)
                            coef = weight * job.grad_weight * job.loss_scale
                            (loss_p * coef).backward(inputs=job.params)
                    finally:
                        with torch.no_grad():
                            torch._foreach_copy_(pert_params, pert_backup)
                contrib = loss.detach().double() * weight
                total = contrib if total is None else total + contrib
            if job.commit_batchnorm:
                policy.commit()
        return total
