"""BatchNorm policy for SAM and mSAM: explicit, and counted once per optimizer step.

The rule (what msam does, whatever the execution strategy):

* Each micro-batch is normalised with **its own** batch statistics, in both the ascent pass (at
  ``w``) and the perturbed pass (at ``w + e_j``). This is what the original SAM code did
  implicitly with one perturbation per accelerator (Foret et al. 2021), and what mSAM
  (Behdin et al. 2023) analyses.
* Running statistics are updated **once per optimizer step, from the unperturbed pass only**::

      running = (1 - momentum) * running + momentum * mean_j(stat_j)

  where ``stat_j`` is exactly what PyTorch's BatchNorm would use from micro-batch ``j`` alone
  (batch mean; unbiased batch variance for ``running_var``). With ``momentum=None`` PyTorch's
  cumulative-average rule is used, with factor ``1 / num_batches_tracked``.
* ``num_batches_tracked`` increases by exactly 1 per step. The perturbed pass leaves every
  buffer untouched. (The "momentum = 0 in the second pass" trick found in popular SAM code still
  increments ``num_batches_tracked``, so with ``momentum=None`` one step counts as two batches.)

Mechanism (loop strategy): while a step runs, process-wide module forward hooks see every
``_BatchNorm`` module that runs in training mode with running statistics, so no model handle is
needed. In the ascent pass a module gets a fresh copy of its buffers and ``momentum = 1.0`` for
the call, so its copy ends up holding ``stat_j`` computed by PyTorch itself; in the perturbed
pass ``track_running_stats`` is switched off for the call. The original buffer tensors are never
written during the step (autograd may have saved them), only once at the end, so a failed step
leaves them exactly as they were. Other modules with running state (e.g. ``InstanceNorm`` with
``track_running_stats=True``) are not managed and update on every forward call.

Limits of the hook mechanism: the hooks are process-wide while a step runs, so two optimizers
must not step concurrently from different threads; a model compiled with ``torch.compile`` may
not call module hooks (compile the inner blocks, not the BatchNorm layers, or use ``vmap``);
activation checkpointing that re-runs a BatchNorm forward during backward records that batch
twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BatchNormPolicy", "combine_running_stats", "is_tracking_batchnorm"]


def is_tracking_batchnorm(module: nn.Module) -> bool:
    """True for a BatchNorm module that would update running statistics in this call."""
    return (
        isinstance(module, _BatchNorm)
        and module.training
        and module.track_running_stats
        and module.running_mean is not None
    )


def combine_running_stats(
    running: torch.Tensor,
    stats: list[torch.Tensor],
    momentum: float | None,
    num_batches_tracked_after: int,
) -> torch.Tensor:
    """``(1 - f) * running + f * mean_j(stats_j)``; ``f = momentum``, or ``1/N`` when None."""
    mean_stat = torch.stack([s.to(running.dtype) for s in stats]).mean(0)
    factor = (1.0 / float(num_batches_tracked_after)) if momentum is None else float(momentum)
    return (1.0 - factor) * running + factor * mean_stat


class _ModuleRecord:
    __slots__ = ("module", "originals", "momentum", "track", "means", "vars", "swapped")

    def __init__(self, module: _BatchNorm) -> None:
        self.module = module
        self.originals = {k: module._buffers[k] for k in
                          ("running_mean", "running_var", "num_batches_tracked")}
        self.momentum = module.momentum
        self.track = module.track_running_stats
        self.means: list[torch.Tensor] = []
        self.vars: list[torch.Tensor] = []
        self.swapped = False


class BatchNormPolicy:
    """Applies the module docstring's rule during one gradient computation.

    Use ``with policy.active():`` around the whole computation, and ``policy.phase("ascent")`` /
    ``policy.phase("perturbed")`` around each pass. ``commit()`` writes the new running
    statistics; leaving ``active()`` without ``commit()`` leaves every buffer as it was.
    """

    def __init__(self) -> None:
        self._records: dict[int, _ModuleRecord] = {}
        self._phase: str | None = None
        self._handles: list = []

    # -- hooks -------------------------------------------------------------------------------
    def _pre(self, module: nn.Module, args) -> None:
        if self._phase is None or not is_tracking_batchnorm(module):
            return
        rec = self._records.get(id(module))
        if rec is None:
            rec = self._records[id(module)] = _ModuleRecord(module)
        if self._phase == "ascent":
            # A fresh copy per call: PyTorch writes stat_j into it (momentum 1.0). The original
            # tensors stay untouched until commit().
            for k, t in rec.originals.items():
                if t is not None:
                    module._buffers[k] = t.clone()
            rec.swapped = True
            module.momentum = 1.0
        else:
            module.track_running_stats = False

    def _post(self, module: nn.Module, args, output) -> None:
        rec = self._records.get(id(module))
        if rec is None or rec.module is not module:
            return
        if self._phase == "ascent" and module.momentum == 1.0 and rec.swapped:
            rec.means.append(module._buffers["running_mean"].detach())
            rec.vars.append(module._buffers["running_var"].detach())
            module.momentum = rec.momentum
        elif self._phase == "perturbed":
            module.track_running_stats = rec.track

    # -- public ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self) -> Iterator[BatchNormPolicy]:
        from torch.nn.modules.module import (
            register_module_forward_hook,
            register_module_forward_pre_hook,
        )

        self._handles = [
            register_module_forward_pre_hook(self._pre),
            register_module_forward_hook(self._post),
        ]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []
            self._restore_attributes()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in ("ascent", "perturbed"):
            raise ValueError(f"phase must be 'ascent' or 'perturbed', got {name!r}")
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def _restore_attributes(self) -> None:
        for rec in self._records.values():
            m = rec.module
            m.momentum = rec.momentum
            m.track_running_stats = rec.track
            for k, t in rec.originals.items():
                m._buffers[k] = t

    @property
    def modules(self) -> list[nn.Module]:
        return [r.module for r in self._records.values()]

    @torch.no_grad()
    def commit(self) -> None:
        """Write ``running = (1-f) running + f mean_j(stat_j)`` and ``num_batches_tracked += 1``."""
        self._restore_attributes()
        for rec in self._records.values():
            if not rec.means:
                continue
            nbt = rec.originals["num_batches_tracked"]
            after = int(nbt.item()) + 1 if nbt is not None else 1
            rm, rv = rec.originals["running_mean"], rec.originals["running_var"]
            new_mean = combine_running_stats(rm, rec.means, rec.momentum, after)
            new_var = combine_running_stats(rv, rec.vars, rec.momentum, after)
            rm.copy_(new_mean)
            rv.copy_(new_var)
            if nbt is not None:
                nbt.add_(1)
        self._records.clear()

    def discard(self) -> None:
        """Forget collected statistics; buffers keep their values from before the step."""
        self._restore_attributes()
        self._records.clear()
