"""One optimizer step as one transaction: the mSAM gradient, then commit or rollback.

The gradient of one batch (Behdin et al. 2023, mSAM; Foret et al. 2021, SAM), as
``tests/reference.py`` writes it::

    split the batch into micro-batches j = 1..m of sizes n_j     (torch.tensor_split)
    g_j  = grad L_j(w)                   strategy.ascent
    e_j  = rule(g_j, w)                  the perturbation rule, e.g. rho g_j / (||g_j|| + 1e-12)
    h_j  = grad L_j(w + e_j)             strategy.descent adds weight * (n_j / n) h_j to p.grad
    grad = sum_j (n_j / n) h_j           -> the base optimizer

A :class:`Step` owns everything one optimizer step changes until it ends:

* ``.grad``: the value before the step is kept, and :meth:`Step.rollback` puts it back;
* the weights: moved to ``w + e_j`` only inside a pass and copied back from a backup (never by
  subtracting ``e_j``);
* the BatchNorm statistics: one record per gradient computation, written by :meth:`commit`;
* the clean gradient ``sum_j (n_j / n) g_j``, kept when the rule keeps statistics of it
  (FriendlySAM) or the schedule reuses a direction made from it (LookSAM);
* the decoupled part ``d`` of a rule such as WSAM (``w -= lr d`` after the base step);
* a non-finite value or ``GradScaler`` overflow (the step is then skipped whole).

:meth:`Step.add` computes one gradient and is atomic (a failure leaves the step as before the
call); ``MSAM`` runs ``add`` once (``step``) or once per ``accumulate`` call, then its one base
step, then :meth:`Step.commit`. Finiteness is recorded on the device and read once per ``add``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from msam.core.batch import batch_size, resolve_micro_batches, split_batch
from msam.core.batchnorm import BatchNormPolicy, BatchNormStep
from msam.core.nonfinite import NonFiniteFlags, NonFiniteLossError
from msam.core.perturbation import PerturbationRule
from msam.core.registry import make_rule
from msam.strategies import ClosureStrategy, LoopStrategy, StepContext, Strategy, make_strategy
from msam.strategies.auto import timed
from msam.strategies.base import local

__all__ = ["GradientConfig", "GradientResult", "Step", "check_decoupled_lr", "validate_count",
           "validate_eta", "validate_rho"]

Grads = list[torch.Tensor | None]


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


class GradientConfig:
    """What a gradient computation is configured with: ``m``, the rule, the strategy, the
    model, the non-finite policy and the BatchNorm policy (shared by the steps)."""

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

    def split(self, loss_fn: Callable, batch: Any, whole: bool
              ) -> tuple[Callable, list[tuple[Any, float]]]:
        """``(loss_fn, [(micro-batch j, n_j / n)])``; ``whole``: the batch as one piece."""
        if batch is None:
            if (self.micro_batches or 1) != 1 or self.micro_batch_size is not None:
                raise ValueError(
                    "batch: required when micro_batches > 1 (a loss_fn or closure without a "
                    "batch cannot be split into micro-batches; in Lightning use "
                    "msam.integrations.lightning.MSAMModule)")
            return (lambda _unused: loss_fn()), [(None, 1.0)]
        if whole:
            return loss_fn, [(batch, 1.0)]
        n = batch_size(batch)
        return loss_fn, [(mb, n_j / n) for mb, n_j in split_batch(batch, self.num_micro_batches(n))]


class Step:
    """One optimizer step (see the module docstring): ``add`` -> base step -> ``commit``.

    Args:
        cfg: the gradient configuration.
        params, groups, perturb: per parameter, its param group and whether ``e_j`` moves it.
        perturbs: ``False`` on a schedule's off-step (one plain pass over the whole batch).
        scaler: a ``GradScaler`` (``None`` or disabled: no loss scaling).
        fresh: ``True``: the step's gradient replaces ``.grad``; ``False``: it is added to it.
        keep_clean: keep ``sum (n_j / n) g_j`` (a reuse schedule needs it).
    """

    def __init__(self, cfg: GradientConfig, params: Sequence[torch.Tensor],
                 groups: Sequence[Mapping[str, Any]], perturb: Sequence[bool], *,
                 perturbs: bool = True, scaler: Any = None, fresh: bool = True,
                 keep_clean: bool = False,
                 optimizer_state: Mapping[Any, Mapping[str, Any]] | None = None) -> None:
        self.cfg, self.rule = cfg, cfg.rule
        self.params, self.groups = list(params), list(groups)
        self.perturbed = [i for i, k in enumerate(perturb) if k]
        self.perturbs = perturbs
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.fresh = fresh
        self.keep_clean = perturbs and (keep_clean or self.rule.observes)
        self.optimizer_state = optimizer_state  # (rules without an ascent pass) their source
        self.before: Grads | None = None    # .grad when the step began (rollback's target)
        self.bn: list[BatchNormStep] = []   # the statistics of each gradient computation
        self.clean: Grads | None = None     # sum_j weight (n_j / n) g_j (perturbed params)
        self.decoupled: Grads | None = None  # d per parameter, unscaled
        self.direction: Any = None          # a reuse schedule's new direction (commit)
        self.calls = 0
        self.skipped = False
        self.reason = ""

    # -- one gradient computation ------------------------------------------------------------
    def add(self, loss_fn: Callable[..., torch.Tensor], batch: Any, weight: float = 1.0,
            scaler: Any = None) -> torch.Tensor:
        """Add ``weight`` times the mSAM gradient of ``batch`` to ``.grad``; return the mean
        loss at ``w``. Atomic: if it raises (or is skipped) the step is as before the call."""
        if scaler is not None:
            self.scaler = scaler if scaler.is_enabled() else None
        params, cfg = self.params, self.cfg
        try:  # what can fail on one rank fails before any collective, or is agreed on
            if not callable(loss_fn):
                raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
            fn, micro = cfg.split(loss_fn, batch, whole=not self.perturbs)
        except Exception:
            with cfg.strategy.session(None):  # type: ignore[arg-type]
                raise
        loss_scale = None
        if self.scaler is not None:  # on the device, no host sync
            loss_scale = self.scaler.scale(torch.ones((), device=params[0].device))
        groups = [self.groups[i] for i in self.perturbed]
        active = self.perturbs and bool(self.perturbed) and self.rule.active(groups)
        perturbed = self.perturbed if active else []
        ctx = StepContext(
            loss_fn=fn, micro_batches=micro, params=params, perturbed=perturbed,
            backup=[params[i].detach().clone() for i in perturbed], bn=BatchNormStep([]),
            flags=NonFiniteFlags(), loss_scale=loss_scale, grad_weight=float(weight),
            model=cfg.model)
        strategy = self._strategy(batch, ctx)
        self.skipped, first = False, self.before is None
        saved = self._savepoint()
        clean = None if self.clean is None else list(self.clean)
        decoupled = None if self.decoupled is None else list(self.decoupled)
        try:
            with cfg.bn.step() as ctx.bn, strategy.session(ctx):
                loss = self._gradient(strategy, ctx, groups, active)
                bad = ctx.flags.first()  # the one host sync of the computation
                if bad is not None:
                    raise NonFiniteLossError(*bad)
        except BaseException as err:
            if perturbed:
                with torch.no_grad():
                    torch._foreach_copy_([local(params[i]) for i in perturbed],
                                         [local(b) for b in ctx.backup])
            if first and self.fresh:  # hand the old gradients back
                for p, g in zip(params, self.before or []):
                    p.grad = g
                self.before = None
            else:
                self._restore(saved)
            self.clean, self.decoupled = clean, decoupled
            if isinstance(err, NonFiniteLossError) and (
                    self.scaler is not None or cfg.nonfinite == "skip"):
                self.skipped, self.reason = True, str(err)
                return torch.tensor(float("nan"))
            raise
        self.bn.append(ctx.bn)
        self.calls += 1
        return loss.to(params[0].dtype)

    def _gradient(self, strategy: Strategy, ctx: StepContext,
                  groups: list[Mapping[str, Any]], active: bool) -> torch.Tensor:
        """split -> g_j -> e_j -> h_j -> sum_j (n_j / n) h_j into ``.grad``; the mean L(w)."""
        rule, flags = self.rule, ctx.flags
        total = torch.zeros((), dtype=torch.float64, device=ctx.params[0].device)
        fused = active and strategy.fused_sam
        for idx in strategy.chunks(ctx):
            out = strategy.sam_chunk(ctx, idx, rule, groups, self.keep_clean) if fused else None
            if out is not None:  # the strategy ran ascent, rule and descent itself
                losses, norms, losses_p, clean = out
                if clean is not None:   # its sum_j (n_j / n) g_j over the chunk
                    self._observe(clean, 1.0)
                flags.check_all(losses, "ascent", idx, "loss")
                flags.check_all(norms, "ascent", idx, "gradient")
            elif not active:  # rho = 0 or an off-step: h_j = g_j, one pass at w
                losses, losses_p = strategy.descent(ctx, idx, None), []
                flags.check_all(losses, "ascent", idx, "loss")
            elif not rule.ascent:  # e from the optimizer's state (Momentum-SAM): one pass
                losses, losses_p = self._one_pass(strategy, ctx, idx, groups), []
            else:
                losses, e, kept = [], [], []
                for j, (loss_j, g_j) in zip(idx, strategy.ascent(ctx, idx)):   # g_j
                    owned = self._observe(g_j, ctx.grad_weight * ctx.micro_batches[j][1])
                    e_j, norm = rule(g_j, ctx.pert_params, groups,              # e_j
                                     owned=owned and not rule.combines)
                    flags.check(loss_j, "ascent", j, "loss")
                    flags.check(norm, "ascent", j, "gradient")
                    losses.append(loss_j)
                    e.append(e_j)
                    kept.append(g_j if rule.combines else None)
                    del e_j, g_j
                if rule.combines:                                                # h_j
                    losses_p = self._combine(strategy, ctx, idx, e, kept, groups)
                else:
                    losses_p = strategy.descent(ctx, idx, e)
                del e, kept
            flags.check_all(losses_p, "perturbed", idx, "loss")
            for j, loss_j in zip(idx, losses):
                total = total + loss_j.to(total) * ctx.micro_batches[j][1]
        flags.check_grads([None if p.grad is None else local(p.grad) for p in ctx.params])
        if self.decoupled is not None:  # h_j reaches the weights through d too
            flags.check_grads(self.decoupled)
        return total

    def _one_pass(self, strategy: Strategy, ctx: StepContext, idx: list[int],
                  groups: list[Mapping[str, Any]]) -> list[torch.Tensor]:
        """A rule without an ascent pass: ``e = rule.offset(...)``, shared by the whole batch;
        one pass at ``w + e`` whose statistics are the step's (at ``w`` before any momentum)."""
        out = self.rule.offset(ctx.pert_params, groups, self.optimizer_state or {})
        if out is None:
            losses = strategy.descent(ctx, idx, None)
            ctx.flags.check_all(losses, "ascent", idx, "loss")
            return losses
        e, norm = out
        ctx.flags.check(norm, "ascent", idx[0], "gradient")
        ctx.perturbed_stats = True
        losses = strategy.descent(ctx, idx, [list(e) for _ in idx])
        ctx.flags.check_all(losses, "perturbed", idx, "loss")
        return losses

    @torch.no_grad()
    def _observe(self, g: Grads, c: float) -> bool:
        """Add ``c g_j`` to the clean gradient when the step keeps it; whether the rule may
        write ``e_j`` into ``g_j`` (it may not where the clean gradient holds ``g_j`` itself)."""
        if not self.keep_clean:
            return True
        if self.clean is None and c == 1.0:  # one micro-batch / a fused sum: keep g, no copy
            self.clean = list(g)
            return False
        if self.clean is None:
            self.clean = [None if gi is None else gi * c for gi in g]
            return True
        for i, gi in enumerate(g):
            if gi is not None:
                acc = self.clean[i]
                self.clean[i] = gi * c if acc is None else acc.add(gi, alpha=c)
        return True

    def _combine(self, strategy: Strategy, ctx: StepContext, idx: list[int], e: list,
                 kept: list, groups: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
        """(rules that combine ``g_j`` and ``h_j``: GSAM, WSAM) ``.grad += rule.combine(g_j,
        c_j)`` per micro-batch, ``c_j = (n_j / n) x weight x loss scale x h_j``; a decoupled
        rule's second part goes into ``d`` (loss scale removed)."""
        rule, losses = self.rule, []
        decouples = rule.decouples
        for k, (loss_p, c) in enumerate(strategy.descent_each(ctx, idx, e)):
            scale: Any = ctx.micro_batches[idx[k]][1] * ctx.grad_weight
            ls = ctx.loss_scale
            if ls is not None:  # float64: a float64 model keeps unrounded weights n_j / n
                scale = (ls if ls.device.type == "mps" else ls.double()) * scale
            h = [c[i] for i in ctx.perturbed]
            if decouples:
                to_grad, to_w = rule.combine_decoupled(kept[k], h, scale, ctx.pert_params,
                                                       groups)
                self._add_decoupled(to_w, ctx)
            else:
                to_grad = rule.combine(kept[k], h, scale, ctx.pert_params, groups)
            del h
            kept[k] = None
            for i, ci in zip(ctx.perturbed, to_grad):
                c[i] = ci
            with torch.no_grad():
                for p, ci in zip(ctx.params, c):
                    if ci is not None:
                        p.grad = ci if p.grad is None else p.grad.add_(ci)
            losses.append(loss_p)
        return losses

    @torch.no_grad()
    def _add_decoupled(self, part: Grads, ctx: StepContext) -> None:
        if self.decoupled is None:
            self.decoupled = [None] * len(self.params)
        d = self.decoupled
        for i, di in zip(ctx.perturbed, part):
            if di is not None:
                if ctx.loss_scale is not None:
                    di = di / ctx.loss_scale.to(di.dtype)
                d[i] = di if d[i] is None else d[i] + di  # type: ignore[operator]

    def _strategy(self, batch: Any, ctx: StepContext) -> Strategy:
        strategy = self.cfg.strategy
        if batch is None:
            return ClosureStrategy()
        if not self.perturbs:  # an off-step: the loop evaluator (or a distributed one)
            return strategy if isinstance(strategy, LoopStrategy) else LoopStrategy()

        def trial(candidate: Strategy) -> float:  # ``auto`` times each candidate once
            saved = [p.grad for p in self.params]
            probe = Step(self.cfg, self.params, self.groups,
                         [i in self.perturbed for i in range(len(self.params))])
            probe.cfg = _with_strategy(self.cfg, candidate)
            try:
                return timed(lambda: probe.add(ctx.loss_fn, batch, ctx.grad_weight),
                             self.params[0].device)
            finally:
                for p, g in zip(self.params, saved):
                    p.grad = g

        return strategy.resolve(ctx, trial)

    # -- .grad bookkeeping ---------------------------------------------------------------------
    def _savepoint(self) -> Grads:
        """``.grad`` before this call, restorable: the first call of a fresh step hands the
        old tensors over (``.grad`` starts empty); later calls copy what they add to."""
        grads = [p.grad for p in self.params]
        if self.before is None:
            self.before = grads if self.fresh else [None if g is None else g.detach().clone()
                                                    for g in grads]
            if self.fresh:
                for p in self.params:
                    p.grad = None
                return [None] * len(grads)
            return list(self.before)
        return [None if g is None else g.detach().clone() for g in grads]

    def _restore(self, grads: Grads) -> None:
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                if g is None or p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)

    # -- the two-step API (m = 1) ---------------------------------------------------------------
    @torch.no_grad()
    def move_by_grad(self, frozen_bn: bool) -> None:
        """``first_step``: move to ``w + e`` with ``e`` from the gradient in ``.grad`` (the
        caller's backward at ``w``), keeping an exact copy of ``w``; with ``frozen_bn`` the
        BatchNorm running statistics are frozen until :meth:`move_back`."""
        pert = [self.params[i] for i in self.perturbed]
        grads = [p.grad for p in pert]
        if all(g is None for g in grads):
            raise RuntimeError("first_step: no gradient in .grad; call loss.backward() first")
        if self.rule.observes:  # the rule's statistics are written when second_step commits
            self.clean = [None if g is None else g.clone() for g in grads]
        e, _ = self.rule(grads, pert, [self.groups[i] for i in self.perturbed])
        self.backup = [p.detach().clone() for p in pert]
        moved = [(p, ei) for p, ei in zip(pert, e) if ei is not None]
        torch._foreach_add_([p for p, _ in moved], [ei for _, ei in moved])
        self.frozen = contextlib.ExitStack()
        if frozen_bn:
            bn = self.frozen.enter_context(contextlib.closing(
                BatchNormStep(self.cfg.bn.modules())))
            self.frozen.enter_context(bn.pass_(record=False))

    def move_back(self) -> None:
        """``second_step``: back to ``w`` exactly; BatchNorm statistics unfrozen."""
        with torch.no_grad():
            torch._foreach_copy_([self.params[i] for i in self.perturbed], self.backup)
        self.frozen.close()

    # -- the end of the step --------------------------------------------------------------------
    def report_overflow(self, base_optimizer: Any) -> None:
        """A skipped step with a ``GradScaler``: let the scaler see the overflow so that
        ``scaler.update()`` lowers the scale (``scaler.step`` finds an inf in a temporary
        gradient and skips the base step; the real gradients are put back)."""
        params, saved = self.params, [p.grad for p in self.params]
        assert self.scaler is not None
        try:
            for p in params:
                p.grad = None
            params[0].grad = torch.full_like(params[0], float("inf"))
            self.scaler.step(base_optimizer)
        finally:
            for p, g in zip(params, saved):
                p.grad = g

    def reuse(self, schedule: Any) -> None:
        """Before the base step, a reuse schedule (LookSAM): on a perturbation step the new
        direction is made from ``.grad`` and the clean gradient (kept until :meth:`commit`); on
        an off-step ``.grad`` gets the old direction added, in place."""
        if schedule is None or schedule.reuse is None:
            return
        self.direction = schedule.prepare(self.params, self.clean, self.perturbs)

    @torch.no_grad()
    def apply_decoupled(self) -> None:
        """Right after the base step, a decoupled rule's step ``w -= lr d`` (WSAM), ``lr``
        being each group's current learning rate."""
        if self.decoupled is None:
            return
        for p, d, group in zip(self.params, self.decoupled, self.groups):
            if d is None:
                continue
            lr = group["lr"]
            if d.dtype == p.dtype and isinstance(lr, (int, float)):
                p.add_(d, alpha=-lr)
            else:
                p.sub_(d.to(p.dtype) * lr)

    def commit(self, schedule: Any = None) -> None:
        """After the base step: write the BatchNorm statistics, the rule's statistics and the
        schedule's new direction. Once."""
        for bn in self.bn:
            bn.commit()
        if self.rule.observes and self.clean is not None:
            self.rule.update(self.clean)
        if schedule is not None and schedule.reuse is not None and self.perturbs:
            schedule.set_direction(self.direction, self.params)
        self.bn, self.clean, self.decoupled, self.direction = [], None, None, None

    def drop(self) -> None:
        """The step is abandoned with its gradient (``zero_grad`` between ``accumulate``
        calls): the BatchNorm statistics of its passes are written, as plain forward passes
        write them; nothing else."""
        for bn in self.bn:
            bn.commit()
        self.bn, self.clean, self.decoupled = [], None, None

    def rollback(self) -> None:
        """Put ``.grad`` back as it was when the step began; nothing else was written."""
        if self.before is not None:
            for p, g in zip(self.params, self.before):
                p.grad = g
        self.bn, self.clean, self.decoupled = [], None, None


@dataclass
class GradientResult:
    """What the last gradient computation did (``MSAM.last_result``)."""

    loss: torch.Tensor  # mean loss at w (0-d, detached; NaN if skipped)
    skipped: bool = False
    reason: str = ""


def check_decoupled_lr(param_groups: list[dict[str, Any]], step: Step, rule: str) -> None:
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


def _with_strategy(cfg: GradientConfig, strategy: Strategy) -> GradientConfig:
    out = object.__new__(GradientConfig)
    out.__dict__.update(cfg.__dict__)
    out.strategy = strategy
    return out
