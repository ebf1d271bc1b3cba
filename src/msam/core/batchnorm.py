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

Mechanism: for the duration of a step every managed module (a ``_BatchNorm`` in training mode
with running statistics) has ``momentum = 1.0`` and, for each pass, **scratch copies** of its
buffers: PyTorch's own BatchNorm then writes ``stat_j`` into the scratch copy of the ascent pass
(``(1 - 1) * old + 1 * stat_j``), and the perturbed pass's scratch copy is thrown away. Both
passes see the module in the same configuration, so a ``torch.compile``d model traces one
training graph for both (no hooks, no guarded per-step state). The original buffer tensors are
never written during the step (autograd may have saved them), only once by :meth:`commit`, so a
failed step leaves them exactly as they were. The ``loop`` strategy installs the scratch copies
on the modules; ``vmap`` passes stacked scratch copies through ``functional_call``; the rule and
its commit are the same code.

Which modules: those of ``model`` when the optimizer is given one (``model=``). Without it they
are discovered in the first step by a forward pre-hook that is registered for that step only;
later steps reuse that list (so a BatchNorm that first runs in training mode after step 1 is not
managed: pass ``model=`` for such models, and for ``torch.compile``). A module called several
times in one pass contributes its last call's statistics. Other modules with running state
(e.g. ``InstanceNorm`` with ``track_running_stats=True``) are not managed.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BatchNormPolicy", "BatchNormStep", "combine_running_stats", "is_tracking_batchnorm"]

_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def _buffer(module: nn.Module, name: str) -> torch.Tensor:
    t = module._buffers[name]
    assert t is not None, name  # only tracking BatchNorm modules are recorded
    return t


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
    num_batches_tracked: torch.Tensor | None,
) -> torch.Tensor:
    """``(1 - f) * running + f * mean_j(stats_j)``; ``f = momentum``, or ``1 / N`` when None
    (``N`` = ``num_batches_tracked`` after this step, computed on the device: no host sync)."""
    mean_stat = torch.stack([s.to(running.dtype) for s in stats]).mean(0)
    if momentum is not None:
        factor: float | torch.Tensor = float(momentum)
    elif num_batches_tracked is None:
        factor = 1.0
    else:
        factor = 1.0 / (num_batches_tracked.to(running.dtype) + 1)
    return (1.0 - factor) * running + factor * mean_stat


class _Record:
    __slots__ = ("module", "originals", "momentum", "means", "vars")

    def __init__(self, module: _BatchNorm) -> None:
        self.module = module
        self.originals = {k: module._buffers.get(k) for k in _KEYS}
        self.momentum = module.momentum
        self.means: list[torch.Tensor] = []
        self.vars: list[torch.Tensor] = []

    def scratch(self) -> dict[str, torch.Tensor]:
        return {k: t.clone() for k, t in self.originals.items() if t is not None}

    def install(self, scratch: dict[str, torch.Tensor]) -> None:
        for k, t in scratch.items():
            self.module._buffers[k] = t

    def restore(self, momentum: float | None = None) -> None:
        self.module.momentum = self.momentum if momentum is None else momentum
        for k, t in self.originals.items():
            if t is not None:
                self.module._buffers[k] = t


class BatchNormStep:
    """The policy during one gradient computation (made by :meth:`BatchNormPolicy.step`)."""

    def __init__(self, modules: list[_BatchNorm]) -> None:
        self.records: dict[int, _Record] = {}
        self._pass_record: bool | None = None
        self._pass_modules: list[_Record] = []
        for mod in modules:
            self.adopt(mod)

    def adopt(self, module: _BatchNorm) -> _Record:
        rec = self.records.get(id(module))
        if rec is None:
            rec = self.records[id(module)] = _Record(module)
            module.momentum = 1.0
            if self._pass_record is not None:  # discovered during a pass: join it
                rec.install(rec.scratch())
                self._pass_modules.append(rec)
        return rec

    @contextlib.contextmanager
    def pass_(self, record: bool) -> Iterator[None]:
        """One forward(+backward) over one micro-batch with the modules themselves (``loop``).

        ``record=True`` (the unperturbed pass) keeps each module's ``stat_j``; ``False`` throws
        the statistics away.
        """
        self._pass_record = record
        self._pass_modules = list(self.records.values())
        for rec in self._pass_modules:
            rec.install(rec.scratch())
        try:
            yield
            if record:
                for rec in self._pass_modules:
                    rec.means.append(_buffer(rec.module, "running_mean").detach())
                    rec.vars.append(_buffer(rec.module, "running_var").detach())
        finally:
            self._pass_record = None
            for rec in self._pass_modules:
                rec.restore(momentum=1.0)

    def stacked_scratch(self, prefix_of: dict[int, str], k: int) -> dict[str, torch.Tensor]:
        """Scratch buffers stacked ``k`` times, keyed ``prefix + buffer name`` (``vmap``)."""
        out = {}
        for rec in self.records.values():
            for key, t in rec.originals.items():
                if t is not None:
                    out[prefix_of[id(rec.module)] + key] = t.unsqueeze(0).expand(
                        (k,) + tuple(t.shape)).clone()
        return out

    def record_stacked(self, prefix_of: dict[int, str], stacked: dict[str, torch.Tensor]) -> None:
        for rec in self.records.values():
            pre = prefix_of[id(rec.module)]
            rec.means.extend(stacked[pre + "running_mean"].detach().unbind(0))
            rec.vars.extend(stacked[pre + "running_var"].detach().unbind(0))

    @torch.no_grad()
    def commit(self) -> None:
        """``running = (1-f) running + f mean_j(stat_j)`` and ``num_batches_tracked += 1``."""
        for rec in self.records.values():
            if not rec.means:
                continue
            nbt = rec.originals["num_batches_tracked"]
            rm, rv = rec.originals["running_mean"], rec.originals["running_var"]
            assert rm is not None and rv is not None  # tracking modules have both
            new_mean = combine_running_stats(rm, rec.means, rec.momentum, nbt)
            new_var = combine_running_stats(rv, rec.vars, rec.momentum, nbt)
            rm.copy_(new_mean)
            rv.copy_(new_var)
            if nbt is not None:
                nbt.add_(1)
            rec.means, rec.vars = [], []

    def close(self) -> None:
        for rec in self.records.values():
            rec.restore()


class BatchNormPolicy:
    """Applies the module docstring's rule; one per optimizer (or gradient engine).

    ``with policy.step() as bn:`` around one gradient computation; inside, ``bn.pass_(record)``
    around each pass and ``bn.commit()`` once at the end. Leaving ``step()`` without
    ``commit()`` leaves every buffer as it was.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model
        self._discovered: list[weakref.ref] | None = None

    def __getstate__(self) -> dict[str, object]:
        """Copies and pickles forget the discovered modules (weak references to the original
        model's): they are found again in their first step, in whatever model they run."""
        return {**self.__dict__, "_discovered": None}

    def modules(self) -> list[_BatchNorm]:
        if self.model is not None:
            return [m for m in self.model.modules()
                    if isinstance(m, _BatchNorm) and is_tracking_batchnorm(m)]
        found = [r() for r in self._discovered or []]
        return [m for m in found if m is not None and is_tracking_batchnorm(m)]

    @contextlib.contextmanager
    def step(self) -> Iterator[BatchNormStep]:
        state = BatchNormStep(self.modules())
        discover = self.model is None and self._discovered is None
        handle = None
        if discover:
            from torch.nn.modules.module import register_module_forward_pre_hook

            def adopt(module: nn.Module, args: object) -> None:
                if is_tracking_batchnorm(module):
                    state.adopt(module)  # type: ignore[arg-type]

            handle = register_module_forward_pre_hook(adopt)
        try:
            yield state
            if discover:
                self._discovered = [weakref.ref(r.module) for r in state.records.values()]
        finally:
            if handle is not None:
                handle.remove()
            state.close()
