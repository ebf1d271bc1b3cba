"""Framework integrations (optional: each module imports its framework when it is imported).

* :mod:`msam.integrations.huggingface`: ``MSAMTrainer``, a ``transformers.Trainer`` subclass.
* :mod:`msam.integrations.accelerate`: ``backward(accelerator, optimizer, loss_fn, batch)``
  for an ``accelerator.prepare``-d ``msam.MSAM``.

``import msam`` never imports these packages; see ``docs/integrations.md``.
"""

from __future__ import annotations

from typing import Any

from msam.optim import MSAM

__all__ = ["unwrap_msam"]


def unwrap_msam(optimizer: Any) -> MSAM | None:
    """The ``msam.MSAM`` inside a framework's optimizer wrapper (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), or ``None``."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, MSAM) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, MSAM) else None
