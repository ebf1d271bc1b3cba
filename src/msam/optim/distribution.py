"""What running on several processes changes in a step, as one small interface.

The step (:mod:`msam.optim.step`) and the base step (``MSAM._base_step``) call a
:class:`Distribution`; a single process uses this base class, which changes nothing. DDP
(:class:`msam.distributed.optimizer.DDPDistribution`) and FSDP2
(:class:`msam.distributed.sharded.FSDPDistribution`) implement it:

=====================  =====================================================================
``evaluator``          how a pass synchronises: the strategy that runs the passes (DDP: the
                       ascent under ``no_sync``, DDP's all-reduce on the last backward)
``perturbation_rule``  how a norm is reduced (FSDP: the sum of squares over the shards)
``before_base_step``   a gradient left local (accumulation, a combining rule) is reduced
``clip_grad_norm_``    clipping by the global norm (FSDP: over the shards)
``check_two_step``     whether the two-step API can be scheduled
``check_call``         whether ``step`` / ``accumulate`` can run with the given arguments
``begin_step``         a new optimizer step begins
``check_settings``     that every rank runs the same settings (one all-gather)
``check_schedule``     whether a schedule can run here (DDP: no reuse across ranks)
``state_name``         the strategy name saved in ``state_dict`` (a distributed evaluator is
                       rebuilt on load, not saved)
=====================  =====================================================================

Where the ranks agree on errors is the evaluator's ``session`` (:mod:`msam.strategies.base`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Distribution"]


class Distribution:
    """One process: nothing to synchronise."""

    name = "single"
    world_size = 1

    def evaluator(self, strategy: Any) -> Any:
        return strategy

    def perturbation_rule(self, rule: Any) -> Any:
        return rule

    def before_base_step(self, opt: Any, step: Any) -> None:
        """Right before the base step, with the step's gradient in ``.grad``."""

    def clip_grad_norm_(self, opt: Any, params: list[torch.Tensor], max_norm: float) -> Any:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def check_two_step(self) -> None:
        """Raise if the two-step API cannot run here."""

    def check_call(self, loss_fn: Any, batch: Any, closure: Any, scaler: Any,
                   accumulate: bool) -> None:
        """Raise if ``step`` / ``accumulate`` cannot run with these arguments here."""

    def begin_step(self, params: list[torch.Tensor]) -> None:
        """A new optimizer step begins."""

    def check_settings(self, opt: Any) -> None:
        """After construction and after a load: raise if the ranks' settings differ."""

    def check_schedule(self, schedule: Any) -> None:
        """At construction and before a load changes anything: raise if ``schedule`` cannot
        run here."""

    def state_name(self, strategy: Any) -> dict[str, Any]:
        return strategy.state_dict()
