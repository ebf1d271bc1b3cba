"""mSAM in Hugging Face's ``transformers.Trainer``: :class:`MSAMTrainer`.

``Trainer`` computes the loss, calls ``accelerator.backward(loss)`` and later
``optimizer.step()``. :class:`MSAMTrainer` replaces the backward in ``training_step`` by
``MSAM.accumulate`` (the mSAM gradient of the batch, scaled by ``1 / gradient_accumulation_steps``),
so ``Trainer``'s own clipping (``max_grad_norm``), ``optimizer.step()`` (which finishes the
accumulation), LR scheduler, mixed precision (``bf16`` / ``fp16``: the GradScaler is passed to msam)
and checkpoints all act on the mSAM gradient. The optimizer ``Trainer`` builds (AdamW by default,
or ``optimizers=(base, scheduler)``) becomes the base optimizer; its state (momentum, moments) is
what ``resume_from_checkpoint`` restores, inside the msam state.

Example::

    from msam.integrations.huggingface import MSAMTrainer
    trainer = MSAMTrainer(model=model, args=args, train_dataset=ds,
                          rho=0.05, micro_batches=4)
    trainer.train()

Each micro-batch's loss is ``compute_loss(model, micro_batch)`` without ``num_items_in_batch``:
the model's mean loss over the micro-batch, weighted by its size (``n_j / n``) inside a batch and
equally across accumulation steps (``Trainer``'s behaviour for models that do not take
``num_items_in_batch``).
"""

from __future__ import annotations

from typing import Any

import transformers

from msam.integrations import unwrap_msam
from msam.optim import MSAM

__all__ = ["MSAMTrainer"]

_UNSET = object()


class MSAMTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose training step is an mSAM step.

    Args:
        rho: neighbourhood radius (default 0.05).
        micro_batches / micro_batch_size: ``m`` per batch, or the largest micro-batch size
            (give at most one; default ``m = 1``, i.e. SAM).
        adaptive, eta: ASAM (``T = |w| + eta``).
        msam_kwargs: further ``msam.MSAM`` keyword arguments (``strategy``, ``rule``,
            ``perturb``, ``nonfinite``).
        All other arguments go to ``transformers.Trainer``. An ``msam.MSAM`` may also be given
        as ``optimizers=(opt, scheduler)``; then its own settings are used and ``rho`` etc. must
        not be given.
    """

    def __init__(
        self,
        *args: Any,
        rho: Any = _UNSET,
        micro_batches: int | None = None,
        micro_batch_size: int | None = None,
        adaptive: bool = False,
        eta: float = 0.01,
        msam_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        optimizers = kwargs.get("optimizers", (None, None))
        given = optimizers[0] if optimizers else None
        self._msam_given = unwrap_msam(given) is not None
        if self._msam_given and (
            rho is not _UNSET or micro_batches is not None or micro_batch_size is not None
            or adaptive or msam_kwargs
        ):
            raise ValueError(
                "optimizers: an msam.MSAM was given, so rho / micro_batches / micro_batch_size / "
                "adaptive / msam_kwargs must not be (they are set on the MSAM); pass a base "
                "optimizer instead to configure mSAM here"
            )
        if given is not None and not self._msam_given and micro_batches is not None \
                and micro_batch_size is not None:
            raise ValueError("micro_batches, micro_batch_size: give at most one")
        self._msam_config: dict[str, Any] = {
            "rho": 0.05 if rho is _UNSET else rho,
            "micro_batches": micro_batches, "micro_batch_size": micro_batch_size,
            "adaptive": adaptive, "eta": eta, **(msam_kwargs or {}),
        }
        if "max_grad_norm" in self._msam_config:
            raise ValueError("msam_kwargs: max_grad_norm is TrainingArguments.max_grad_norm here")
        super().__init__(*args, **kwargs)
        if given is not None and not self._msam_given:
            # A base optimizer given by the user: wrap it now (its scheduler shares the groups).
            self.optimizer = self._wrap(given)

    def _wrap(self, base: Any) -> MSAM:
        return MSAM(None, base, model=self.model, **self._msam_config)

    @property
    def msam_optimizer(self) -> MSAM:
        """The ``msam.MSAM`` this trainer steps (after ``create_optimizer``)."""
        opt = unwrap_msam(self.optimizer)
        if opt is None:
            raise RuntimeError("msam_optimizer: no optimizer yet (it is built by train())")
        return opt

    def create_optimizer(self, model: Any = None) -> Any:
        opt = super().create_optimizer(model)
        if unwrap_msam(opt) is None:
            self.optimizer = self._wrap(opt)
        return self.optimizer

    def training_step(self, model: Any, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> Any:
        opt = unwrap_msam(self.optimizer)
        if opt is None:
            raise RuntimeError(
                "MSAMTrainer: the optimizer is not an msam.MSAM (create_optimizer was bypassed); "
                "pass a base optimizer or an msam.MSAM in optimizers="
            )
        model.train()
        inputs = self._prepare_inputs(inputs)

        def loss_fn(micro: dict[str, Any]) -> Any:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, micro)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            return loss

        k = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        scaler = getattr(self.accelerator, "scaler", None)
        loss = opt.accumulate(loss_fn, inputs, scale=1.0 / k, scaler=scaler)
        return loss.detach() / k
