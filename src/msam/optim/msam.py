"""``MSAM``: micro-batch-averaged Sharpness-Aware Minimization as a ``torch.optim.Optimizer``.

mSAM (Behdin et al., "mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization", 2023) splits a
mini-batch of ``n`` examples into ``m`` disjoint micro-batches (sizes ``n_j``). Each gets its own
SAM perturbation (Foret et al., ICLR 2021) from its own gradient, its own gradient at the
perturbed point, and the base optimizer receives their weighted average::

    e_j  = rho * g_j / (||g_j|| + 1e-12),      g_j = grad L_j(w)
    grad = sum_j (n_j / n) * grad L_j(w + e_j)

``m = 1`` is SAM; ``rho = 0`` is the base optimizer; ``adaptive=True`` is ASAM (Kwon et al., ICML
2021), ``e_j = rho * T^2 g_j / (||T g_j|| + 1e-12)`` with ``T = |w| + eta``.

Example::

    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=0.05, micro_batches=4,
                    lr=0.1, momentum=0.9, weight_decay=5e-4)
    def loss_fn(batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)
    loss = opt.step(loss_fn, (x, y))

What a step is, and what it owns until it commits or rolls back: :mod:`msam.optim.step`. The
rest lives beside it: the ``state_dict`` contract (:mod:`msam.optim.state`), parameter checks
(:mod:`msam.optim.params`), torch.optim hook behaviour (:mod:`msam.optim.hooks`), DDP / FSDP
(:mod:`msam.optim.distribution`), and docs/core.md for the behaviour in full: weight decay stays
in the base optimizer; no ``zero_grad`` is needed; ``max_grad_norm`` clips the averaged gradient
after unscaling; with a ``GradScaler`` an overflow in any pass skips the whole step; autocast may
go inside ``loss_fn`` or around ``step``; ``step()`` without arguments only finishes
``accumulate()`` calls; BatchNorm statistics are per micro-batch in both passes and written once
per step from the unperturbed pass; schedules (``every``, ``start_step``, ``reuse``) perturb on
some steps only (docs/schedules.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from msam.core.perturbation import PerturbationRule
from msam.core.registry import check_support
from msam.core.schedule import Schedule
from msam.optim import params as checks
from msam.optim import state as _state
from msam.optim.distribution import Distribution
from msam.optim.functional import msam_gradient
from msam.optim.hooks import step_entry
from msam.optim.step import GradientConfig, GradientResult, Step, check_decoupled_lr
from msam.optim.wrapper import WrapperOptimizer
from msam.strategies import Strategy

__all__ = ["MSAM", "Schedule", "msam_gradient"]


class MSAM(WrapperOptimizer):
    """Micro-batch-averaged SAM around any ``torch.optim`` optimizer (see the module docstring).

    Args:
        params: parameters or param groups (may be ``None`` when ``base_optimizer`` is an
            already-built optimizer, whose groups are then used).
        base_optimizer: an optimizer class (built with ``**base_kwargs`` over the same param
            groups) or an optimizer instance.
        rho: neighbourhood radius (per param group, like ``lr``). 0 gives the base optimizer.
        micro_batches: number ``m`` of micro-batches per batch (default 1, i.e. SAM).
        micro_batch_size: alternatively, the largest micro-batch size; ``m = ceil(n / size)``.
        adaptive: ASAM's scale-invariant neighbourhood; ``eta`` is its offset (per group).
        rule: the perturbation rule (``"sam"``, ``"asam"`` or a
            :class:`msam.core.PerturbationRule`); default from ``adaptive``.
        strategy: ``"loop"`` (default, lowest memory, any model), ``"vmap"``, ``"batched"``,
            ``"lowrank"`` (need ``model``) or ``"auto"`` (measures them once); docs/core.md.
        model: the module ``loss_fn`` calls; needed by ``"vmap"``/``"auto"``, and recommended
            with BatchNorm (its modules are then known without discovery; needed for
            ``torch.compile``).
        perturb: a subset of the parameters to perturb (e.g. :func:`normalization_parameters`
            for SAM-ON); the rest are not moved but still receive the averaged gradient.
        max_grad_norm: clip the averaged gradient to this global L2 norm before the base step.
        nonfinite: ``"raise"`` (default) raises ``FloatingPointError`` on an inf/NaN loss or
            gradient; ``"skip"`` skips the step. Either way nothing was changed.
        every, start_step, reuse, reuse_alpha: the schedule (:mod:`msam.core.schedule`):
            perturb on steps ``start_step + i * every`` only; ``reuse="looksam"`` (LookSAM,
            Liu et al. 2022) reuses the perturbation's component in between. Or pass
            ``schedule=msam.Schedule(...)``. Saved in ``state_dict``.
        distribution: what running on several processes changes (set by
            ``msam.distributed.DistributedMSAM`` / ``ShardedMSAM``; :mod:`msam.optim.distribution`).
    """

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[Optimizer] | Optimizer | Callable[..., Optimizer],
        rho: float = 0.05,
        *,
        micro_batches: int | None = None,
        micro_batch_size: int | None = None,
        adaptive: bool = False,
        eta: float = 0.01,
        rule: str | PerturbationRule | None = None,
        strategy: str | Strategy = "loop",
        model: nn.Module | None = None,
        perturb: Iterable[torch.Tensor] | None = None,
        max_grad_norm: float | None = None,
        nonfinite: str = "raise",
        every: int = 1,
        start_step: int = 0,
        reuse: str | None = None,
        reuse_alpha: float = 0.7,
        schedule: Schedule | None = None,
        distribution: Distribution | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.distribution = Distribution() if distribution is None else distribution
        self.schedule = checks.make_schedule(schedule, every, start_step, reuse, reuse_alpha)
        rho, eta = checks.validate_rho(rho), checks.validate_eta(eta)
        max_grad_norm = checks.validate_max_grad_norm(max_grad_norm)
        self.engine = GradientConfig(
            micro_batches=micro_batches, micro_batch_size=micro_batch_size, adaptive=adaptive,
            rule=rule, strategy=strategy, model=model, nonfinite=nonfinite,
        )
        self.engine.strategy = self.distribution.evaluator(self.engine.strategy)
        self.engine.rule = self.distribution.perturbation_rule(self.engine.rule)
        self.max_grad_norm = max_grad_norm
        defaults = {"rho": rho, "eta": eta}

        base, groups = checks.resolve_base(params, base_optimizer, base_kwargs)
        super().__init__(groups, defaults)
        if base is None:   # a class or factory: built over the validated groups
            base = checks.build_base(base_optimizer, self.param_groups, base_kwargs)
        self.base_optimizer = base
        # Schedulers read the base optimizer's hyperparameters (e.g. OneCycleLR: momentum/betas).
        self.defaults = {**base.defaults, **defaults}
        self._link()
        for i, g in enumerate(self.param_groups):
            self.engine.rule.validate_group(g, f"param_groups[{i}]")
        if not self._params():
            raise ValueError("params: no parameter requires grad")
        self._perturb_ids = checks.perturb_ids(perturb, self.param_groups)
        if self.schedule.reuse is not None and perturb is not None:
            raise ValueError(f"reuse: {self.schedule.reuse!r} needs every parameter perturbed "
                             "(its direction is made from the clean gradient of the perturbed "
                             "ones); drop perturb= or reuse")
        if self.schedule.reuse is not None:
            check_support(self.engine.rule, where="reuse")
        self.distribution.check_schedule(self.schedule)
        check_support(self.engine.rule, where="optimizer", optimizer=base,
                      micro_batches=self.engine.micro_batches,
                      micro_batch_size=self.engine.micro_batch_size,
                      strategy=self.engine.strategy.name)
        #: The step under way: accumulate() calls not yet finished by step().
        self._step: Step | None = None
        self._two_step: Step | None = None   # between first_step() and second_step()
        self.steps = 0
        self.skipped_steps = 0
        self.last_result: GradientResult | None = None

    # -- param groups: the base optimizer's (msam/optim/wrapper.py) ------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _per_param(self) -> tuple[list[torch.Tensor], list[dict[str, Any]], list[bool]]:
        params, groups, perturb = [], [], []
        self._link()  # a base-optimizer load may have replaced the groups
        for i, g in enumerate(self.param_groups):
            checks.validate_group(g, f"param_groups[{i}]")  # a scheduler may have changed rho
            self.engine.rule.validate_group(g, f"param_groups[{i}]")
            for p in g["params"]:
                if not p.requires_grad:
                    continue
                params.append(p)
                groups.append(g)
                perturb.append(self._perturb_ids is None or id(p) in self._perturb_ids)
        return params, groups, perturb

    @property
    def pending(self) -> bool:
        """Whether ``accumulate()`` calls wait to be finished by ``step()``."""
        return self._step is not None and self._step.calls > 0

    @property
    def micro_batches(self) -> int | None:
        return self.engine.micro_batches

    @property
    def strategy(self) -> str:
        return self.engine.strategy_name

    @property
    def rule(self) -> PerturbationRule:
        return self.engine.rule

    # -- the step ------------------------------------------------------------------------------
    def _begin(self, scaler: Any, fresh: bool = True) -> Step:
        """A new transaction (:class:`msam.optim.step.Step`) for optimizer step ``self.steps``."""
        params, groups, perturb = self._per_param()
        self.distribution.begin_step(params)
        return Step(self.engine, params, groups, perturb,
                    perturbs=self.schedule.perturbs(self.steps), scaler=scaler, fresh=fresh,
                    keep_clean=self.schedule.reuse is not None,
                    optimizer_state=self.base_optimizer.state)

    def accumulate(
        self,
        loss_fn: Callable[..., torch.Tensor],
        batch: Any = None,
        *,
        scale: float = 1.0,
        scaler: Any = None,
    ) -> torch.Tensor:
        """Add ``scale`` times the mSAM gradient of ``batch`` to ``p.grad``; no base step.

        For ``k`` accumulation batches use ``scale=1/k`` and finish with ``step()``: the ``k``
        calls are one transaction (the step's BatchNorm statistics, one update per call, and
        the rule's statistics are written when ``step()`` commits it).
        """
        self._check_no_two_step("accumulate")
        self.distribution.check_call(loss_fn, batch, None, scaler, accumulate=True)
        step = self._step = self._step or self._begin(scaler)
        try:
            loss = step.add(loss_fn, batch, float(scale), scaler)
        finally:
            if not step.calls:   # nothing accumulated: the next call begins afresh
                self._step = None
        self.last_result = GradientResult(loss, step.skipped, step.reason)
        if step.skipped:
            self.skipped_steps += 1
        return loss

    def step(  # type: ignore[override]
        self,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        batch: Any = None,
        *,
        closure: Callable[[], torch.Tensor] | None = None,
        scaler: Any = None,
    ) -> torch.Tensor | None:
        """Compute the mSAM gradient of ``batch`` and take one base-optimizer step.

        * ``step(loss_fn, batch)``: the mSAM step; ``loss_fn(micro_batch)`` returns the loss.
        * ``step(closure)`` / ``step(closure=closure)`` (``m = 1``): a closure in the
          ``torch.optim`` convention (forward + ``backward()``, returns the loss), called at
          ``w`` and at ``w + e``.
        * ``step()`` after :meth:`accumulate`: the base step on the accumulated gradient.

        Returns the weighted mean loss at the unperturbed weights (detached), or NaN when the
        step was skipped. If anything fails, ``.grad``, the weights, the BatchNorm buffers and
        the rule's and schedule's state are as before the call.
        """
        self._check_no_two_step("step")
        self.distribution.check_call(loss_fn, batch, closure, scaler, accumulate=False)
        loss_fn = checks.call_arguments(loss_fn, batch, closure)
        if loss_fn is None:   # finishing accumulate() calls
            if not self.pending:
                raise checks.nothing_accumulated(self.base_optimizer)
            assert self._step is not None
            self._finish(self._step, scaler, keep=True)
            return None
        if self.pending:
            raise RuntimeError("accumulate() was called since the last step: call step() "
                               "without arguments to apply the accumulated gradient")
        step = self._begin(scaler)
        loss = step.add(loss_fn, batch, 1.0)                       # the mSAM gradient
        self.last_result = GradientResult(loss, step.skipped, step.reason)
        if step.skipped:
            self.skipped_steps += 1
            if step.scaler is not None:
                step.report_overflow(self.base_optimizer)
            return loss
        self._finish(step, scaler, keep=False)                     # base step, commit
        return loss

    def _finish(self, step: Step, scaler: Any, keep: bool) -> None:
        """The base step on ``step``'s gradient, then its commit. If the base step raises,
        ``keep`` keeps the accumulated gradient for another ``step()``; otherwise the step is
        rolled back."""
        # Finishing accumulate() calls: the base step may change .grad in place (unscaling,
        # clipping, a reuse off-step), so a copy lets a failed one leave it as accumulated.
        kept = [None if p.grad is None else p.grad.clone() for p in step.params] if keep else None
        try:
            self._base_step(scaler, step)
        except BaseException:
            if kept is not None:
                for p, g in zip(step.params, kept):
                    p.grad = g
            else:
                self._step = None
                step.rollback()
            raise
        self._step = None
        step.commit(self.schedule)

    def base_step(self, scaler: Any = None) -> None:
        """The base optimizer's step on the gradient in ``p.grad`` as it is (clipped with
        ``max_grad_norm``), e.g. one filled with :func:`msam_gradient`. No perturbation here.
        After ``accumulate()`` calls it finishes them as ``step()`` does.

        If the base optimizer raises, the exception propagates; torch's optimizers check their
        inputs before writing, and msam keeps no copy of their state (it would cost two to
        three parameter copies per step).
        """
        self._check_no_two_step("base_step")
        if self.pending:   # accumulate() calls: finished as step() finishes them
            assert self._step is not None
            self._finish(self._step, scaler, keep=True)
            return
        self._base_step(scaler, None)

    def _base_step(self, scaler: Any, step: Step | None) -> None:
        """The one base step: the distribution's gradient reduction, a reuse schedule's change
        to ``.grad``, clipping (after unscaling), the base optimizer (through the scaler) and a
        decoupled rule's ``w -= lr d``."""
        if step is not None:
            self.distribution.before_base_step(self, step)
            check_decoupled_lr(self.param_groups, step, self.engine.rule.name)
            step.reuse(self.schedule)
        params = self._params()
        if scaler is not None and scaler.is_enabled():
            if self.max_grad_norm is not None:
                scaler.unscale_(self.base_optimizer)
                self.distribution.clip_grad_norm_(self, params, self.max_grad_norm)
            scaler.step(self.base_optimizer)
        else:
            if self.max_grad_norm is not None:
                self.distribution.clip_grad_norm_(self, params, self.max_grad_norm)
            self.base_optimizer.step()
        if step is not None:
            step.apply_decoupled()
        self.steps += 1

    # -- the two-step API (m = 1) ----------------------------------------------------------------
    def _check_no_two_step(self, what: str) -> None:
        if self._two_step is not None:
            raise RuntimeError(f"{what}() between first_step() and second_step(): call "
                               "second_step() first (the weights are still perturbed)")

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + e`` with ``e`` from the gradient in ``.grad`` (your ``backward()`` at
        ``w``); keeps an exact copy of ``w``. For models with BatchNorm given as ``model=``,
        running statistics are frozen until :meth:`second_step` (the perturbed pass updates
        none). ``m = 1`` only: micro-batches need ``step(loss_fn, batch)``."""
        self._check_no_two_step("first_step")
        self.distribution.check_two_step()
        checks.check_two_step(self.schedule, self.engine)
        step = self._begin(None)
        step.move_by_grad(frozen_bn=self.engine.model is not None)   # w + e, from .grad
        self._two_step = step
        if zero_grad:
            self.zero_grad()

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly and take the base step with the gradient in ``.grad`` (your
        ``backward()`` at ``w + e``)."""
        if self._two_step is None:
            raise RuntimeError("second_step() without first_step()")
        step, self._two_step = self._two_step, None
        step.move_back()                                               # w, exactly
        self._base_step(None, None)
        step.commit()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._step is not None:   # a pending accumulation: its gradient is dropped, the
            self._step.drop()          # BatchNorm statistics of its passes are kept (as torch)
            self._step = None
        super().zero_grad(set_to_none=set_to_none)

    # -- state (msam/optim/state.py) ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus the ``msam`` entry (see
        :func:`msam.optim.state.state_dict`)."""
        return _state.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, checked whole before anything changes (see
        :func:`msam.optim.state.load_state_dict`)."""
        _state.load_state_dict(self, state_dict)

    def __getstate__(self) -> dict[str, Any]:
        return _state.getstate(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        _state.setstate(self, state)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, "
            f"rho={self.defaults['rho']}, micro_batches={self.engine.micro_batches}, "
            f"micro_batch_size={self.engine.micro_batch_size}, rule={self.engine.rule.name!r}, "
            f"strategy={self.engine.strategy_name!r}"
            + ("" if self.schedule.trivial else f", schedule={self.schedule!r}") + ")"
        )


MSAM.step = step_entry(MSAM.step)  # type: ignore[method-assign]
