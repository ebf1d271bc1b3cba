"""``SAM`` and ``ASAM``: :class:`msam.MSAM` with the settings of their papers."""

from __future__ import annotations

from typing import Any

from msam.optim.msam import MSAM

__all__ = ["ASAM", "SAM"]


class SAM(MSAM):
    """SAM (Foret et al. 2021): :class:`MSAM` with one perturbation per batch (``m = 1``)."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, **kwargs: Any) -> None:
        for k in ("micro_batches", "micro_batch_size"):
            if k in kwargs:
                raise ValueError(f"{k}: SAM uses one micro-batch; use msam.MSAM for m > 1")
        super().__init__(params, base_optimizer, rho, **kwargs)


class ASAM(MSAM):
    """ASAM (Kwon et al. 2021): :class:`MSAM` with ``adaptive=True`` (micro-batches allowed).

    Defaults: ``rho=0.5``, ``eta=0.01`` (the ASAM paper's CIFAR-10 settings).
    """

    def __init__(self, params, base_optimizer, rho: float = 0.5, **kwargs: Any) -> None:
        if kwargs.pop("adaptive", True) is not True:
            raise ValueError("adaptive: ASAM is adaptive; use msam.MSAM for adaptive=False")
        super().__init__(params, base_optimizer, rho, adaptive=True, **kwargs)

