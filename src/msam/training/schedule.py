"""Per-step learning-rate schedules (``LambdaLR`` factors).

``factor(step)`` multiplies the peak ``lr``; the scheduler is stepped once per optimizer step.

* linear warmup over ``warmup_steps`` (from ``1 / (warmup_steps + 1)`` of the peak up to it),
* then ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with ``t`` going from 0
  to 1 over the remaining steps (Loshchilov & Hutter, "SGDR", ICLR 2017, without restarts);
  ``step``: ``lr * gamma ** (number of milestones passed)``; ``constant``: ``lr``.

The factor is a closure (not an object), so ``LambdaLR.state_dict`` stores only the step count:
a resumed run rebuilds the schedule from its config and continues from the saved step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = ["lr_factor_fn"]


def lr_factor_fn(
    schedule: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    lr: float = 1.0,
    min_lr: float = 0.0,
    milestone_steps: Sequence[int] = (),
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """The multiplicative LR factor as a function of the (0-based) optimizer step."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = max(0, min(int(warmup_steps), total_steps))
    floor = (min_lr / lr) if lr > 0 else 0.0
    milestones = sorted(int(m) for m in milestone_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        if schedule == "step":
            passed = sum(1 for m in milestones if step >= m)
            return gamma ** passed
        if schedule == "cosine":
            span = max(total_steps - warmup_steps, 1)
            t = min(max(step - warmup_steps, 0) / span, 1.0)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        raise ValueError(f"unknown schedule {schedule!r}")

    return factor
