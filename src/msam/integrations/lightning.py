"""mSAM in Lightning (``lightning`` 2.x): :class:`MSAMModule` and :func:`manual_step`.

Lightning's optimizer step calls ``optimizer.step(closure=...)``, where the closure runs
``training_step``, ``zero_grad`` and ``backward`` and then Lightning's ``on_before_optimizer_step``
hooks and gradient clipping. The mSAM gradient needs the batch (it is split into micro-batches,
each perturbed on its own), so it is computed where the batch is, in ``training_step``, with
``MSAM.accumulate`` (scaled by ``1 / accumulate_grad_batches``); Lightning's ``backward`` and
``zero_grad`` are then no-ops for the msam optimizer, and the step (run through Lightning's
``LightningOptimizer``, so ``global_step``, ``max_steps``, clipping, accumulation, callbacks and
checkpoints behave as usual) is the base optimizer's step on that gradient.

Automatic optimization::

    from msam.integrations.lightning import MSAMModule

    class Net(MSAMModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(...)

        def msam_loss(self, batch):              # the mean loss of one micro-batch
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return msam.MSAM(self.parameters(), torch.optim.SGD, rho=0.05, micro_batches=4,
                             model=self, lr=0.1, momentum=0.9)

    L.Trainer(max_steps=1000, gradient_clip_val=1.0, accumulate_grad_batches=2,
              precision="bf16-mixed").fit(Net(), loader)

``training_step`` returns the loss at the unperturbed weights (detached); override it, call
``super().training_step(batch, batch_idx)`` and log the result to log it.

Manual optimization (``self.automatic_optimization = False``)::

    def training_step(self, batch, batch_idx):
        loss = manual_step(self, self.msam_loss, batch)    # mSAM gradient + the step
        self.log("loss", loss)

``manual_step`` goes through ``self.optimizers()`` (the ``LightningOptimizer``), so
``global_step`` counts the steps and ``max_steps`` stops the run.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer

from msam.integrations import unwrap_msam
from msam.optim import MSAM

__all__ = ["MSAMModule", "manual_step"]


def _scaler(trainer: Any) -> Any:
    """The GradScaler of ``precision="16-mixed"`` (None otherwise, e.g. ``bf16-mixed``)."""
    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    return getattr(plugin, "scaler", None)


@contextlib.contextmanager
def _closure_step(opt: MSAM) -> Iterator[None]:
    """While active, ``opt.step(closure=c)`` (what Lightning's precision plugin calls) runs the
    closure once (Lightning's hooks and clipping, after the mSAM gradient was accumulated) and
    takes the base step on the accumulated mSAM gradient."""

    # A torch LR scheduler wraps ``opt.step`` in an instance attribute (to check the call
    # order); it is called for the base step and put back afterwards.
    previous = opt.__dict__.get("step")

    def step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError(f"step: unexpected keyword arguments {sorted(kwargs)}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not opt.pending:
            result = opt.last_result
            if result is not None and result.skipped:  # nonfinite="skip": nothing to apply
                return loss
            raise RuntimeError(
                "msam Lightning step: no mSAM gradient was accumulated for this step; with "
                "automatic optimization subclass msam.integrations.lightning.MSAMModule (and do "
                "not compute the loss with backward() yourself), with manual optimization use "
                "msam.integrations.lightning.manual_step"
            )
        # The base step on the accumulated gradient (MSAM.step() with no arguments).
        (previous if previous is not None else functools.partial(MSAM.step, opt))()
        return loss

    opt.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        if previous is not None:
            opt.step = previous  # type: ignore[method-assign]
        else:
            del opt.step


def _lightning_optimizer(module: Any, optimizer: Any) -> LightningOptimizer:
    if optimizer is None:
        optimizer = module.optimizers()
        if isinstance(optimizer, list):
            if len(optimizer) != 1:
                raise ValueError(
                    f"manual_step: the module has {len(optimizer)} optimizers; pass optimizer=")
            optimizer = optimizer[0]
    if not isinstance(optimizer, LightningOptimizer):
        raise TypeError(
            "manual_step: optimizer must be the LightningOptimizer from self.optimizers() (the "
            f"raw optimizer bypasses Lightning's step counting), got {type(optimizer).__name__}"
        )
    if unwrap_msam(optimizer) is None:
        raise TypeError(
            "manual_step: configure_optimizers must return an msam.MSAM, got "
            f"{type(optimizer.optimizer).__name__}"
        )
    return optimizer


def manual_step(
    module: pl.LightningModule,
    loss_fn: Callable[..., torch.Tensor],
    batch: Any,
    optimizer: Any = None,
    *,
    scale: float = 1.0,
    step: bool = True,
    gradient_clip_val: float | None = None,
    gradient_clip_algorithm: str | None = None,
) -> torch.Tensor:
    """One mSAM step inside a manual-optimization ``training_step``; returns the loss at ``w``.

    Adds ``scale`` times the mSAM gradient of ``batch`` (``loss_fn(micro_batch)`` is the mean
    loss of a micro-batch) to ``.grad`` and, if ``step``, clips it (``gradient_clip_val``, via
    ``module.clip_gradients``) and steps through the ``LightningOptimizer`` (``optimizer``,
    default ``module.optimizers()``), so that ``global_step`` counts the step and
    ``on_before_optimizer_step`` sees the gradient. For accumulation over ``k`` batches, pass
    ``scale=1/k`` and ``step=(batch_idx + 1) % k == 0``. No ``zero_grad`` is needed: the first
    call after a step starts from a zero gradient.
    """
    lopt = _lightning_optimizer(module, optimizer)
    opt = unwrap_msam(lopt)
    assert opt is not None
    loss = opt.accumulate(loss_fn, batch, scale=scale, scaler=_scaler(module.trainer))
    if step:
        if gradient_clip_val is not None:
            module.clip_gradients(lopt, gradient_clip_val=gradient_clip_val,
                                  gradient_clip_algorithm=gradient_clip_algorithm)
        with _closure_step(opt):
            lopt.step(closure=lambda: loss)
    return loss


class MSAMModule(pl.LightningModule):
    """A ``LightningModule`` whose automatic-optimization step is an mSAM step.

    Implement :meth:`msam_loss` (the mean loss of one micro-batch) and return an
    ``msam.MSAM`` from ``configure_optimizers`` (``model=self`` is recommended with BatchNorm).
    ``training_step`` is provided; Lightning's ``gradient_clip_val``, ``accumulate_grad_batches``,
    ``precision="bf16-mixed"``, ``max_steps`` and ``Trainer.fit(ckpt_path=...)`` act on the mSAM
    gradient. If you override ``optimizer_step``, call ``super().optimizer_step(...)``.
    With ``automatic_optimization = False``, call :func:`manual_step` in your ``training_step``.
    """

    def msam_loss(self, batch: Any) -> torch.Tensor:
        """The mean loss of one micro-batch (called twice per micro-batch: at ``w`` and at
        ``w + e_j``); do not log here."""
        raise NotImplementedError("MSAMModule: implement msam_loss(self, batch)")

    def _msam(self) -> MSAM | None:
        trainer = self._trainer
        if trainer is None:
            return None
        opts = trainer.optimizers
        return unwrap_msam(opts[0]) if len(opts) == 1 else None

    def training_step(self, batch: Any, batch_idx: int = 0) -> torch.Tensor:
        if not self.automatic_optimization:
            raise RuntimeError(
                "MSAMModule.training_step: with manual optimization write your own "
                "training_step and call msam.integrations.lightning.manual_step(self, loss_fn, "
                "batch)")
        opt = self._msam()
        if opt is None:
            raise TypeError(
                "MSAMModule: configure_optimizers must return exactly one msam.MSAM (automatic "
                "optimization)")
        k = max(int(self.trainer.accumulate_grad_batches), 1)
        loss = opt.accumulate(self.msam_loss, batch, scale=1.0 / k,
                              scaler=_scaler(self.trainer))
        self._msam_grad_ready = True
        return loss

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_msam_grad_ready", False):  # training_step filled .grad already
            self._msam_grad_ready = False
            return
        super().backward(loss, *args, **kwargs)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        # Lightning zeroes between training_step and backward; msam starts each accumulation
        # cycle from a zero gradient itself (the first accumulate() after a step).
        if unwrap_msam(optimizer) is None:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Callable[[], Any] | None = None) -> None:
        opt = unwrap_msam(optimizer)
        if opt is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        with _closure_step(opt):
            optimizer.step(closure=optimizer_closure)
        return None
