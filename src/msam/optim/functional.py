"""``msam_gradient``: the mSAM gradient into ``p.grad``, for trainers that own the step."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from msam.core.perturbation import PerturbationRule
from msam.core.registry import check_support
from msam.core.schedule import Schedule
from msam.optim.params import flatten_params
from msam.optim.step import GradientConfig, Step, validate_eta, validate_rho
from msam.strategies import Strategy

__all__ = ["msam_gradient"]


def msam_gradient(
    loss_fn: Callable[..., torch.Tensor],
    batch: Any,
    params: Iterable[torch.Tensor],
    *,
    rho: float = 0.05,
    micro_batches: int | None = None,
    micro_batch_size: int | None = None,
    adaptive: bool = False,
    eta: float = 0.01,
    rule: str | PerturbationRule | None = None,
    perturb: Iterable[torch.Tensor] | None = None,
    strategy: str | Strategy = "loop",
    model: nn.Module | None = None,
    scaler: Any = None,
    accumulate: bool = False,
    scale: float = 1.0,
    nonfinite: str = "raise",
    schedule: Schedule | None = None,
    step: int | None = None,
) -> torch.Tensor:
    """Fill ``p.grad`` with the mSAM gradient of ``batch`` and return the loss at ``w``.

    The functional entry point for trainers that own the optimizer step (Hugging Face
    ``Trainer.training_step``, Lightning manual optimisation, custom loops): compute the gradient
    here, then let any optimizer (and any clipping / scaler logic) step. ``accumulate=True`` adds
    ``scale`` times the gradient to existing ``.grad`` instead of overwriting it.

    With a ``scaler``, ``.grad`` holds the scaled gradient, as after ``scaler.scale(loss)
    .backward()``; if a pass overflows, the weights and BatchNorm buffers are restored and
    ``.grad`` is left non-finite, so that ``scaler.step(optimizer)`` skips the step and
    ``scaler.update()`` lowers the scale, exactly as with a plain AMP backward.

    ``schedule=msam.Schedule(every=5, ...)`` with ``step=`` (the optimizer step this gradient
    is for, 0-based): on the schedule's off-steps ``.grad`` gets the plain gradient of the
    whole batch (one pass). The schedule object keeps the reuse direction (``reuse=``, which
    needs ``accumulate=False``): pass the same object every step and save its
    ``state_dict()`` with your checkpoint.
    """
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a msam.Schedule, got {type(schedule).__name__}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be the optimizer step (an integer >= 0) when a "
                             f"schedule is given, got {step!r}")
        if schedule.reuse is not None and (accumulate or perturb is not None):
            raise ValueError(f"reuse: {schedule.reuse!r} in msam_gradient needs "
                             "accumulate=False and perturb=None (use msam.MSAM.accumulate "
                             "to accumulate with reuse)")
    elif step is not None:
        raise ValueError("step: given without schedule")
    on = schedule is None or schedule.perturbs(step)  # type: ignore[arg-type]
    rho = validate_rho(rho)
    eta = validate_eta(eta)
    params = [p for p in flatten_params(params) if p.requires_grad]
    if not params:
        raise ValueError("params: no parameter requires grad")
    ids = None if perturb is None else {id(p) for p in flatten_params(perturb)}
    cfg = GradientConfig(
        micro_batches=micro_batches, micro_batch_size=micro_batch_size, adaptive=adaptive,
        rule=rule, strategy=strategy, model=model, nonfinite=nonfinite,
    )
    check_support(cfg.rule, where="gradient")
    group = {"rho": rho, "eta": eta}
    tx = Step(cfg, params, [group] * len(params), [ids is None or id(p) in ids for p in params],
              perturbs=on, scaler=scaler, fresh=not accumulate,
              keep_clean=schedule is not None and schedule.reuse is not None)
    loss = tx.add(loss_fn, batch, float(scale))
    if tx.skipped:
        if tx.scaler is not None:  # .grad non-finite: scaler.step skips, update lowers
            with torch.no_grad():
                p = params[0]
                p.grad = torch.full_like(p, float("inf")) if p.grad is None else p.grad.fill_(
                    float("inf"))
        return loss
    tx.reuse(schedule)
    tx.commit(schedule)
    return loss
