"""Framework integrations (optional: each module imports its framework when it is imported).

* :mod:`msam.integrations.huggingface`: ``MSAMTrainer``, a ``transformers.Trainer`` subclass.
* :mod:`msam.integrations.accelerate`: ``backward(accelerator, optimizer, loss_fn, batch)``
  for an ``accelerator.prepare``-d ``msam.MSAM``.
* :mod:`msam.integrations.lightning`: ``MSAMModule`` (automatic optimization) and
  ``manual_step(module, loss_fn, batch)`` (manual optimization) for Lightning 2.x.

``import msam`` never imports these packages; see ``docs/integrations.md``.
"""

from __future__ import annotations

from typing import Any

from msam.optim import MSAM

__all__ = ["unwrap_msam"]


def unwrap_msam(optimizer: Any) -> MSAM | None:
    """The ``msam.MSAM`` inside a framework's optimizer wrapper (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), or ``None``."""
    for _ in range(8):
        # Lightning's wrapper subclasses the wrapped optimizer's class and keeps a copy of its
        # __dict__, so the wrapped optimizer (``_optimizer``) is looked at before isinstance.
        inner = getattr(optimizer, "__dict__", {}).get("_optimizer")
        if inner is not None:
            optimizer = inner
            continue
        if isinstance(optimizer, MSAM) or optimizer is None:
            break
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer if isinstance(optimizer, MSAM) else None
