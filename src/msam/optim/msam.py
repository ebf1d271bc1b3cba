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

Notes:

* **Weight decay** stays in the base optimizer (decoupled): the perturbation uses the gradient of
  the loss alone, and the base step applies decay as it always does.
* **No zero_grad needed**: ``step(loss_fn, batch)`` writes a fresh gradient into ``p.grad`` and
  leaves it there after the base step (for logging). For gradient accumulation, call
  :meth:`MSAM.accumulate` ``k`` times (with ``scale=1/k``) and then :meth:`MSAM.step` with no
  arguments.
* **Clipping** (``max_grad_norm``) acts on the averaged gradient, after unscaling and right
  before the base step; the perturbation itself is normalised and needs none.
* **Mixed precision**: pass ``scaler=`` (a ``torch.amp.GradScaler``) to ``step``; call
  ``scaler.update()`` after it, as usual. If either pass overflows, the whole step is skipped
  (weights, ``.grad``, BatchNorm buffers and counters as before; ``skipped_steps`` + 1) and the
  scaler sees the overflow (so ``update`` lowers the scale). ``torch.autocast`` may go inside
  ``loss_fn`` or around the ``step`` call: autocast's weight-cast cache is cleared before every
  pass, so the perturbed pass never reuses casts made at ``w``.
* **Two-step API** (for code written against the common two-step SAM optimizer, ``m = 1``):
  ``loss.backward(); opt.first_step(zero_grad=True); loss_fn(...).backward();
  opt.second_step(zero_grad=True)``. ``step(closure)`` with a closure that runs forward and
  ``backward()`` (the ``torch.optim`` convention) calls it twice, at ``w`` and at ``w + e``.
* **A gradient you filled yourself** (e.g. with :func:`msam_gradient`): ``opt.base_step()``.
  ``step()`` with no arguments is only for finishing :meth:`MSAM.accumulate` calls; anything
  else raises instead of silently taking a plain base-optimizer step.
* **BatchNorm**: see :mod:`msam.core.batchnorm` -- per-micro-batch statistics in both passes,
  running statistics updated once per step from the unperturbed pass.
* **state_dict** holds the base optimizer's full state (momentum buffers, Adam moments) plus the
  mSAM settings, so a resumed run continues bit-identically.
* **Schedules** (:mod:`msam.core.schedule`, docs/schedules.md): ``every=k`` perturbs on steps
  ``0, k, 2k, ...``, ``start_step=s`` only from step ``s`` on, ``reuse="looksam"`` reuses the
  perturbation's gradient component in between; other steps are one plain pass and a base step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from msam.core.batchnorm import BatchNormStep
from msam.core.perturbation import PerturbationRule
from msam.core.registry import check_support
from msam.core.schedule import Schedule, validate_schedule_state
from msam.optim.distribution import Distribution
from msam.optim.step import GradientConfig, Step, validate_count, validate_eta, validate_rho
from msam.strategies import STRATEGIES, Strategy, make_strategy

__all__ = ["ASAM", "MSAM", "SAM", "Schedule", "msam_gradient"]

_STATE_KEY = "msam"
_STATE_VERSION = 2
#: Per-parameter state keys written by other SAM implementations (a copy of the weights).
_FOREIGN_STATE_KEYS = ("old_p", "e_w", "sam_e_w")


def _validate_group(group: Mapping[str, Any], where: str) -> None:
    if "rho" in group:
        validate_rho(group["rho"], f"{where}: rho")
    if "eta" in group:
        validate_eta(group["eta"], f"{where}: eta")


class MSAM(Optimizer):
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
        strategy: ``"loop"`` (default, lowest memory, any model), ``"vmap"`` (vectorised over
            micro-batches; needs ``model``) or ``"auto"`` (measures both once).
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
        self.schedule = _make_schedule(schedule, every, start_step, reuse, reuse_alpha)
        rho = validate_rho(rho)
        eta = validate_eta(eta)
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
            or not math.isfinite(max_grad_norm) or max_grad_norm <= 0
        ):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        self.engine = GradientConfig(
            micro_batches=micro_batches, micro_batch_size=micro_batch_size, adaptive=adaptive,
            rule=rule, strategy=strategy, model=model, nonfinite=nonfinite,
        )
        self.engine.strategy = self.distribution.evaluator(self.engine.strategy)
        self.engine.rule = self.distribution.perturbation_rule(self.engine.rule)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        defaults = {"rho": rho, "eta": eta}

        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise ValueError(
                    "base_kwargs given with an already-built base_optimizer: "
                    f"{sorted(base_kwargs)}; set them on the base optimizer instead"
                )
            base = base_optimizer
            if params is not None:
                given = {id(p) for p in _flatten_params(params)}
                have = {id(p) for g in base.param_groups for p in g["params"]}
                if given != have:
                    raise ValueError(
                        "params: differ from the parameters of the given base_optimizer "
                        "(pass params=None to use its param groups)"
                    )
            for i, g in enumerate(base.param_groups):
                _validate_group(g, f"base_optimizer.param_groups[{i}]")
            super().__init__(base.param_groups, defaults)
        elif callable(base_optimizer):
            if params is None:
                raise ValueError("params: required when base_optimizer is a class")
            params = list(params) if not isinstance(params, torch.Tensor) else [params]
            for i, g in enumerate(params):
                if isinstance(g, Mapping):
                    _validate_group(g, f"params[{i}]")
            super().__init__(params, defaults)
            base = base_optimizer(self.param_groups, **base_kwargs)
            if not isinstance(base, Optimizer):
                raise ValueError(
                    f"base_optimizer must build a torch.optim.Optimizer, got {type(base).__name__}"
                )
        else:
            raise ValueError(
                "base_optimizer must be an optimizer class or instance, got "
                f"{type(base_optimizer).__name__}"
            )
        self.base_optimizer = base
        # Schedulers read the base optimizer's hyperparameters (e.g. OneCycleLR: momentum/betas).
        self.defaults = {**base.defaults, **defaults}
        self._link()
        for i, g in enumerate(self.param_groups):
            self.engine.rule.validate_group(g, f"param_groups[{i}]")
        if not self._params():
            raise ValueError("params: no parameter requires grad")
        self._perturb_ids: set[int] | None = None
        if perturb is not None:
            ids = {id(p) for p in _flatten_params(perturb)}
            known = {id(p) for g in self.param_groups for p in g["params"]}
            if not ids <= known:
                raise ValueError("perturb: contains parameters that are not in params")
            self._perturb_ids = ids
        if self.schedule.reuse is not None and perturb is not None:
            raise ValueError(f"reuse: {self.schedule.reuse!r} needs every parameter perturbed "
                             "(its direction is made from the clean gradient of the perturbed "
                             "ones); drop perturb= or reuse")
        if self.schedule.reuse is not None:
            check_support(self.engine.rule, where="reuse")
        #: The step under way: accumulate() calls not yet finished by step().
        self._step: Step | None = None
        self._two_step: tuple[Step, list[torch.Tensor], list[torch.Tensor], Any] | None = None
        self.steps = 0
        self.skipped_steps = 0
        self.last_result: GradientResult | None = None

    # -- param-group plumbing ---------------------------------------------------------------
    def _link(self) -> None:
        """Share param_groups and state with the base optimizer (schedulers see one list)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for k in ("rho", "eta"):
                group.setdefault(k, self.defaults[k])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = getattr(self, "base_optimizer", None)
        if base is None:  # during Optimizer.__init__
            return super().add_param_group(param_group)
        _validate_group(param_group, "add_param_group")
        for k in ("rho", "eta"):
            param_group.setdefault(k, self.defaults[k])
        base.add_param_group(param_group)
        self._link()

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _per_param(self) -> tuple[list[torch.Tensor], list[dict[str, Any]], list[bool]]:
        params, groups, perturb = [], [], []
        for i, g in enumerate(self.param_groups):
            _validate_group(g, f"param_groups[{i}]")  # a scheduler may have changed rho
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
                    keep_clean=self.schedule.reuse is not None)

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
        if self._step is None:
            self._step = self._begin(scaler)
        loss = self._step.add(loss_fn, batch, float(scale), scaler)
        self.last_result = GradientResult(loss, self._step.skipped, self._step.reason)
        if self._step.skipped:
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
        if closure is not None:
            if loss_fn is not None or batch is not None:
                raise ValueError("closure: give a closure or loss_fn and batch, not both")
            loss_fn = closure
        if loss_fn is None:
            if batch is not None:
                raise ValueError("batch: given without loss_fn")
            if self._step is None or not self._step.calls:
                raise RuntimeError(
                    "step() without loss_fn: no accumulate() call since the last step, and "
                    "msam does not step on a gradient it did not compute (that would be a plain "
                    f"{type(self.base_optimizer).__name__} step). Use opt.step(loss_fn, batch) "
                    "for an mSAM step, or opt.base_step() to apply a gradient you filled "
                    "yourself (e.g. with msam.msam_gradient). In a framework's training loop use "
                    "msam.integrations: huggingface.MSAMTrainer (Hugging Face Trainer), "
                    "accelerate.backward (accelerate), lightning.MSAMModule / "
                    "lightning.manual_step (Lightning); see docs/integrations.md"
                )
            self._finish(self._step, scaler, keep=True)
            return None
        if self._step is not None and self._step.calls:
            raise RuntimeError(
                "accumulate() was called since the last step: call step() without arguments "
                "to apply the accumulated gradient"
            )
        step = self._step = self._begin(scaler)
        loss = step.add(loss_fn, batch, 1.0)                       # the mSAM gradient
        self.last_result = GradientResult(loss, step.skipped, step.reason)
        if step.skipped:
            self._step = None
            self.skipped_steps += 1
            if step.scaler is not None:
                self._report_overflow(step.scaler)
            return loss
        self._finish(step, scaler, keep=False)                     # base step, commit
        return loss

    def _finish(self, step: Step, scaler: Any, keep: bool) -> None:
        """The base step on ``step``'s gradient, then its commit. If the base step raises,
        ``keep`` keeps the accumulated gradient for another ``step()``; otherwise the step is
        rolled back."""
        try:
            self._base_step(scaler, step)
        except BaseException:
            if keep:
                step.undo_reuse()
            else:
                self._step = None
                step.rollback()
            raise
        self._step = None
        step.commit(self.schedule)

    def base_step(self, scaler: Any = None) -> None:
        """The base optimizer's step on the gradient in ``p.grad`` as it is (clipped with
        ``max_grad_norm``), e.g. one filled with :func:`msam_gradient`. No perturbation here.

        If the base optimizer raises, the exception propagates; torch's optimizers check their
        inputs before writing, and msam keeps no copy of their state (it would cost two to
        three parameter copies per step).
        """
        self._check_no_two_step("base_step")
        self._base_step(scaler, None)

    def _base_step(self, scaler: Any, step: Step | None) -> None:
        """The one base step: the distribution's gradient reduction, a reuse schedule's change
        to ``.grad``, clipping (after unscaling), the base optimizer (through the scaler) and a
        decoupled rule's ``w -= lr d``."""
        if step is not None:
            self.distribution.before_base_step(self, step)
            _check_decoupled_lr(self.param_groups, step, self.engine.rule.name)
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

    def _report_overflow(self, scaler: Any) -> None:
        """Let the scaler see this step's overflow so that ``scaler.update()`` lowers the scale.

        ``GradScaler.step`` skips the base step when it finds an inf gradient; we give it one
        (on a temporary gradient) and then put the real gradients back.
        """
        params = self._params()
        saved = [p.grad for p in params]
        try:
            for p in params:
                p.grad = None
            params[0].grad = torch.full_like(params[0], float("inf"))
            scaler.step(self.base_optimizer)
        finally:
            for p, g in zip(params, saved):
                p.grad = g

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
        if not self.schedule.trivial:
            raise ValueError(f"first_step: the two-step API perturbs on every call; with a "
                             f"schedule ({self.schedule!r}) use opt.step(loss_fn, batch)")
        if (self.engine.micro_batches or 1) != 1 or self.engine.micro_batch_size is not None:
            raise ValueError(
                "first_step: the two-step API perturbs once per batch (m = 1); with "
                "micro_batches use opt.step(loss_fn, batch)"
            )
        check_support(self.engine.rule, where="two_step")
        step = self._begin(None)
        idx = step.perturbed
        pert = [step.params[i] for i in idx]
        grads = [p.grad for p in pert]
        if all(g is None for g in grads):
            raise RuntimeError("first_step: no gradient in .grad; call loss.backward() first")
        rule = self.engine.rule
        if rule.observes:  # the rule's statistics are written when second_step commits
            step.clean = [None if g is None else g.clone() for g in grads]
        e, _ = rule(grads, pert, [step.groups[i] for i in idx])
        backup = [p.detach().clone() for p in pert]
        moved = [(p, ei) for p, ei in zip(pert, e) if ei is not None]
        torch._foreach_add_([p for p, _ in moved], [ei for _, ei in moved])
        frozen = contextlib.ExitStack()
        if self.engine.model is not None:
            bn = frozen.enter_context(contextlib.closing(BatchNormStep(self.engine.bn.modules())))
            frozen.enter_context(bn.pass_(record=False))
        self._two_step = (step, pert, backup, frozen)
        if zero_grad:
            self.zero_grad()

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly and take the base step with the gradient in ``.grad`` (your
        ``backward()`` at ``w + e``)."""
        if self._two_step is None:
            raise RuntimeError("second_step() without first_step()")
        step, pert, backup, frozen = self._two_step
        self._two_step = None
        with torch.no_grad():
            torch._foreach_copy_(pert, backup)
        frozen.close()
        self._base_step(None, None)
        step.commit()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        self._step = None  # a pending accumulation is dropped with its gradient
        super().zero_grad(set_to_none=set_to_none)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = self.base_optimizer.state_dict()
        sd[_STATE_KEY] = {
            "version": _STATE_VERSION,
            "micro_batches": self.engine.micro_batches,
            "micro_batch_size": self.engine.micro_batch_size,
            "rule": self.engine.rule.state_dict(),
            "strategy": self.distribution.state_name(self.engine.strategy),
            "max_grad_norm": self.max_grad_norm,
            "nonfinite": self.engine.nonfinite,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "schedule": self.schedule.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`; anything else is refused with an error.

        Checks the whole state before changing anything: the ``msam`` entry and each of its
        values, per-parameter state written by other SAM implementations (``old_p``), and the
        base optimizer's param groups (``rho``/``eta``). The saved strategy is restored.
        """
        if not isinstance(state_dict, Mapping) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise ValueError("state_dict: not an optimizer state (needs 'state' and "
                             "'param_groups')")
        for pid, pstate in state_dict["state"].items():
            keys = pstate.keys() if isinstance(pstate, Mapping) else ()
            foreign = [k for k in _FOREIGN_STATE_KEYS if k in keys]
            if foreign:
                raise ValueError(
                    f"state_dict: parameter {pid} has {foreign[0]!r}, the weight copy of another "
                    "SAM implementation; its momentum is not transferable this way. Load that "
                    "optimizer's base state into opt.base_optimizer if you must"
                )
        extra = state_dict.get(_STATE_KEY)
        if not isinstance(extra, Mapping):
            raise ValueError(
                f"state_dict: no {_STATE_KEY!r} entry, so it was not saved by msam.MSAM; a plain "
                f"{type(self.base_optimizer).__name__} state goes into "
                "opt.base_optimizer.load_state_dict(...)"
            )
        settings = _validated_settings(extra)
        for i, g in enumerate(state_dict["param_groups"]):
            _validate_group(g, f"state_dict: param_groups[{i}]")
        strategy = make_strategy(settings["strategy"]["name"])
        strategy.load_state_dict(settings["strategy"])
        rule_state = settings["rule"]
        if rule_state is not None:
            self.engine.rule.load_state_dict(rule_state)
        schedule = Schedule()
        schedule.load_state_dict(settings["schedule"], self._params(),
                                 f"state_dict[{_STATE_KEY!r}]")
        if schedule.reuse is not None and self._perturb_ids is not None:
            raise ValueError(f"state_dict[{_STATE_KEY!r}]: schedule.reuse needs every parameter "
                             "perturbed, this optimizer has perturb=")
        sd = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        self.base_optimizer.load_state_dict(sd)
        self._link()
        self.engine.micro_batches = settings["micro_batches"]
        self.engine.micro_batch_size = settings["micro_batch_size"]
        self.engine.strategy = self.distribution.evaluator(strategy)
        self.engine.nonfinite = settings["nonfinite"]
        self.max_grad_norm = settings["max_grad_norm"]
        self.steps = settings["steps"]
        self.skipped_steps = settings["skipped_steps"]
        self.schedule = schedule
        self._step = None
        self.distribution.check_settings(self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, "
            f"rho={self.defaults['rho']}, micro_batches={self.engine.micro_batches}, "
            f"micro_batch_size={self.engine.micro_batch_size}, rule={self.engine.rule.name!r}, "
            f"strategy={self.engine.strategy_name!r}"
            + ("" if self.schedule.trivial else f", schedule={self.schedule!r}") + ")"
        )


def _make_schedule(schedule: Schedule | None, every: Any, start_step: Any, reuse: Any,
                   reuse_alpha: Any) -> Schedule:
    if schedule is None:
        return Schedule(every, start_step, reuse, reuse_alpha)
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a msam.Schedule, got {type(schedule).__name__}")
    if (every, start_step, reuse, reuse_alpha) != (1, 0, None, 0.7):
        raise ValueError("schedule: give schedule= or every/start_step/reuse/reuse_alpha, "
                         "not both")
    return schedule


def _validated_settings(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The ``msam`` entry of a state dict, checked value by value (versions 1 and 2)."""
    where = f"state_dict[{_STATE_KEY!r}]"
    version = extra.get("version")
    if version not in (1, _STATE_VERSION):
        raise ValueError(f"{where}: unknown version {version!r} (this msam reads 1 and "
                         f"{_STATE_VERSION})")
    mb = validate_count(extra.get("micro_batches"), f"{where}: micro_batches")
    mbs = validate_count(extra.get("micro_batch_size"), f"{where}: micro_batch_size")
    if mb is not None and mbs is not None:
        raise ValueError(f"{where}: both micro_batches and micro_batch_size are set")
    strategy = extra.get("strategy", "loop")
    if version == 1:
        rule = {"name": "asam" if extra.get("adaptive") else "sam"}
        strategy = {"name": strategy}
    else:
        rule = extra.get("rule")  # type: ignore[assignment]  # validated just below
    if not isinstance(strategy, Mapping) or strategy.get("name") not in STRATEGIES:
        raise ValueError(f"{where}: strategy must name one of {sorted(STRATEGIES)}, "
                         f"got {strategy!r}")
    if not isinstance(rule, Mapping) or not isinstance(rule.get("name"), str):
        raise ValueError(f"{where}: rule must be a mapping with a 'name', got {rule!r}")
    nonfinite = extra.get("nonfinite", "raise")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"{where}: nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    mgn = extra.get("max_grad_norm")
    if mgn is not None and (isinstance(mgn, bool) or not isinstance(mgn, (int, float))
                            or not math.isfinite(mgn) or mgn <= 0):
        raise ValueError(f"{where}: max_grad_norm must be None or a finite number > 0, "
                         f"got {mgn!r}")
    counts = {}
    for key in ("steps", "skipped_steps"):
        v = extra.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}: {key} must be an integer >= 0, got {v!r}")
        counts[key] = v
    schedule = validate_schedule_state(extra.get("schedule"), where)
    return {"micro_batches": mb, "micro_batch_size": mbs, "strategy": dict(strategy),
            "rule": dict(rule), "nonfinite": nonfinite, "schedule": schedule,
            "max_grad_norm": None if mgn is None else float(mgn), **counts}


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
    params = [p for p in _flatten_params(params) if p.requires_grad]
    if not params:
        raise ValueError("params: no parameter requires grad")
    ids = None if perturb is None else {id(p) for p in _flatten_params(perturb)}
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


@dataclass
class GradientResult:
    """What the last gradient computation did (``MSAM.last_result``)."""

    loss: torch.Tensor  # mean loss at w (0-d, detached; NaN if skipped)
    skipped: bool = False
    reason: str = ""


def _check_decoupled_lr(param_groups: list[dict[str, Any]], step: Step, rule: str) -> None:
    """Before the base step: a decoupled rule's ``w -= lr d`` needs each group's lr as a
    number."""
    if step.decoupled is None:
        return
    for i, g in enumerate(param_groups):
        lr = g.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
            raise ValueError(
                f"param_groups[{i}]['lr']: rule {rule!r} (decoupled) applies w -= lr * d after "
                f"the base step and needs a number, got {lr!r} (an optimizer that sets no lr, "
                "e.g. Adafactor with relative_step=True, needs the coupled form)")


def _flatten_params(params: Iterable[Any]) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        return [params]
    out: list[torch.Tensor] = []
    for item in params:
        if isinstance(item, dict):
            out.extend(_flatten_params(item["params"]))
        else:
            out.append(item)
    return out
