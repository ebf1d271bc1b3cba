"""mSAM with Hugging Face ``accelerate``: :func:`backward` replaces ``accelerator.backward(loss)``.

Example::

    opt = msam.MSAM(model.parameters(), torch.optim.AdamW, rho=0.05, micro_batches=4, lr=1e-3)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    for batch in loader:
        with accelerator.accumulate(model):
            loss = msam.integrations.accelerate.backward(accelerator, opt, loss_fn, batch)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()          # finishes the accumulation; skipped by accelerate mid-accumulation
            sched.step()
            opt.zero_grad()

The mSAM gradient of ``batch`` (scaled by ``1 / gradient_accumulation_steps``, and by the
GradScaler with ``mixed_precision="fp16"``) is added to ``.grad``; ``opt.step()`` on the prepared
optimizer then takes the base step once per accumulation cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from msam.integrations import unwrap_msam

__all__ = ["backward"]


def backward(accelerator: Any, optimizer: Any, loss_fn: Callable[..., torch.Tensor],
             batch: Any) -> torch.Tensor:
    """Add the mSAM gradient of ``batch`` to ``.grad``; returns the loss at ``w`` (detached)."""
    opt = unwrap_msam(optimizer)
    if opt is None:
        raise TypeError(
            f"optimizer: expected an msam.MSAM (prepared or not), got {type(optimizer).__name__}"
        )
    k = max(int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1), 1)
    return opt.accumulate(loss_fn, batch, scale=1.0 / k,
                          scaler=getattr(accelerator, "scaler", None))
