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
  ``scaler.update()`` after it, as usual. If either pass overflows, the whole step is skipped,
  the weights are restored and the scaler sees the overflow (so ``update`` lowers the scale).
  ``torch.autocast`` goes inside ``loss_fn`` (or around the ``step`` call).
* **BatchNorm**: see :mod:`msam.core.batchnorm` -- per-micro-batch statistics in both passes,
  running statistics updated once per step from the unperturbed pass.
* **state_dict** holds the base optimizer's full state (momentum buffers, Adam moments) plus the
  mSAM settings, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from msam.optim.engine import GradientEngine, GradientResult, validate_eta, validate_rho
from msam.strategies import Strategy

__all__ = ["ASAM", "MSAM", "SAM", "msam_gradient"]

_STATE_KEY = "msam"


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
        strategy: ``"loop"`` (default, lowest memory, any model), ``"vmap"`` (vectorised over
            micro-batches; needs ``model``) or ``"auto"`` (measures both once).
        model: the module ``loss_fn`` calls; needed by ``"vmap"``/``"auto"`` only.
        perturb: a subset of the parameters to perturb (e.g. :func:`normalization_parameters`
            for SAM-ON); the rest are not moved but still receive the averaged gradient.
        max_grad_norm: clip the averaged gradient to this global L2 norm before the base step.
        nonfinite: ``"raise"`` (default) raises ``FloatingPointError`` on an inf/NaN loss or
            gradient; ``"skip"`` skips the step. Either way nothing was changed.
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
        strategy: str | Strategy = "loop",
        model: nn.Module | None = None,
        perturb: Iterable[torch.Tensor] | None = None,
        max_grad_norm: float | None = None,
        nonfinite: str = "raise",
        **base_kwargs: Any,
    ) -> None:
        rho = validate_rho(rho)
        eta = validate_eta(eta)
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
            or not math.isfinite(max_grad_norm) or max_grad_norm <= 0
        ):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        self.engine = GradientEngine(
            micro_batches=micro_batches, micro_batch_size=micro_batch_size, adaptive=adaptive,
            strategy=strategy, model=model, nonfinite=nonfinite,
        )
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
            super().__init__(base.param_groups, defaults)
        elif callable(base_optimizer):
            if params is None:
                raise ValueError("params: required when base_optimizer is a class")
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
        self._link()
        if not self._params():
            raise ValueError("params: no parameter requires grad")
        self._perturb_ids: set[int] | None = None
        if perturb is not None:
            ids = {id(p) for p in _flatten_params(perturb)}
            known = {id(p) for g in self.param_groups for p in g["params"]}
            if not ids <= known:
                raise ValueError("perturb: contains parameters that are not in params")
            self._perturb_ids = ids
        self._pending = False
        self.steps = 0
        self.skipped_steps = 0
        self.last_result: GradientResult | None = None

    # -- param-group plumbing ---------------------------------------------------------------
    def _link(self) -> None:
        """Share param_groups and state with the base optimizer (schedulers see one list)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = getattr(self, "base_optimizer", None)
        if base is None:  # during Optimizer.__init__
            return super().add_param_group(param_group)
        if "rho" in param_group:
            validate_rho(param_group["rho"])
        if "eta" in param_group:
            validate_eta(param_group["eta"])
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        base.add_param_group(param_group)
        self._link()

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _per_param(self) -> tuple[list[torch.Tensor], list[float], list[float], list[bool]]:
        params, rhos, etas, perturb = [], [], [], []
        for g in self.param_groups:
            for p in g["params"]:
                if not p.requires_grad:
                    continue
                params.append(p)
                rhos.append(float(g["rho"]))
                etas.append(float(g["eta"]))
                perturb.append(self._perturb_ids is None or id(p) in self._perturb_ids)
        return params, rhos, etas, perturb

    @property
    def micro_batches(self) -> int | None:
        return self.engine.micro_batches

    @property
    def strategy(self) -> str:
        return self.engine.strategy_name

    # -- the step ------------------------------------------------------------------------------
    def accumulate(
        self,
        loss_fn: Callable[..., torch.Tensor],
        batch: Any = None,
        *,
        scale: float = 1.0,
        scaler: Any = None,
    ) -> torch.Tensor:
        """Add ``scale`` times the mSAM gradient of ``batch`` to ``p.grad``; no base step.

        For ``k`` accumulation batches use ``scale=1/k`` and finish with ``step()``. Each call
        updates BatchNorm running statistics once (each call is one loader batch).
        """
        params, rhos, etas, perturb = self._per_param()
        # The first call after a step starts from zero; later calls add to it.
        result = self.engine.compute(
            loss_fn, batch, params, rhos=rhos, etas=etas, perturb=perturb, scaler=scaler,
            grad_weight=float(scale), fresh=not self._pending,
        )
        self.last_result = result
        if result.skipped:
            self.skipped_steps += 1
            return result.loss
        self._pending = True
        return result.loss

    def step(  # type: ignore[override]
        self,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        batch: Any = None,
        *,
        scaler: Any = None,
    ) -> torch.Tensor | None:
        """Compute the mSAM gradient of ``batch`` and take one base-optimizer step.

        With no ``loss_fn``: take the base step on the gradient already in ``p.grad`` (after
        :meth:`accumulate`, or after filling ``.grad`` yourself). Returns the weighted mean loss
        at the unperturbed weights (detached), or NaN when the step was skipped.
        """
        if loss_fn is None:
            if batch is not None:
                raise ValueError("batch: given without loss_fn")
            self._base_step(scaler)
            return None
        if self._pending:
            raise RuntimeError(
                "accumulate() was called since the last step: call step() without arguments "
                "to apply the accumulated gradient"
            )
        params, rhos, etas, perturb = self._per_param()
        result = self.engine.compute(
            loss_fn, batch, params, rhos=rhos, etas=etas, perturb=perturb, scaler=scaler,
            fresh=True,
        )
        self.last_result = result
        if result.skipped:
            self.skipped_steps += 1
            if scaler is not None and scaler.is_enabled():
                self._report_overflow(scaler)
            return result.loss
        self._base_step(scaler)
        return result.loss

    def _base_step(self, scaler: Any) -> None:
        params = self._params()
        if scaler is not None and scaler.is_enabled():
            if self.max_grad_norm is not None:
                scaler.unscale_(self.base_optimizer)
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            scaler.step(self.base_optimizer)
        else:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.base_optimizer.step()
        self._pending = False
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

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending = False
        super().zero_grad(set_to_none=set_to_none)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = self.base_optimizer.state_dict()
        sd[_STATE_KEY] = {
            "version": 1,
            "micro_batches": self.engine.micro_batches,
            "micro_batch_size": self.engine.micro_batch_size,
            "adaptive": self.engine.adaptive,
            "strategy": self.engine.strategy_name,
            "max_grad_norm": self.max_grad_norm,
            "nonfinite": self.engine.nonfinite,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        extra = sd.pop(_STATE_KEY, None)
        self.base_optimizer.load_state_dict(sd)
        self._link()
        if extra is not None:
            self.engine.micro_batches = extra.get("micro_batches")
            self.engine.micro_batch_size = extra.get("micro_batch_size")
            self.engine.adaptive = bool(extra.get("adaptive", False))
            self.engine.nonfinite = extra.get("nonfinite", "raise")
            self.max_grad_norm = extra.get("max_grad_norm")
            self.steps = int(extra.get("steps", 0))
            self.skipped_steps = int(extra.get("skipped_steps", 0))
        self._pending = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, "
            f"rho={self.defaults['rho']}, micro_batches={self.engine.micro_batches}, "
            f"micro_batch_size={self.engine.micro_batch_size}, adaptive={self.engine.adaptive}, "
            f"strategy={self.engine.strategy_name!r})"
        )


class SAM(MSAM):
    """SAM (Foret et al. 2021): :class:`MSAM` with one perturbation per batch (``m = 1``)."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, **kwargs: Any) -> None:
        for k in ("micro_batches", "micro_batch_size"):
            if k in kwargs:
                raise ValueError(f"{k}: SAM uses one micro-batch; use msam.MSAM for m > 1")
        super().__init__(params, base_optimizer, rho, **kwargs)


class ASAM(MSAM):
    """ASAM (Kwon et al. 2021): :class:`MSAM` with ``adaptive=True`` (micro-batches allowed)."""

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
    perturb: Iterable[torch.Tensor] | None = None,
    strategy: str | Strategy = "loop",
    model: nn.Module | None = None,
    scaler: Any = None,
    accumulate: bool = False,
    scale: float = 1.0,
    nonfinite: str = "raise",
) -> torch.Tensor:
    """Fill ``p.grad`` with the mSAM gradient of ``batch`` and return the loss at ``w``.

    The functional entry point for trainers that own the optimizer step (Hugging Face
    ``Trainer.training_step``, Lightning manual optimisation, custom loops): compute the gradient
    here, then let any optimizer (and any clipping / scaler logic) step. ``accumulate=True`` adds
    ``scale`` times the gradient to existing ``.grad`` instead of overwriting it.
    """
    rho = validate_rho(rho)
    eta = validate_eta(eta)
    params = [p for p in _flatten_params(params) if p.requires_grad]
    if not params:
        raise ValueError("params: no parameter requires grad")
    ids = None if perturb is None else {id(p) for p in _flatten_params(perturb)}
    engine = GradientEngine(
        micro_batches=micro_batches, micro_batch_size=micro_batch_size, adaptive=adaptive,
        strategy=strategy, model=model, nonfinite=nonfinite,
    )
    result = engine.compute(
        loss_fn, batch, params, rhos=[rho] * len(params), etas=[eta] * len(params),
        perturb=[ids is None or id(p) in ids for p in params], scaler=scaler,
        grad_weight=float(scale), fresh=not accumulate,
    )
    return result.loss


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
