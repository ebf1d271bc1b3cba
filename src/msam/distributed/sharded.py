"""``ShardedMSAM``: SAM and mSAM for FSDP2 (``torch.distributed.fsdp.fully_shard``) models.

Every parameter is a ``DTensor`` sharded on dim 0 over the ``W`` ranks of a 1-D mesh; FSDP
all-gathers the shards for each forward / backward and reduce-scatters each backward's
gradient, so ``p.grad`` is this rank's shard of the gradient **averaged over the ranks**.
With ``micro_batches=m`` rank ``r`` splits its local batch into ``m`` micro-batches ``B_rj``
and one step is (Behdin et al. 2023, mSAM; Foret et al. 2021, SAM)::

    micro-batch j = union over ranks r of B_rj               (the same j on every rank)
    g_j  = mean_r grad L_rj(w)        ascent forward + backward, reduce-scattered: a shard
    e_j  = rho g_j / ||g_j||          ||g_j||^2 = all-reduce of the local sums of squares
                                      (one scalar); ASAM: rho T^2 g_j / ||T g_j||, T = |w|+eta
    h_j  = mean_r grad L_rj(w + e_j)  each rank adds its shard of e_j to its shard of w in
                                      place, FSDP all-gathers w + e_j; w is copied back from a
                                      one-shard backup after the pass
    grad = sum_j (1/m) h_j            accumulated into the sharded .grad by FSDP

With equal local batch sizes divisible by ``m`` this is exactly single-process mSAM with ``m``
micro-batches on the global batch, micro-batch ``j`` being the union of the ranks' ``j``-th
local micro-batches; ``m = 1`` is SAM on the global batch (one global perturbation). It is not
the per-rank ("local") mSAM of :class:`msam.distributed.DistributedMSAM`, which would need
every rank's own full-size gradient and a full-size perturbation of its own unsharded copy of
the weights (see ``docs/distributed.md``).

Per-rank memory on top of FSDP with plain gradient accumulation: the backup of ``w`` (one
shard) and ``g_j`` / ``e_j`` (one shard; ``e_j`` is written into ``g_j`` where possible and
freed before the perturbed forward); no unsharded full-size gradient is kept.

The schedule is :class:`FSDPStrategy` (the ``loop`` evaluator with backward passes that FSDP
reduce-scatters, local in-place perturbation, and an error agreement after every forward);
the math is the single-process engine's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from msam.core.nonfinite import NonFiniteLossError
from msam.core.perturbation import PerturbationRule, sum_of_squares
from msam.core.registry import check_support
from msam.distributed.optimizer import (
    DistributedStepError,
    RankView,
    RemoteNonFiniteError,
    UnsupportedWrapperError,
)
from msam.optim.distribution import Distribution
from msam.optim.msam import MSAM
from msam.optim.params import flatten_params as _flatten_params
from msam.strategies import LoopStrategy, StepContext
from msam.strategies.base import check_loss, fresh_autocast, local

__all__ = ["FSDPStrategy", "ShardedMSAM", "fsdp_modules"]

_OK, _NONFINITE, _FAILED = 0, 1, 2
def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _check_model(model: Any) -> None:
    from torch.distributed.fsdp import FSDPModule

    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        FullyShardedDataParallel = ()  # type: ignore[assignment]  # noqa: N806
    if not isinstance(model, nn.Module):
        raise UnsupportedWrapperError(
            f"model must be a module that fully_shard was applied to, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise UnsupportedWrapperError(
            "ShardedMSAM is for FSDP2 (fully_shard) models; for DistributedDataParallel use "
            "msam.distributed.DistributedMSAM")
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise UnsupportedWrapperError(
            "FullyShardedDataParallel (FSDP1) is not supported: apply "
            "torch.distributed.fsdp.fully_shard (FSDP2) to the model instead")
    if not isinstance(model, FSDPModule):
        raise UnsupportedWrapperError(
            f"model ({type(model).__name__}) is not an FSDP2 module: call "
            "torch.distributed.fsdp.fully_shard(model) (after fully_shard on its blocks) and "
            "pass the root module")
    bn = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if bn:
        raise ValueError(
            f"BatchNorm ({bn[0]!r}) is not supported by ShardedMSAM: under FSDP each rank "
            "would normalise its part of micro-batch j with its own statistics, so the step "
            "would not be mSAM on the union micro-batch. Use LayerNorm / GroupNorm / RMSNorm, "
            "or DDP with msam.distributed.DistributedMSAM (per-rank BatchNorm policy)")


def _check_param(p: torch.Tensor, name: str) -> Any:
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        raise UnsupportedWrapperError(
            f"parameter {name!r} is not sharded (a plain tensor); every trainable parameter "
            "must belong to a fully_shard'ed module (apply fully_shard to the root too)")
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise UnsupportedWrapperError(
            f"parameter {name!r} has placements {tuple(p.placements)} on a "
            f"{p.device_mesh.ndim}-D mesh; ShardedMSAM supports FSDP's Shard(0) on a 1-D mesh "
            "(HSDP / tensor parallel meshes are not supported)")
    return p.device_mesh


class FSDPStrategy(LoopStrategy):
    """The ``loop`` evaluator for FSDP2 (see the module docstring).

    * ascent: forward, agreement, ``backward()`` (FSDP reduce-scatters ``g_j`` into an emptied
      ``.grad``; the accumulated ``.grad`` is put back); ``g_j`` is handed over as local shards;
    * descent: ``e_j`` added to the local shards, forward, agreement, ``backward()`` of
      ``(n_j/n) L_j`` (FSDP accumulates into the sharded ``.grad``), ``w`` copied back;
    * session: one more agreement at the end (non-finite gradient shards); on any failure every
      FSDP module is resharded on every rank.
    """

    name = "fsdp"

    def __init__(self, opt: FSDPDistribution) -> None:
        self.opt = opt
        self._settled = False

    @contextlib.contextmanager
    def session(self, ctx: StepContext) -> Iterator[None]:
        opt = self.opt
        self._settled = False
        try:
            yield
            if opt.check_errors and not self._settled:
                # Reached when this rank's engine found its gradient shards finite (an exact
                # check); a rank whose shards are not raised and reports it below.
                self._settled = True
                self._agree(_OK, None)
        except BaseException as err:
            if opt.check_errors and not self._settled:
                self._settled = True
                flag = _NONFINITE if isinstance(err, NonFiniteLossError) else _FAILED
                self._agree(flag, f"{type(err).__name__}: {err}")
            opt._reshard()
            raise

    def _agree(self, flag: int, detail: str | None) -> list[int]:
        """All ranks exchange a flag; raise the others' failure; return the flags."""
        opt = self.opt
        table = torch.zeros(opt.world_size, dtype=torch.int32, device=opt._comm_device)
        table[opt.rank] = flag
        dist.all_reduce(table, group=opt.process_group)
        opt.comm_counts["error_check"] += 1
        values = table.tolist()
        if not any(values):
            return values
        self._settled = True
        details: list[Any] = [None] * opt.world_size
        dist.all_gather_object(details, detail if values[opt.rank] else None,
                               group=opt.process_group)
        if values[opt.rank]:
            return values  # the caller raises its own error
        others = {dist.get_global_rank(opt.process_group, r): str(details[r])
                  for r in range(opt.world_size) if values[r]}
        if all(v in (_OK, _NONFINITE) for v in values):
            raise RemoteNonFiniteError(others)
        raise DistributedStepError(others)

    def _forward(self, ctx: StepContext, j: int, phase: str) -> torch.Tensor:
        """``loss_fn`` on micro-batch ``j``, then (``check_errors``) the ranks agree before
        anyone enters the backward's reduce-scatter."""
        try:
            loss = check_loss(ctx.loss_fn(ctx.micro_batches[j][0]))
        except BaseException as err:
            if self.opt.check_errors:
                self._agree(_FAILED, f"{type(err).__name__}: {err}")
            raise
        if self.opt.check_errors:
            bad = not bool(torch.isfinite(loss.detach()).all())
            if self._agree(_NONFINITE if bad else _OK, None)[self.opt.rank]:
                raise NonFiniteLossError(phase, j, "loss")
        return loss

    def ascent(self, ctx: StepContext, idx: list[int]) -> list[tuple[torch.Tensor, Any]]:
        (j,) = idx
        stash = [p.grad for p in ctx.params]
        for p in ctx.params:
            p.grad = None
        try:
            with ctx.bn.pass_(record=True):
                fresh_autocast()
                loss = self._forward(ctx, j, "ascent")
                ctx.scaled(loss).backward()
            grads = [None if ctx.params[i].grad is None else local(ctx.params[i].grad)
                     for i in ctx.perturbed]
        finally:
            for p, g in zip(ctx.params, stash):
                p.grad = g
        return [(loss.detach(), ctx.unscaled(grads))]

    def descent(self, ctx: StepContext, idx: list[int], offsets: Any) -> list[torch.Tensor]:
        (j,) = idx
        if offsets is None:  # rho = 0: one pass at w
            with ctx.bn.pass_(record=True):
                return [self._backward(ctx, j, "ascent")]
        e_j, offsets[0] = offsets[0], []
        shards = [local(p) for p in ctx.pert_params]
        try:
            with torch.no_grad():
                moved = [(s, e) for s, e in zip(shards, e_j) if e is not None]
                torch._foreach_add_([s for s, _ in moved], [e for _, e in moved])
            del e_j, moved
            with ctx.bn.pass_(record=False):
                return [self._backward(ctx, j, "perturbed")]
        finally:
            with torch.no_grad():
                torch._foreach_copy_(shards, [local(b) for b in ctx.backup])

    def _backward(self, ctx: StepContext, j: int, phase: str) -> torch.Tensor:
        weight = ctx.micro_batches[j][1]
        fresh_autocast()
        loss = self._forward(ctx, j, phase)
        ctx.scaled(loss * (weight * ctx.grad_weight)).backward()
        return loss.detach()

    def descent_each(self, ctx: StepContext, idx: list[int], offsets: Any) -> Any:
        raise ValueError("ShardedMSAM does not support rules that combine g_j and h_j")


class ShardedMSAM(RankView, MSAM):
    """SAM / mSAM for a model sharded with FSDP2 ``fully_shard`` (see the module docstring).

    Args:
        model: the root module that ``fully_shard`` was applied to (its blocks may be sharded
            separately first, as usual); every trainable parameter a ``Shard(0)`` DTensor on
            one 1-D mesh. ``loss_fn`` must call it.
        base_optimizer: optimizer class (built over the sharded parameters with
            ``**base_kwargs``) or instance; its state is sharded like the parameters.
        rho: neighbourhood radius (per param group).
        micro_batches: ``m``, per rank and globally: micro-batch ``j`` is the union over ranks
            of each rank's ``j``-th local micro-batch. ``m = 1`` is SAM on the global batch.
        micro_batch_size: alternatively the largest local micro-batch size.
        adaptive / eta / rule: ``"sam"``, ``"asam"`` (elementwise on shards) or ``"gcsam"``
            (row-wise, and rows are never split by ``Shard(0)``); other rules are refused.
        max_grad_norm: clip the averaged gradient to this global norm over all shards (one
            scalar all-reduce) before the base step.
        check_errors: agree on an error flag after every forward (one all-reduce of
            ``world_size`` int32 values, ``2m + 1`` per step), so a failing micro-batch on one
            rank stops the step on every rank before anyone enters a reduce-scatter.
        params: parameters or param groups (default: every trainable parameter of ``model``).
        nonfinite: as in :class:`msam.MSAM`.
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: type[Optimizer] | Optimizer | Callable[..., Optimizer],
        rho: float = 0.05,
        *,
        params: Iterable[Any] | None = None,
        micro_batches: int | None = None,
        micro_batch_size: int | None = None,
        check_errors: bool = True,
        strategy: str = "loop",
        **kwargs: Any,
    ) -> None:
        if not isinstance(check_errors, bool):
            raise ValueError(f"check_errors must be True or False, got {check_errors!r}")
        if strategy != "loop":
            raise ValueError(
                f"strategy: ShardedMSAM supports 'loop' only, got {strategy!r} ('vmap' calls "
                "the module functionally and would bypass FSDP's all-gather / reduce-scatter)")
        for key, why in (("model", "pass the FSDP model as the first argument"),
                         ("perturb", "a perturbed subset is not supported with sharding")):
            if key in kwargs:
                raise ValueError(f"{key}: {why}")
        _check_model(model)
        names = {id(p): n for n, p in model.named_parameters()}
        if params is None and not isinstance(base_optimizer, Optimizer):
            params = [p for p in model.parameters() if p.requires_grad]
        meshes = []
        given = _flatten_params(params) if params is not None else [
            p for g in base_optimizer.param_groups for p in g["params"]]  # type: ignore[union-attr]
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        if {id(p) for p in given if p.requires_grad} != trainable:
            raise ValueError(
                "params: must be exactly the trainable parameters of the model (every backward "
                "fills all of them through FSDP's reduce-scatter)")
        for p in given:
            meshes.append(_check_param(p, names.get(id(p), "?")))
        if len({id(m) for m in meshes}) != 1 and len({str(m) for m in meshes}) != 1:
            raise UnsupportedWrapperError("all parameters must be sharded on one device mesh")
        distribution = FSDPDistribution(model, meshes[0].get_group(), check_errors)
        super().__init__(params, base_optimizer, rho, micro_batches=micro_batches,
                         micro_batch_size=micro_batch_size, strategy="loop", model=model,
                         distribution=distribution, **kwargs)
        self.module = model
        self.check_errors = check_errors

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip ``.grad`` to the global norm ``max_norm`` over all shards (see
        :meth:`FSDPDistribution.clip_grad_norm_`). Returns the norm."""
        return self.distribution.clip_grad_norm_(self, self._params(), max_norm)

    def settings(self) -> dict[str, Any]:
        """The mSAM settings and counters (``state_dict()["msam"]`` without the base state)."""
        return dict(MSAM.state_dict(self)["msam"])

    def load_settings(self, settings: dict[str, Any]) -> None:
        """Restore what :meth:`settings` returned (checked as ``load_state_dict`` checks it)."""
        from msam.optim.state import validated_settings as _validated_settings

        s = _validated_settings(settings)
        if s["rule"].get("name") != self.rule.name:
            raise ValueError(f"settings: saved with rule {s['rule'].get('name')!r}, this "
                             f"optimizer uses {self.rule.name!r}")
        self.engine.micro_batches = s["micro_batches"]
        self.engine.micro_batch_size = s["micro_batch_size"]
        self.engine.nonfinite = s["nonfinite"]
        self.max_grad_norm = s["max_grad_norm"]
        self.steps, self.skipped_steps = s["steps"], s["skipped_steps"]
        self.zero_grad()

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", world_size={self.world_size})"


class FSDPDistribution(Distribution):
    """FSDP2's part of a step (:mod:`msam.optim.distribution`): the :class:`FSDPStrategy`
    evaluator, the rule on local shards with one all-reduce of the norm, clipping over the
    shards, and the refusals (closures, ``GradScaler``, the two-step API)."""

    name = "fsdp"

    def __init__(self, module: nn.Module, process_group: Any, check_errors: bool) -> None:
        self.module, self.process_group, self.check_errors = module, process_group, check_errors
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        backend = dist.get_backend(process_group)
        self._comm_device = (torch.device("cuda", torch.cuda.current_device())
                             if backend == "nccl" else torch.device("cpu"))
        #: Collectives made by the optimizer itself (FSDP's all-gathers / reduce-scatters not
        #: counted).
        self.comm_counts = {"norm_allreduce": 0, "error_check": 0, "clip_allreduce": 0}
        self.strategy = FSDPStrategy(self)

    def evaluator(self, strategy: Any) -> Any:
        return self.strategy

    def perturbation_rule(self, rule: Any) -> Any:
        if isinstance(rule, _ShardedRule):
            return rule
        check_support(rule, where="fsdp")
        return _ShardedRule(rule, self)

    def state_name(self, strategy: Any) -> dict[str, Any]:
        return {"name": "loop"}

    def check_two_step(self) -> None:
        raise ValueError("ShardedMSAM: the two-step API is not scheduled for FSDP; use "
                         "step(loss_fn, batch)")

    def check_call(self, loss_fn: Any, batch: Any, closure: Any, scaler: Any,
                   accumulate: bool) -> None:
        if scaler is not None:
            raise ValueError("scaler: GradScaler is not supported by ShardedMSAM; use bf16 "
                             "mixed precision (MixedPrecisionPolicy(param_dtype=torch.bfloat16))")
        if accumulate and batch is None:
            raise ValueError("ShardedMSAM.accumulate: needs loss_fn and batch")
        if not accumulate and (closure is not None or (loss_fn is not None and batch is None)):
            raise ValueError("ShardedMSAM.step: needs loss_fn and batch (a closure cannot be "
                             "scheduled around FSDP's collectives)")

    def begin_step(self, params: list[torch.Tensor]) -> None:
        # Drop the previous step's gradient shards now, as zero_grad() does before a plain
        # FSDP step, instead of keeping them for the step's .grad restore (one shard). A
        # failed step therefore leaves .grad None; weights and optimizer state are restored.
        for p in params:
            p.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, opt: Any, params: list[torch.Tensor], max_norm: float
                        ) -> torch.Tensor:
        """Clip ``.grad`` to the global norm ``max_norm`` over all shards, as
        ``torch.nn.utils.clip_grad_norm_`` does on unsharded gradients (coefficient
        ``min(1, max_norm / (norm + 1e-6))``); one scalar all-reduce. Returns the norm."""
        grads = [local(p.grad) for p in params if p.grad is not None]
        sq = sum_of_squares(grads) if grads else torch.zeros((), dtype=torch.float64)
        total = self._all_reduce_sum(sq, "clip_allreduce").sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(device=g.device, dtype=g.dtype))
        return total

    def _all_reduce_sum(self, value: torch.Tensor, what: str) -> torch.Tensor:
        out = value.to(self._comm_device).clone()
        dist.all_reduce(out, group=self.process_group)
        self.comm_counts[what] += 1
        return out.to(value.device)

    def _reshard(self) -> None:
        """Every FSDP module back to sharded (a forward without its backward leaves the
        root's parameters unsharded; the next forward must all-gather the restored shards)."""
        for m in fsdp_modules(self.module):
            m.reshard()  # type: ignore[operator]


class _ShardedRule(PerturbationRule):
    """A SAM / ASAM rule evaluated on local shards with the norm all-reduced once."""

    def __init__(self, inner: PerturbationRule, opt: FSDPDistribution) -> None:
        self.inner, self.opt = inner, opt
        self.name = inner.name

    def __call__(self, grads, params, groups, *, owned=False, reduce_sq=None):
        shards = [local(p) for p in params]
        # The ascent hands over its shards of g_j, views into FSDP's reduce-scatter output
        # that nothing else references: e_j is written into them (no second shard).
        return self.inner(grads, shards, groups, owned=owned, exclusive=owned,
                          reduce_sq=lambda sq: self.opt._all_reduce_sum(sq, "norm_allreduce"))

    def validate_group(self, group, where):
        self.inner.validate_group(group, where)

    def active(self, groups):
        return self.inner.active(groups)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)
