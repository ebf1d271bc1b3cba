"""The mSAM gradient: split -> g_j -> e_j -> h_j -> sum_j (n_j / n) h_j, with its guarantees.

:class:`GradientEngine` turns ``(loss_fn, batch)`` into the mSAM gradient in ``p.grad``
(Behdin et al. 2023, mSAM; Foret et al. 2021, SAM; Kwon et al. 2021, ASAM)::

    split the batch into micro-batches j = 1..m of sizes n_j   (torch.tensor_split)
    g_j  = grad L_j(w)                  strategy.ascent    (micro-batch j's mean loss at w)
    e_j  = rule(g_j, w)                 the perturbation rule, e.g. rho g_j / (||g_j|| + 1e-12)
    h_j  = grad L_j(w + e_j)            strategy.descent   (adds (n_j / n) h_j into p.grad)
    grad = sum_j (n_j / n) h_j

``rho = 0`` (every perturbed group) is one pass at ``w`` per micro-batch: the base optimizer's
gradient. The perturbation rule (:mod:`msam.core.perturbation`) computes ``e_j``; the strategy
(:mod:`msam.strategies`) only evaluates gradients; the BatchNorm rule
(:mod:`msam.core.batchnorm`) is applied around each pass and committed once.

Guarantees: the weights are copied back from a saved copy (never by subtracting ``e_j``); if
``loss_fn`` raises or a loss / gradient is non-finite, the parameters, BatchNorm buffers and the
``.grad`` tensors are exactly as before the call and the error is raised (or, with
``nonfinite="skip"`` or a ``GradScaler``, the step is reported as skipped). Finiteness is
recorded on the device and read once per call (one host synchronisation, whatever ``m`` is).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from msam.core.batch import batch_size, resolve_micro_batches, split_batch
from msam.core.batchnorm import BatchNormPolicy, BatchNormStep
from msam.core.nonfinite import NonFiniteFlags, NonFiniteLossError
from msam.core.perturbation import PerturbationRule, make_rule
from msam.strategies import ClosureStrategy, LoopStrategy, StepContext, Strategy, make_strategy
from msam.strategies.auto import timed
from msam.strategies.base import local

__all__ = ["GradientEngine", "GradientResult", "validate_eta", "validate_rho"]


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def validate_rho(rho: Any, name: str = "rho") -> float:
    if not _finite_number(rho) or rho < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {rho!r}")
    return float(rho)


def validate_eta(eta: Any, name: str = "eta") -> float:
    if not _finite_number(eta) or eta <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {eta!r}")
    return float(eta)


def validate_count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclass
class GradientResult:
    """What one gradient computation did."""

    loss: torch.Tensor  # weighted mean loss at w over the batch (0-d, detached; NaN if skipped)
    skipped: bool = False     # True when a non-finite value made the step be skipped
    reason: str = ""
    bn: BatchNormStep | None = field(default=None, repr=False)   # uncommitted statistics
    undo_grads: Callable[[], None] | None = field(default=None, repr=False)
    rule_commit: Callable[[], None] | None = field(default=None, repr=False)
    #: (``decouples`` rules) per parameter, ``d`` to apply as ``p -= lr * d`` after the base
    #: step (unscaled; ``None`` where nothing); ``None`` for other rules.
    decoupled: list[torch.Tensor | None] | None = field(default=None, repr=False)

    def commit(self) -> None:
        """Write this computation's BatchNorm running statistics and the rule's per-step state
        (once)."""
        if self.bn is not None:
            self.bn.commit()
            self.bn = None
        if self.rule_commit is not None:
            self.rule_commit()
            self.rule_commit = None


@dataclass
class _Spec:
    loss_fn: Callable[[Any], torch.Tensor]
    micro: list[tuple[Any, float]]
    params: list[torch.Tensor]
    groups: list[Mapping[str, Any]]
    perturbed: list[int]
    loss_scale: torch.Tensor | None
    grad_weight: float
    fresh: bool
    plain: bool = False   # an off-step of a schedule: one pass over the whole batch at w
    observer: Callable[[Any, float], None] | None = None   # sees each g_j (reuse schedules)


class GradientEngine:
    """Configuration and execution of the mSAM gradient (see the module docstring)."""

    def __init__(
        self,
        *,
        micro_batches: int | None = None,
        micro_batch_size: int | None = None,
        adaptive: bool = False,
        rule: str | PerturbationRule | None = None,
        strategy: str | Strategy = "loop",
        model: nn.Module | None = None,
        nonfinite: str = "raise",
    ) -> None:
        self.micro_batches = validate_count(micro_batches, "micro_batches")
        self.micro_batch_size = validate_count(micro_batch_size, "micro_batch_size")
        if self.micro_batches is not None and self.micro_batch_size is not None:
            raise ValueError("give micro_batches or micro_batch_size, not both")
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be True or False, got {adaptive!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if rule is None:
            rule = "asam" if adaptive else "sam"
        elif adaptive and make_rule(rule).name != "asam":
            raise ValueError("adaptive=True is the 'asam' rule; give adaptive or rule, not both")
        self.rule = make_rule(rule)
        self.strategy = make_strategy(strategy)
        self.model = model
        self.nonfinite = nonfinite
        self.bn = BatchNormPolicy(model)

    @property
    def adaptive(self) -> bool:
        return self.rule.name == "asam"

    @property
    def strategy_name(self) -> str:
        return self.strategy.name

    def num_micro_batches(self, n: int) -> int:
        return resolve_micro_batches(n, self.micro_batches, self.micro_batch_size)

    def _split(self, loss_fn: Callable, batch: Any) -> tuple[Callable, list[tuple[Any, float]]]:
        if batch is None:
            if (self.micro_batches or 1) != 1 or self.micro_batch_size is not None:
                raise ValueError(
                    "batch: required when micro_batches > 1 (a loss_fn or closure without a "
                    "batch cannot be split into micro-batches; in Lightning use "
                    "msam.integrations.lightning.MSAMModule)"
                )
            return (lambda _unused: loss_fn()), [(None, 1.0)]
        n = batch_size(batch)
        return loss_fn, [(mb, n_j / n) for mb, n_j in split_batch(batch, self.num_micro_batches(n))]

    # -- the path ---------------------------------------------------------------------------
    def _path(self, strategy: Strategy, ctx: StepContext, groups: Sequence[Mapping[str, Any]],
              active: bool, observer: Callable[[Any, float], None] | None = None,
              decoupled: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """split -> g_j -> e_j -> h_j -> sum_j (n_j/n) h_j into p.grad; returns the mean L(w)."""
        flags, total = ctx.flags, torch.zeros((), dtype=torch.float64, device=ctx.params[0].device)
        rule = self.rule
        fused = active and observer is None and strategy.fused_sam
        for idx in strategy.chunks(ctx):
            out = strategy.sam_chunk(ctx, idx, rule, groups) if fused else None
            if out is not None:  # the strategy ran ascent, rule and descent itself
                losses, norms, losses_p = out
                for j, loss, norm, loss_p in zip(idx, losses, norms, losses_p):
                    flags.check(loss, "ascent", j, "loss")
                    flags.check(norm, "ascent", j, "gradient")
                    flags.check(loss_p, "perturbed", j, "loss")
            elif not active:  # rho = 0: h_j = g_j, one pass at w
                losses = strategy.descent(ctx, idx, None)
                for j, loss in zip(idx, losses):
                    flags.check(loss, "ascent", j, "loss")
            else:
                losses, offsets, kept = [], [], []
                for j, (loss, g_j) in zip(idx, strategy.ascent(ctx, idx)):
                    if observer is not None:
                        observer(g_j, ctx.micro_batches[j][1])
                    if rule.observes:
                        rule.observe(g_j, ctx.micro_batches[j][1])
                    e_j, norm = rule(g_j, ctx.pert_params, groups, owned=not rule.combines)
                    flags.check(loss, "ascent", j, "loss")
                    flags.check(norm, "ascent", j, "gradient")
                    losses.append(loss)
                    offsets.append(e_j)
                    kept.append(g_j if rule.combines else None)
                    del e_j, g_j
                # The strategy may take e_j out of ``offsets`` to free it during its pass.
                if rule.combines:
                    losses_p = self._combined_descent(strategy, ctx, idx, offsets, kept, groups,
                                                      decoupled)
                else:
                    losses_p = strategy.descent(ctx, idx, offsets)
                for j, loss_p in zip(idx, losses_p):
                    flags.check(loss_p, "perturbed", j, "loss")
                del offsets, kept
            for j, loss in zip(idx, losses):
                total = total + loss.to(total) * ctx.micro_batches[j][1]
        flags.check_grads([None if p.grad is None else local(p.grad) for p in ctx.params])
        if decoupled is not None:  # h_j reaches the weights through d too (decoupled WSAM)
            flags.check_grads(decoupled)
        return total

    def _combined_descent(self, strategy: Strategy, ctx: StepContext, idx: list[int],
                          offsets: list, kept: list, groups: Sequence[Mapping[str, Any]],
                          decoupled: list[torch.Tensor | None] | None = None
                          ) -> list[torch.Tensor]:
        """For a rule that ``combines``: ``p.grad += rule.combine(g_j, c_j)`` per micro-batch,
        with ``c_j = (n_j/n) x weight x loss scale x h_j`` from ``strategy.descent_each``; a
        rule that ``decouples`` also adds its second part into ``decoupled`` (per perturbed
        parameter, still loss-scaled)."""
        losses = []
        rule = self.rule
        # The evaluator's generator runs to its end: code after its last item (a distributed
        # strategy's all-reduce) sees every micro-batch's combination in p.grad.
        for k, (loss_p, c) in enumerate(strategy.descent_each(ctx, idx, offsets)):
            j = idx[k]
            scale: Any = ctx.micro_batches[j][1] * ctx.grad_weight
            if ctx.loss_scale is not None:
                # float64: the GradScaler scale is float32, and a float64 model must not get
                # float32-rounded weights (n_j / n, alpha ...) in its combination
                ls = ctx.loss_scale
                scale = (ls if ls.device.type == "mps" else ls.double()) * scale  # no MPS fp64
            h = [c[i] for i in ctx.perturbed]
            if decoupled is not None:
                pert, extra = rule.combine_decoupled(kept[k], h, scale, ctx.pert_params, groups)
                with torch.no_grad():
                    for n, d in enumerate(extra):
                        if d is not None:
                            acc = decoupled[n]
                            decoupled[n] = d if acc is None else acc.add_(d)
                del extra
            else:
                pert = rule.combine(kept[k], h, scale, ctx.pert_params, groups)
            del h
            kept[k] = None
            for i, ci in zip(ctx.perturbed, pert):
                c[i] = ci
            with torch.no_grad():
                for p, ci in zip(ctx.params, c):
                    if ci is not None:
                        p.grad = ci if p.grad is None else p.grad.add_(ci)
            losses.append(loss_p)
        return losses

    def _run(self, strategy: Strategy, spec: _Spec, *, commit: bool) -> GradientResult:
        params = spec.params
        groups = [spec.groups[i] for i in spec.perturbed]
        active = not spec.plain and bool(spec.perturbed) and self.rule.active(groups)
        # Nothing moves on a step without perturbation (rho = 0, a schedule's off-step): no
        # backup to take or restore, so such a step costs what a plain step does.
        perturbed = spec.perturbed if active else []
        backup = [params[i].detach().clone() for i in perturbed]
        old_grads = [p.grad for p in params]
        if spec.fresh:
            for p in params:
                p.grad = None
            snapshots = old_grads
        else:
            snapshots = [None if g is None else g.detach().clone() for g in old_grads]

        def undo_grads() -> None:
            with torch.no_grad():
                for p, g, old in zip(params, snapshots, old_grads):
                    if spec.fresh or g is None or old is None:  # old is None => g is None
                        p.grad = g
                    else:
                        old.copy_(g)
                        p.grad = old

        observes = self.rule.observes and not spec.plain
        if observes:
            self.rule.begin_step()
        try:
            with self.bn.step() as bn:
                ctx = StepContext(
                    loss_fn=spec.loss_fn, micro_batches=spec.micro, params=params,
                    perturbed=perturbed, backup=backup, bn=bn, flags=NonFiniteFlags(),
                    loss_scale=spec.loss_scale, grad_weight=spec.grad_weight, model=self.model,
                )
                decoupled: list[torch.Tensor | None] | None = (
                    [None] * len(perturbed) if active and self.rule.decouples else None)
                with strategy.session(ctx):
                    loss = self._path(strategy, ctx, groups, active, spec.observer, decoupled)
                    bad = ctx.flags.first()  # the one host sync of the step
                    if bad is not None:
                        raise NonFiniteLossError(*bad)
        except BaseException:
            with torch.no_grad():
                if perturbed:
                    torch._foreach_copy_([local(params[i]) for i in perturbed],
                                         [local(b) for b in backup])
            undo_grads()
            raise
        result = GradientResult(loss.to(params[0].dtype), bn=bn, undo_grads=undo_grads,
                                rule_commit=self.rule.end_step if observes else None,
                                decoupled=self._unscaled(decoupled, perturbed, len(params),
                                                         spec.loss_scale))
        if commit:
            result.commit()
        return result

    @staticmethod
    @torch.no_grad()
    def _unscaled(decoupled: list[torch.Tensor | None] | None, perturbed: list[int], n: int,
                  loss_scale: torch.Tensor | None) -> list[torch.Tensor | None] | None:
        """The rule's decoupled part per parameter (``None`` where nothing), loss scale
        removed."""
        if decoupled is None:
            return None
        out: list[torch.Tensor | None] = [None] * n
        for i, d in zip(perturbed, decoupled):
            if d is not None:
                out[i] = d if loss_scale is None else d.div_(loss_scale.to(d.dtype))
        return out

    def compute(
        self,
        loss_fn: Callable[..., torch.Tensor],
        batch: Any,
        params: Sequence[torch.Tensor],
        groups: Sequence[Mapping[str, Any]],
        perturb: Sequence[bool],
        *,
        scaler: Any = None,
        grad_weight: float = 1.0,
        fresh: bool = True,
        commit: bool = True,
        plain: bool = False,
        observer: Callable[[Any, float], None] | None = None,
    ) -> GradientResult:
        """Write (``fresh=True``) or add (``fresh=False``) the mSAM gradient into ``p.grad``.

        ``groups[i]`` is parameter ``i``'s param group (``rho``, ``eta``, ...), ``perturb[i]``
        whether ``e_j`` moves it. ``commit=False`` leaves the BatchNorm statistics to
        :meth:`GradientResult.commit` (the optimizer commits them after its base step).
        ``plain=True`` (a schedule's off-step, :mod:`msam.core.schedule`): the batch is not
        split and not perturbed -- one forward + backward over it at ``w`` (the loop evaluator,
        or the strategy's own when it is one, e.g. DDP's), with the same BatchNorm rule,
        non-finite checks and restore. ``observer(g_j, n_j / n)`` sees each ascent gradient.
        """
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        params = list(params)
        if not params:
            raise ValueError("params: no parameter requires grad")
        if plain and batch is not None:
            fn, micro = loss_fn, [(batch, 1.0)]
        else:
            fn, micro = self._split(loss_fn, batch)
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        loss_scale = None
        if scaler is not None:
            # The scale stays on the device (no host sync); scale() creates it lazily there.
            loss_scale = scaler.scale(torch.ones((), device=params[0].device))
        spec = _Spec(fn, micro, params, list(groups), [i for i, k in enumerate(perturb) if k],
                     loss_scale, float(grad_weight), fresh, plain, observer)
        if batch is None:
            strategy: Strategy = ClosureStrategy()
        elif plain:
            strategy = self.strategy if isinstance(self.strategy, LoopStrategy) \
                else LoopStrategy()
        else:
            strategy = self._resolve(spec)
        try:
            return self._run(strategy, spec, commit=commit)
        except NonFiniteLossError as err:
            if scaler is not None or self.nonfinite == "skip":
                return GradientResult(torch.tensor(float("nan")), skipped=True, reason=str(err))
            raise

    def _resolve(self, spec: _Spec) -> Strategy:
        preview = StepContext(
            loss_fn=spec.loss_fn, micro_batches=spec.micro, params=spec.params,
            perturbed=spec.perturbed, backup=[], bn=BatchNormStep([]), flags=NonFiniteFlags(),
            model=self.model,
        )

        def trial(candidate: Strategy) -> float:
            saved = [p.grad for p in spec.params]
            trial_spec = _Spec(**{**spec.__dict__, "fresh": True})
            try:
                return timed(lambda: self._run(candidate, trial_spec, commit=False),
                             spec.params[0].device)
            finally:
                for p, g in zip(spec.params, saved):
                    p.grad = g

        return self.strategy.resolve(preview, trial)


def normalization_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of normalization layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm).

    Pass them as ``perturb=`` to perturb only these, as in SAM-ON (Mueller et al., NeurIPS 2023);
    the remaining parameters are not perturbed but still receive the averaged gradient.
    """
    kinds = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, kinds) or type(mod).__name__.endswith(("LayerNorm", "RMSNorm")):
            for p in mod.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def trainable(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p for p in params if p.requires_grad]
