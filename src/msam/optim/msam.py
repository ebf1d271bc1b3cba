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
import copy
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

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
#: Keys of the ``msam`` entry a version-2 state must have (``schedule`` may be absent: states
#: written before schedules existed load with the default one); version 1 needs ``micro_batches``.
_REQUIRED_KEYS = {1: ("micro_batches",),
                  2: ("micro_batches", "micro_batch_size", "rule", "strategy", "max_grad_norm",
                      "nonfinite", "steps", "skipped_steps")}
#: Step counters also written into every saved param group, so that
#: ``torch.distributed.checkpoint``'s optimizer state dicts (which keep only ``state`` and
#: ``param_groups``) carry them; see :meth:`MSAM.load_state_dict`.
_GROUP_COUNTERS = ("msam_steps", "msam_skipped_steps")
#: Per-parameter state entries of torch's optimizers that have the parameter's shape.
_PARAM_SHAPED_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                       "square_avg", "acc_delta", "grad_avg", "sum", "ax", "prev", "step_size",
                       "exp_inf")
#: Not pickled / deep-copied (as ``torch.optim.Optimizer`` drops its hooks): the step wrapper an
#: LR scheduler installs on the instance, the last result (closures) and the hook tables.
_NOT_COPIED = ("step", "last_result", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
               "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
               "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


def _describe(p: torch.Tensor) -> str:
    return f"shape {tuple(p.shape)}, dtype {str(p.dtype).replace('torch.', '')}"


def _check_new_group(group: dict[str, Any], index: int) -> None:
    """A param group about to be added: no parameter twice (torch.optim only warns, and then
    steps it twice), no complex parameter (SAM's norm and step are defined for real weights)."""
    params = group.get("params")
    if isinstance(params, torch.Tensor):
        group["params"] = params = [params]
    elif params is not None and not isinstance(params, (set, list)):
        group["params"] = params = list(params)   # a generator is read once
    if not isinstance(params, list):
        return   # torch.optim's own error
    seen: dict[int, int] = {}
    for k, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            continue
        if id(p) in seen:
            raise ValueError(
                f"params: param_groups[{index}] lists one parameter twice (positions "
                f"{seen[id(p)]} and {k}, {_describe(p)}); it would be perturbed and stepped "
                "twice. List each parameter once (e.g. deduplicate tied weights)")
        seen[id(p)] = k
        if p.is_complex():
            raise ValueError(
                f"params: param_groups[{index}] parameter {k} ({_describe(p)}) is complex; "
                "the SAM perturbation rho g/||g|| is defined for real parameters. Store it as "
                "a real parameter (e.g. torch.view_as_real) and rebuild the complex value in "
                "forward")


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
        elif isinstance(base_optimizer, type) and not issubclass(base_optimizer, Optimizer):
            raise ValueError(
                "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD), "
                "an optimizer instance, or a function returning one; got the class "
                f"{base_optimizer.__module__}.{base_optimizer.__qualname__}")
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
                    "base_optimizer must be a torch.optim.Optimizer subclass, an optimizer "
                    "instance, or a function returning one; the function returned "
                    f"{type(base).__name__}"
                )
        else:
            raise ValueError(
                "base_optimizer must be a torch.optim.Optimizer subclass, an optimizer instance, "
                f"or a function returning one; got {type(base_optimizer).__name__}"
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
        check_support(self.engine.rule, where="optimizer", optimizer=base,
                      micro_batches=self.engine.micro_batches,
                      micro_batch_size=self.engine.micro_batch_size,
                      strategy=self.engine.strategy.name)
        #: The step under way: accumulate() calls not yet finished by step().
        self._step: Step | None = None
        self._two_step: tuple[Step, list[torch.Tensor], list[torch.Tensor], Any] | None = None
        self.steps = 0
        self.skipped_steps = 0
        self.last_result: GradientResult | None = None

    # -- param-group plumbing ---------------------------------------------------------------
    # ``param_groups`` and ``state`` ARE the base optimizer's, whoever replaced them (e.g.
    # ``opt.base_optimizer.load_state_dict`` or DCP's ``set_optimizer_state_dict`` make new
    # lists): properties that read and write through ``base_optimizer``. Before the base exists
    # (inside ``Optimizer.__init__``) they are held here.
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        base = getattr(self, "base_optimizer", None)  # a wrapper may forward it (Lightning)
        return self.__dict__["_early_param_groups"] if base is None else base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        base = getattr(self, "base_optimizer", None)  # a wrapper may forward it (Lightning)
        if base is None:
            self.__dict__["_early_param_groups"] = value
        else:
            base.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        base = getattr(self, "base_optimizer", None)  # a wrapper may forward it (Lightning)
        return self.__dict__["_early_state"] if base is None else base.state

    @state.setter
    def state(self, value: Any) -> None:
        base = getattr(self, "base_optimizer", None)  # a wrapper may forward it (Lightning)
        if base is None:
            self.__dict__["_early_state"] = value
        else:
            base.state = value

    def _link(self) -> None:
        """Give every param group ``rho`` / ``eta`` (groups replaced by a base-optimizer load
        may lack them) and drop saved step counters from them; drop what
        ``Optimizer.__init__`` held before the base existed."""
        self.__dict__.pop("_early_param_groups", None)
        self.__dict__.pop("_early_state", None)
        for group in self.param_groups:
            for k in ("rho", "eta"):
                group.setdefault(k, self.defaults[k])
            for k in _GROUP_COUNTERS:   # an MSAM state loaded into the base optimizer
                group.pop(k, None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = getattr(self, "base_optimizer", None)
        _check_new_group(param_group, len(self.param_groups))
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
        self._link()  # a base-optimizer load may have replaced the groups
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
        """The base optimizer's state dict plus the ``msam`` entry (settings, rule and schedule
        state, counters); the step counters are also written into every saved param group
        (``msam_steps``, ``msam_skipped_steps``), where ``torch.distributed.checkpoint`` keeps
        them. Runs the hooks of ``register_state_dict_pre_hook`` / ``_post_hook``."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
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
        for group in sd["param_groups"]:
            group[_GROUP_COUNTERS[0]] = self.steps
            group[_GROUP_COUNTERS[1]] = self.skipped_steps
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            out = post_hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`; anything else is refused with an error.

        Checks the whole state before changing anything: the ``msam`` entry (every key present,
        each value valid), per-parameter state written by other SAM implementations
        (``old_p``), the number and sizes of the param groups, the shape of every
        parameter-shaped entry of the base state (momentum buffers, Adam moments) and of the
        rule's state (FriendlySAM's EMA), and the param groups' ``rho`` / ``eta``. Then the
        saved settings replace this optimizer's (a ``UserWarning`` names each one that changes;
        the strategy, an execution choice, is restored silently).

        A state without the ``msam`` entry whose param groups carry the step counters (what
        ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` returns for an MSAM)
        loads the base state and the counters; the settings stay this optimizer's (they are
        constructor settings), and the rule's state and a reuse direction are not in it (see
        docs/core.md). Runs the ``register_load_state_dict_pre_hook`` / ``_post_hook`` hooks.
        """
        if isinstance(state_dict, Mapping):
            state_dict = dict(state_dict)
            for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
                out = pre_hook(self, state_dict)
                if out is not None:
                    state_dict = out
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
        counters = _group_counters(state_dict["param_groups"]) if extra is None else None
        if not isinstance(extra, Mapping) and counters is None:
            raise ValueError(
                f"state_dict: no {_STATE_KEY!r} entry, so it was not saved by msam.MSAM; a plain "
                f"{type(self.base_optimizer).__name__} state goes into "
                "opt.base_optimizer.load_state_dict(...)"
            )
        settings = _validated_settings(extra) if isinstance(extra, Mapping) else None
        for i, g in enumerate(state_dict["param_groups"]):
            _validate_group(g, f"state_dict: param_groups[{i}]")
        self._check_base_state(state_dict)
        params, _, perturb = self._per_param()
        perturbed = [p for p, k in zip(params, perturb) if k]
        strategy = schedule = rule_state = None
        if settings is not None:
            strategy = make_strategy(settings["strategy"]["name"])
            strategy.load_state_dict(settings["strategy"])
            rule_state = settings["rule"]
            if rule_state is not None:  # checked on a copy: nothing changes before the end
                probe = copy.deepcopy(self.engine.rule)
                probe.load_state_dict(rule_state)
                probe.check_params(perturbed, f"state_dict[{_STATE_KEY!r}]: rule")
            schedule = Schedule()
            schedule.load_state_dict(settings["schedule"], self._params(),
                                     f"state_dict[{_STATE_KEY!r}]")
            if schedule.reuse is not None and self._perturb_ids is not None:
                raise ValueError(f"state_dict[{_STATE_KEY!r}]: schedule.reuse needs every "
                                 "parameter perturbed, this optimizer has perturb=")
            changed = self._changed_settings(settings, schedule)
        # Everything is checked; from here on the state changes.
        sd = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        sd["param_groups"] = [{k: v for k, v in g.items() if k not in _GROUP_COUNTERS}
                              for g in state_dict["param_groups"]]
        self.base_optimizer.load_state_dict(sd)
        self._link()
        if settings is None:
            self.steps, self.skipped_steps = counters  # type: ignore[misc]
        else:
            if rule_state is not None:
                self.engine.rule.load_state_dict(rule_state)
            self.engine.micro_batches = settings["micro_batches"]
            self.engine.micro_batch_size = settings["micro_batch_size"]
            self.engine.strategy = self.distribution.evaluator(strategy)
            self.engine.nonfinite = settings["nonfinite"]
            self.max_grad_norm = settings["max_grad_norm"]
            self.steps = settings["steps"]
            self.skipped_steps = settings["skipped_steps"]
            self.schedule = schedule  # type: ignore[assignment]
            if changed:
                warnings.warn(
                    "load_state_dict: the saved msam settings replace this optimizer's: "
                    + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed)
                    + " (settings are part of the state, so a resumed run continues as saved; "
                    "set them again after loading to change them)", UserWarning, stacklevel=2)
        self._step = None
        self.distribution.check_settings(self)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_base_state(self, state_dict: Mapping[str, Any]) -> None:
        """What ``torch.optim``'s load checks (group count and sizes), before anything changes,
        and the shape of each parameter-shaped per-parameter entry (a wrong one would load
        and fail at the next step with a broadcast error)."""
        saved = state_dict["param_groups"]
        groups = self.param_groups
        if not isinstance(saved, (list, tuple)) or len(saved) != len(groups):
            n = len(saved) if isinstance(saved, (list, tuple)) else saved
            raise ValueError(f"state_dict: has {n} param groups, this optimizer "
                             f"{len(groups)}")
        where: dict[Any, tuple[int, int, torch.Tensor]] = {}
        for i, (sg, g) in enumerate(zip(saved, groups)):
            ids = sg.get("params") if isinstance(sg, Mapping) else None
            if not isinstance(ids, (list, tuple)) or len(ids) != len(g["params"]):
                n = len(ids) if isinstance(ids, (list, tuple)) else ids
                raise ValueError(f"state_dict: param_groups[{i}] has {n} parameters, this "
                                 f"optimizer's {len(g['params'])}")
            for k, (pid, p) in enumerate(zip(ids, g["params"])):
                where[pid] = (i, k, p)
        for pid, pstate in state_dict["state"].items():
            if pid not in where or not isinstance(pstate, Mapping):
                continue
            i, k, p = where[pid]
            for key in _PARAM_SHAPED_STATE:
                v = pstate.get(key)
                if isinstance(v, torch.Tensor) and v.shape != p.shape:
                    raise ValueError(
                        f"state_dict: state of parameter {pid} (param_groups[{i}] parameter "
                        f"{k}): {key!r} has shape {tuple(v.shape)}, the parameter "
                        f"{tuple(p.shape)}")

    def _changed_settings(self, settings: Mapping[str, Any], schedule: Schedule
                          ) -> list[tuple[str, object, object]]:
        """The settings a load would change: ``(name, now, saved)``."""
        def plain(rule_state: Mapping[str, Any] | None) -> dict[str, Any]:
            return {k: v for k, v in (rule_state or {}).items()
                    if isinstance(v, (str, int, float, bool, type(None)))}

        now = {"micro_batches": self.engine.micro_batches,
               "micro_batch_size": self.engine.micro_batch_size,
               "max_grad_norm": self.max_grad_norm, "nonfinite": self.engine.nonfinite}
        out: list[tuple[str, object, object]] = [
            (k, v, settings[k]) for k, v in now.items() if v != settings[k]]
        rule_now, rule_saved = plain(self.engine.rule.state_dict()), plain(settings["rule"])
        if rule_saved and rule_now != rule_saved:
            out.append(("rule", rule_now, rule_saved))
        sched_now, sched_saved = (
            {k: v for k, v in sc.state_dict().items() if k != "direction"}
            for sc in (self.schedule, schedule))
        if sched_now != sched_saved:
            out.append(("schedule", sched_now, sched_saved))
        return out

    def _is_state_init(self) -> bool:
        """A ``step()`` that cannot change anything: nothing accumulated, every group's ``lr``
        0 and every gradient zero (how DCP initialises optimizer state; see ``_step_entry``)."""
        return (not self.pending and self._two_step is None
                and all("lr" in g and _is_zero(g["lr"]) for g in self.param_groups)
                and all(p.grad is not None and p.grad.layout == torch.strided
                        and not bool(p.grad.any()) for p in self._params()))

    # -- copy / pickle --------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Everything (``torch.optim.Optimizer`` keeps only ``defaults``, ``state`` and
        ``param_groups``, which lost the base optimizer, engine and schedule), less the hooks
        (as torch.optim), the last result and an LR scheduler's wrapper of ``step``. The
        ``perturb=`` subset is kept as positions (it is held by ``id``)."""
        if self._two_step is not None:
            raise RuntimeError("copy/pickle between first_step() and second_step(): the "
                               "weights are perturbed; call second_step() first")
        state = {k: v for k, v in self.__dict__.items() if k not in _NOT_COPIED}
        if self._perturb_ids is not None:
            ids = self._perturb_ids
            state["_perturb_ids"] = [k for k, p in enumerate(_group_params(self.param_groups))
                                     if id(p) in ids]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        positions = state.pop("_perturb_ids", None)
        Optimizer.__setstate__(self, state)   # new hook tables, torch's step wrapper
        if positions is not None:
            params = _group_params(self.param_groups)
            self._perturb_ids = {id(params[k]) for k in positions}
        else:
            self._perturb_ids = None
        self.last_result = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, "
            f"rho={self.defaults['rho']}, micro_batches={self.engine.micro_batches}, "
            f"micro_batch_size={self.engine.micro_batch_size}, rule={self.engine.rule.name!r}, "
            f"strategy={self.engine.strategy_name!r}"
            + ("" if self.schedule.trivial else f", schedule={self.schedule!r}") + ")"
        )


@contextlib.contextmanager
def _global_step_hooks_held() -> Any:
    """Hold torch.optim's global step hooks back (``register_optimizer_step_pre_hook`` /
    ``_post_hook``) while an MSAM step runs: torch's wrapper of ``MSAM.step`` has called them
    once for this step, and the base optimizer's step inside it would call them again. Hooks
    registered meanwhile are kept. (Module-level tables: another thread's optimizer stepping
    at the same moment would not see them either.)"""
    tables: tuple[dict[Any, Any], ...] = (
        _torch_optimizer._global_optimizer_pre_hooks,  # type: ignore[assignment]
        _torch_optimizer._global_optimizer_post_hooks)
    saved = [dict(t) for t in tables]
    for t in tables:
        t.clear()
    try:
        yield
    finally:
        for t, held in zip(tables, saved):
            added = dict(t)
            t.clear()
            t.update(held)
            t.update(added)


def _step_entry(step: Callable[..., Any]) -> Callable[..., Any]:
    """Around ``MSAM.step`` (torch.optim wraps this once more with its hooks):

    * global step hooks fire once per MSAM step (not again for the inner base step);
    * ``step()`` / ``step(closure=None)`` (every argument None; subclasses pass theirs on)
      that cannot change anything -- every group's ``lr``
      is 0 and every gradient is zero, which is how ``torch.distributed.checkpoint``
      initialises an optimizer's state (``_init_optim_state``) -- steps the base optimizer
      once to create its state (momentum buffers, Adam moments) instead of raising; msam's
      counters do not move. Any other ``step()`` without ``loss_fn`` is refused as before.
    """
    @functools.wraps(step)
    def wrapper(self: MSAM, *args: Any, **kwargs: Any) -> Any:
        with _global_step_hooks_held():
            if all(a is None for a in (*args, *kwargs.values())) and self._is_state_init():
                self.base_optimizer.step()
                return None
            return step(self, *args, **kwargs)

    return wrapper


def _is_zero(x: Any) -> bool:
    return (not isinstance(x, bool) and isinstance(x, (int, float)) and x == 0) or (
        isinstance(x, torch.Tensor) and x.numel() == 1 and bool(x == 0))


MSAM.step = _step_entry(MSAM.step)  # type: ignore[method-assign]


def _group_params(groups: Iterable[Mapping[str, Any]]) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]


def _group_counters(groups: Any) -> tuple[int, int] | None:
    """The step counters written into every saved param group, or None when absent (the
    state was not saved by an MSAM); refused when the groups disagree or a value is invalid."""
    if not isinstance(groups, (list, tuple)) or not groups or not all(
            isinstance(g, Mapping) and _GROUP_COUNTERS[0] in g for g in groups):
        return None
    values = {(g[_GROUP_COUNTERS[0]], g.get(_GROUP_COUNTERS[1], 0)) for g in groups}
    for steps, skipped in values:
        for name, v in zip(_GROUP_COUNTERS, (steps, skipped)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"state_dict: param group {name!r} must be an integer >= 0, "
                                 f"got {v!r}")
    if len(values) != 1:
        raise ValueError(f"state_dict: the param groups disagree on {_GROUP_COUNTERS}: "
                         f"{sorted(values)}")
    return next(iter(values))


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
    missing = [k for k in _REQUIRED_KEYS[version] if k not in extra]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(repr(k) for k in missing)} (a version-"
                         f"{version} msam state has {list(_REQUIRED_KEYS[version])}); it was "
                         "not written by MSAM.state_dict or was edited")
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
