"""``DistributedMSAM``: mSAM under ``torch.nn.parallel.DistributedDataParallel`` (DDP).

Local mode (``mode="local"``, the default) -- what mSAM is for::

    rank r, micro-batch j:   g_rj = grad L_rj(w)                 (no communication)
                             e_rj = rho * g_rj / (||g_rj|| + 1e-12)
                             h_rj = grad L_rj(w + e_rj)
    p.grad (every rank)    = mean_r sum_j (n_rj / n_r) * h_rj       (one DDP all-reduce)

Every rank perturbs with its own micro-batches; the ascent pass (forward *and* backward) runs
under ``ddp.no_sync()``, the perturbed passes of micro-batches ``0 .. m-2`` too, and only the
last perturbed backward lets DDP all-reduce, so the averaged gradient costs one all-reduce per
step (SAM with a synchronised perturbation costs two). With ``W`` ranks and ``micro_batches=m``
the step averages ``W * m`` perturbations: it equals single-process mSAM with ``W * m``
micro-batches on the concatenation of the ranks' batches when every rank holds the same number
of examples (rank ``r`` holding the ``r``-th contiguous shard).

Synchronized mode (``mode="synchronized"``, for comparison): the ascent gradient is averaged
over the ranks before the perturbation is computed, so every rank uses the global perturbation
-- single-process SAM (``m = 1``) on the global batch. Local ``m`` must be 1.

Fault safety (``check_errors=True``, the default): before each collective the ranks agree on an
error flag (one all-reduce of ``world_size`` int32 values, plus the messages when something
failed), so an exception or a non-finite value on one rank makes every rank stop the step the
same way -- the failing rank raises its own error, the others :class:`DistributedStepError`
(or, for non-finite values, :class:`RemoteNonFiniteError`, which ``nonfinite="skip"`` and a
``GradScaler`` turn into a skipped step on every rank) -- instead of leaving them waiting in
DDP's all-reduce. Parameters, gradients and BatchNorm buffers are restored as in
single-process mSAM.

Design: the scheduling above is the :class:`DDPStrategy` evaluator (ascent under ``no_sync``,
the all-reduce on the last perturbed backward, the agreement in :meth:`DDPStrategy.session`);
the math is the single-process engine's. A step costs two host synchronisations: the
agreement before DDP's all-reduce and the engine's one finiteness read.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from msam.core.nonfinite import NonFiniteFlags, NonFiniteLossError
from msam.core.registry import check_support
from msam.optim.distribution import Distribution
from msam.optim.msam import MSAM
from msam.optim.params import flatten_params as _flatten_params
from msam.strategies import LoopStrategy, StepContext, Strategy
from msam.strategies.base import check_loss

__all__ = [
    "MODES",
    "DDPStrategy",
    "DistributedMSAM",
    "DistributedStepError",
    "RemoteNonFiniteError",
    "UnsupportedWrapperError",
    "ddp_kwargs",
    "unwrap_model",
]

MODES = ("local", "synchronized")

_OK, _NONFINITE, _FAILED = 0, 1, 2


class UnsupportedWrapperError(TypeError):
    """The model is wrapped in something other than ``DistributedDataParallel``."""


class DistributedStepError(RuntimeError):
    """Another rank failed during this step; ``failures`` maps its rank to its message."""

    def __init__(self, failures: dict[int, str]) -> None:
        self.failures = dict(failures)
        what = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(self.failures.items()))
        super().__init__(
            f"step stopped on every rank because another rank failed ({what}); parameters, "
            "gradients and BatchNorm buffers were left as before the step"
        )


class RemoteNonFiniteError(NonFiniteLossError):
    """Another rank met a non-finite loss or gradient; this rank stops the step too."""

    def __init__(self, failures: dict[int, str]) -> None:
        self.phase, self.micro_batch, self.what = "remote", -1, "value"
        self.failures = dict(failures)
        what = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(self.failures.items()))
        FloatingPointError.__init__(
            self, f"non-finite value on another rank ({what}); the step is stopped on every rank "
            "and parameters, BatchNorm buffers and optimizer state were left as before the step"
        )


_SUPPORTED = (
    "msam.distributed supports torch.nn.parallel.DistributedDataParallel (one process per "
    "device, any backend) and, with no process group or a world size of 1, an unwrapped module"
)


def _fsdp_classes() -> tuple[type, ...]:
    classes: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        classes.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - torch without FSDP
        pass
    try:
        from torch.distributed.fsdp import FSDPModule
        classes.append(FSDPModule)
    except ImportError:  # pragma: no cover - torch before FSDP2
        pass
    return tuple(classes)


def _check_inner(module: nn.Module) -> None:
    fsdp = _fsdp_classes()
    for name, sub in module.named_modules():
        if fsdp and isinstance(sub, fsdp):
            where = f" (submodule {name!r})" if name else ""
            raise UnsupportedWrapperError(
                f"FSDP is not supported by DistributedMSAM{where}: its local mode perturbs each "
                "rank's weights with that rank's own full gradient, which sharded parameters "
                "and reduce-scattered gradients do not provide. For FSDP2 (fully_shard) models "
                "use msam.distributed.ShardedMSAM(model, base_optimizer, rho=..., "
                f"micro_batches=m) (global micro-batches, sharded perturbation). {_SUPPORTED}."
            )
        if isinstance(sub, (nn.DataParallel, nn.parallel.DistributedDataParallel)) and name:
            raise UnsupportedWrapperError(
                f"nested {type(sub).__name__} in submodule {name!r}: wrap the whole model in "
                f"DistributedDataParallel once. {_SUPPORTED}."
            )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the model itself otherwise)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _resolve(model: Any) -> tuple[nn.parallel.DistributedDataParallel | None, nn.Module]:
    if not isinstance(model, nn.Module):
        raise UnsupportedWrapperError(
            f"model must be a DistributedDataParallel module, got {type(model).__name__}. "
            f"{_SUPPORTED}."
        )
    if isinstance(model, nn.DataParallel):
        raise UnsupportedWrapperError(
            f"torch.nn.DataParallel is not supported (single-process multi-device). {_SUPPORTED}."
        )
    if isinstance(model, nn.parallel.DistributedDataParallel):
        _check_inner(model.module)
        if getattr(model, "static_graph", False):
            raise UnsupportedWrapperError(
                "DistributedDataParallel(static_graph=True) is not supported: mSAM's ascent "
                "pass takes a gradient with torch.autograd.grad under no_sync(), which the "
                "static-graph reducer does not allow; build DDP without static_graph"
            )
        return model, model.module
    _check_inner(model)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise UnsupportedWrapperError(
            f"model is a plain {type(model).__name__} but the process group has "
            f"{dist.get_world_size()} ranks: wrap it in DistributedDataParallel (see "
            f"msam.distributed.ddp_kwargs()). {_SUPPORTED}."
        )
    return None, model


def ddp_kwargs() -> dict[str, Any]:
    """Keyword arguments for ``DistributedDataParallel`` that ``DistributedMSAM`` needs.

    They switch off DDP's buffer broadcast on every forward (per-rank BatchNorm statistics; see
    ``docs/distributed.md``): ``forward_sync_buffers=False`` where this torch has it (buffers
    are still broadcast once, when DDP is built), ``broadcast_buffers=False`` otherwise.
    """
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _forward_syncs_buffers(ddp: nn.parallel.DistributedDataParallel) -> bool:
    value = getattr(ddp, "forward_sync_buffers", None)
    if value is None:
        value = getattr(ddp, "broadcast_buffers", True)
    return bool(value)


class DDPStrategy(LoopStrategy):
    """The ``loop`` evaluator scheduled for DDP (see the module docstring).

    * ascent: under ``ddp.no_sync()``; in ``"synchronized"`` mode the ascent gradient is then
      replaced by its mean over the ranks (after an error agreement);
    * descent: under ``no_sync`` except the call's last micro-batch when the call synchronises,
      whose backward lets DDP all-reduce; the agreement runs between its forward and backward;
    * descent_each (rules that combine ``g_j`` and ``h_j``: GSAM, WSAM): every pass under
      ``no_sync`` and no agreement inside, so each rank checks its own combination first; the
      optimizer averages ``p.grad`` (and a decoupled rule's ``d``) with one all-reduce before
      the base step;
    * session: a call without a synchronised pass agrees at its end; a failure before the
      agreement is reported to the others there.
    """

    name = "ddp"

    def __init__(self, opt: DDPDistribution) -> None:
        self.opt = opt
        self.sync = True            # does this call's last perturbed backward all-reduce?
        self.unsynced = False       # this call left p.grad local (a combining rule's path)
        self._combining = False     # inside descent_each: every pass local, no agreement
        self._settled = False       # this call's last agreement has happened
        self._ctx: StepContext | None = None

    @contextlib.contextmanager
    def session(self, ctx: StepContext) -> Iterator[None]:
        opt = self.opt
        self._settled, self._ctx = False, ctx
        try:
            yield
            if opt.check_errors and not self._settled:
                self._agree_now(ctx)
        except BaseException as err:
            if opt.check_errors and not self._settled:
                flag = _NONFINITE if isinstance(err, NonFiniteLossError) else _FAILED
                opt._agree(flag, f"{type(err).__name__}: {err}")
                self._settled = True
            elif not opt.check_errors and opt.ddp is not None:
                # Without the agreement the other ranks did not stop: their collectives now
                # pair with different calls of this rank. Refuse to go on (see check_errors).
                opt.broken = f"{type(err).__name__}: {err}"
            raise
        finally:
            self._ctx = None

    def _agree_now(self, ctx: StepContext, final: bool = True) -> None:
        """Agree on this rank's state so far (local non-finite values included). An agreement
        that finds a failure is the call's last: every rank stops there."""
        bad = ctx.flags.any_on_device(self.opt._comm_device)
        try:
            self.opt._agree(bad.to(torch.int32) * _NONFINITE, None, flags=ctx.flags)
        except BaseException:
            self._settled = True
            raise
        self._settled = self._settled or final

    def ascent(self, ctx: StepContext, idx: list[int]) -> list[tuple[torch.Tensor, Any]]:
        assert self.opt.ddp is not None
        with self.opt.ddp.no_sync():
            out = super().ascent(ctx, idx)
        if self.opt.mode == "synchronized":
            if self.opt.check_errors:
                self._agree_now(ctx, final=False)
            (loss, grads), = out
            out = [(loss, self.opt._all_reduce_mean(grads, ctx.pert_params))]
        return out

    def descent(self, ctx: StepContext, idx: list[int], offsets: Any) -> list[torch.Tensor]:
        ddp = self.opt.ddp
        assert ddp is not None
        last = idx[-1] == len(ctx.micro_batches) - 1
        if self._combining or not (last and self.sync):
            with ddp.no_sync():
                return super().descent(ctx, idx, offsets)
        return super().descent(dataclasses.replace(ctx, loss_fn=self._guard(ctx)), idx, offsets)

    def descent_each(self, ctx: StepContext, idx: list[int], offsets: Any) -> Any:
        """A rule that combines ``g_j`` and ``h_j`` (GSAM, WSAM): every perturbed pass under
        ``no_sync``, so ``p.grad`` holds this rank's combination; the optimizer averages it
        over the ranks before the base step (one all-reduce per dtype, which also carries a
        decoupled rule's ``d``)."""
        assert self.opt.ddp is not None
        self.unsynced = True
        # No pass synchronises, so none agrees either: the ranks agree at the end of the call
        # (the session), after every rank has checked its combined gradient for non-finite
        # values, and only then may anyone enter the all-reduce.
        self._combining = True
        try:
            with self.opt.ddp.no_sync():
                yield from super().descent_each(ctx, idx, offsets)
        finally:
            self._combining = False

    def _guard(self, ctx: StepContext) -> Callable[[Any], torch.Tensor]:
        """``loss_fn`` of the synchronised pass: it must call the DDP model, and the ranks
        agree after its forward, before anyone enters DDP's all-reduce."""
        opt, loss_fn = self.opt, ctx.loss_fn

        def guarded(mb: Any) -> torch.Tensor:
            before = opt._ddp_forwards
            loss = check_loss(loss_fn(mb))
            if opt._ddp_forwards == before:
                raise RuntimeError(
                    "loss_fn did not call the DistributedDataParallel model, so DDP would not "
                    "average the gradients: call the DDP wrapper (not its .module) in loss_fn"
                )
            if opt.check_errors:
                ctx.flags.check(loss, "perturbed", len(ctx.micro_batches) - 1, "loss")
                self._agree_now(ctx)
            return loss

        return guarded


class DDPDistribution(Distribution):
    """DDP's part of a step (:mod:`msam.optim.distribution`): the :class:`DDPStrategy`
    evaluator, the error agreement, the all-reduce of a gradient left local, and the checks
    that every rank runs the same settings."""

    name = "ddp"

    def __init__(self, ddp: nn.parallel.DistributedDataParallel | None, module: nn.Module,
                 mode: str, check_errors: bool) -> None:
        self.ddp, self.module, self.mode, self.check_errors = ddp, module, mode, check_errors
        if ddp is not None:
            self.process_group = ddp.process_group
            self.world_size = dist.get_world_size(self.process_group)
            self.rank = dist.get_rank(self.process_group)
            backend = dist.get_backend(self.process_group)
            self._comm_device = (
                torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                else torch.device("cpu")
            )
        else:
            self.process_group = None
            self.world_size, self.rank = 1, 0
            self._comm_device = torch.device("cpu")
        self._needs_sync = False
        #: With check_errors=False: why this rank's collectives are out of step (or None).
        self.broken: str | None = None
        #: Collective calls made by this optimizer itself (DDP's bucket all-reduces not counted).
        self.comm_counts = {"ascent_allreduce": 0, "error_check": 0, "grad_sync": 0}
        self._ddp_forwards = 0
        self.strategy = DDPStrategy(self)
        if ddp is not None:
            ddp.register_forward_pre_hook(self._count_forward)

    def evaluator(self, strategy: Any) -> Any:
        return strategy if self.ddp is None else self.strategy

    def state_name(self, strategy: Any) -> dict[str, Any]:
        return {"name": "loop"}  # the DDP evaluator is rebuilt, not loaded

    def check_two_step(self) -> None:
        if self.ddp is not None:
            raise ValueError("DistributedMSAM: the two-step API is not scheduled for DDP; use "
                             "step(loss_fn, batch)")

    def check_call(self, loss_fn: Any, batch: Any, closure: Any, scaler: Any,
                   accumulate: bool) -> None:
        if self.broken is not None:
            raise RuntimeError(
                f"DistributedMSAM: an earlier step failed on this rank ({self.broken}) with "
                "check_errors=False, so the ranks' collectives are out of step; restart the "
                "job from a checkpoint (check_errors=True stops every rank cleanly instead)")
        if self.ddp is None or accumulate:
            return
        if closure is not None or (loss_fn is not None and batch is None):
            raise ValueError("DistributedMSAM.step: needs loss_fn and batch (a closure "
                             "cannot be scheduled around DDP's all-reduce)")
        if loss_fn is not None and not self.ddp.require_backward_grad_sync:
            raise RuntimeError(
                "step(loss_fn, batch) inside ddp.no_sync() would update the weights with an "
                "unsynchronised gradient; accumulate under no_sync with accumulate(...) (or "
                "accumulate(..., sync=False)) and finish with step()"
            )
        self.strategy.sync = True
        if loss_fn is not None:
            self.strategy.unsynced = False

    def begin_step(self, params: list[torch.Tensor]) -> None:
        self._needs_sync = False

    def check_schedule(self, schedule: Any) -> None:
        if schedule.reuse is not None and self.world_size > 1:
            # The reuse direction would be made from each rank's own clean gradient.
            raise ValueError(
                f"reuse: {schedule.reuse!r} is not supported by DistributedMSAM with "
                f"world_size={self.world_size} (each rank's reuse direction would differ); use "
                "every/start_step without reuse")

    def check_settings(self, opt: Any) -> None:
        """Every rank must run the same m, rule, rho, strategy, mode and schedule: one
        all-gather of them; a difference is a ``ValueError`` on every rank, naming it."""
        if self.ddp is None or self.world_size == 1:
            return
        mine = settings_fingerprint(opt, mode=self.mode, check_errors=self.check_errors)
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self.process_group)
        for key in mine:
            values = [r.get(key) if isinstance(r, dict) else None for r in every]
            if any(v != values[0] for v in values[1:]):
                per_rank = ", ".join(f"rank {_global_rank(self.process_group, r)}: {v!r}"
                                     for r, v in enumerate(values))
                raise ValueError(
                    f"DistributedMSAM: {key} differs between the ranks ({per_rank}); every rank "
                    "must build the optimizer with the same settings")

    def accumulated(self, sync: bool) -> None:
        """An accumulate() call succeeded: a synchronised call leaves every accumulated
        gradient averaged over the ranks; an unsynchronised one, or a combining rule's, leaves
        them all local."""
        self._needs_sync = not sync or self.strategy.unsynced

    def before_base_step(self, opt: Any, step: Any) -> None:
        # A gradient left local (unsynchronised accumulation, a combining rule) is averaged
        # over the ranks once, right before the base step.
        if self.ddp is not None and (self._needs_sync or self.strategy.unsynced):
            self._sync_grads(step)
            self.strategy.unsynced = False

    def _count_forward(self, module: nn.Module, args: Any) -> None:
        self._ddp_forwards += 1

    # -- communication ---------------------------------------------------------------------------
    def _agree(self, flag: int | torch.Tensor, detail: str | None,
               flags: NonFiniteFlags | None = None) -> None:
        """All ranks exchange an error flag; raise if any rank reported a problem.

        ``flag`` may be a device tensor (this rank's non-finite flag, read with the others in
        the same host sync); then ``flags`` names this rank's own failure if it has one.
        """
        table = torch.zeros(self.world_size, dtype=torch.int32, device=self._comm_device)
        table[self.rank] = flag
        dist.all_reduce(table, group=self.process_group)
        self.comm_counts["error_check"] += 1
        values = table.tolist()  # the agreement's host sync
        if not any(values):
            return
        self._reset_reducer()
        mine = values[self.rank]
        if detail is None and mine:
            bad = flags.first() if flags is not None else None
            own = NonFiniteLossError(*bad) if bad is not None else NonFiniteLossError(
                "perturbed", -1, "value")
            detail = f"{type(own).__name__}: {own}"
        details: list[Any] = [None] * self.world_size
        dist.all_gather_object(details, detail if mine else None, group=self.process_group)
        if mine:
            if isinstance(flag, torch.Tensor):
                raise own
            return  # the caller raises its own error
        others = {
            _global_rank(self.process_group, r): str(details[r])
            for r in range(self.world_size) if values[r]
        }
        if all(f in (_OK, _NONFINITE) for f in values):
            raise RemoteNonFiniteError(others)
        raise DistributedStepError(others)

    def _reset_reducer(self) -> None:
        """Put DDP back in its between-steps state, identically on every rank.

        A rank that ran its synchronised forward before learning that another rank failed has
        a reducer armed for a backward that will not come; its next backward (even under
        ``no_sync``) would all-reduce alone. Every rank therefore resets its reducer (DDP's
        ``Reducer._reset_state``, as ``DistributedDataParallel._update_process_group`` does;
        buckets are rebuilt after the next synchronised backward, on every rank alike) and sets
        ``require_forward_param_sync`` as a finished step leaves it.
        """
        assert self.ddp is not None
        reset = getattr(self.ddp.reducer, "_reset_state", None)
        if reset is None:  # pragma: no cover - torch without Reducer._reset_state
            raise RuntimeError(
                "this torch's DDP reducer cannot be reset after a failed step; rebuild the "
                "DistributedDataParallel wrapper (and the optimizer) before continuing"
            )
        reset()
        self.ddp._has_rebuilt_buckets = False
        self.ddp.require_forward_param_sync = True

    def _all_reduce_mean(self, grads: list, params: list[torch.Tensor]) -> list:
        """Synchronized mode: this rank's ascent gradient replaced by the mean over the ranks."""
        full = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        out = list(full)
        for idx in _groups(full):
            flat = torch.cat([full[i].reshape(-1) for i in idx])
            dist.all_reduce(flat, group=self.process_group)
            self.comm_counts["ascent_allreduce"] += 1
            flat.div_(self.world_size)
            offset = 0
            for i in idx:
                n = full[i].numel()
                out[i] = flat[offset:offset + n].view_as(full[i])
                offset += n
        return out

    @torch.no_grad()
    def _sync_grads(self, step: Any) -> None:
        """All-reduce (average) ``p.grad`` that DDP has not synchronised yet, and a decoupled
        rule's ``d`` with it (WSAM); one call per dtype."""
        params = step.params
        decoupled = step.decoupled if step.decoupled is not None else []
        # Slots: every p.grad, then every d; a missing one travels as zeros.
        local = [p.grad for p in params] + list(decoupled)
        shapes = params + params[:len(decoupled)]
        present = torch.tensor([t is not None for t in local], dtype=torch.float64,
                               device=self._comm_device)
        full = [torch.zeros_like(p) if t is None else t for t, p in zip(local, shapes)]
        groups = _groups(full)
        flats = [torch.cat([full[i].reshape(-1) for i in idx]) for idx in groups]
        # The presence mask rides along with the first group (one all-reduce per dtype/device).
        flats[0] = torch.cat([flats[0], present.to(flats[0])])
        for flat in flats:
            dist.all_reduce(flat, group=self.process_group)
            self.comm_counts["grad_sync"] += 1
            flat.div_(self.world_size)
        present_any = flats[0][-len(local):] > 0
        flats[0] = flats[0][:-len(local)]
        synced: list[torch.Tensor | None] = [None] * len(local)
        for idx, flat in zip(groups, flats):
            offset = 0
            for i in idx:
                n = full[i].numel()
                if bool(present_any[i]):
                    synced[i] = flat[offset:offset + n].view_as(full[i])
                offset += n
        for p, g in zip(params, synced):
            if g is not None:
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
        if step.decoupled is not None:
            step.decoupled = [None if d is None else d.clone() for d in synced[len(params):]]
        self._needs_sync = False


class RankView:
    """The process-group facts of a distributed optimizer, read from its distribution."""

    distribution: Any

    @property
    def world_size(self) -> int:
        return self.distribution.world_size  # type: ignore[no-any-return]

    @property
    def rank(self) -> int:
        return self.distribution.rank  # type: ignore[no-any-return]

    @property
    def process_group(self) -> Any:
        return self.distribution.process_group

    @property
    def comm_counts(self) -> dict[str, int]:
        """Collectives made by the optimizer itself (the wrapper's own not counted)."""
        return self.distribution.comm_counts  # type: ignore[no-any-return]


class DistributedMSAM(RankView, MSAM):
    """mSAM (or SAM) for a model wrapped in ``DistributedDataParallel``.

    Args:
        model: the ``DistributedDataParallel`` module that ``loss_fn`` calls. Without a process
            group (or with a world size of 1) a plain module is accepted and the optimizer is
            plain :class:`msam.MSAM`. FSDP, ``DataParallel`` and nested wrappers are rejected
            with :class:`UnsupportedWrapperError`.
        params: parameters or param groups, all of them parameters of ``model``; ``None`` means
            every parameter of ``model`` (or the groups of an already-built ``base_optimizer``).
        base_optimizer: optimizer class (built with ``**base_kwargs``) or instance.
        rho: neighbourhood radius.
        mode: ``"local"`` (default): each rank perturbs with its own micro-batches, one gradient
            all-reduce per step. ``"synchronized"``: the ascent gradient is all-reduced too
            (global perturbation; SAM on the global batch); needs local ``m = 1``.
        micro_batches: number ``m`` of micro-batches **per rank** per batch. A step averages
            ``world_size * m`` perturbations (:attr:`global_micro_batches`).
        micro_batch_size: alternatively the largest micro-batch size, per rank.
        check_errors: agree on an error flag before each collective (default ``True``; costs
            one tiny all-reduce per call, plus one before the ascent all-reduce in synchronized
            mode). With ``False`` the ranks do not agree: when a step raises (or is skipped)
            on one rank, the other ranks do not know it and go on into their collectives,
            which then pair with *different* calls of the failed rank (they may wait until
            the process group's timeout, or average mismatched gradients). The failed rank
            therefore refuses every later step with a ``RuntimeError``: restart the job from
            a checkpoint. Use ``False`` only where any failure ends the job anyway.
        **kwargs: everything else :class:`msam.MSAM` takes (``adaptive``, ``eta``, ``rule``,
            ``perturb``, ``max_grad_norm``, ``nonfinite``) and the base optimizer's keyword
            arguments. The evaluator is :class:`DDPStrategy` (``vmap`` would bypass DDP).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Any] | None,
        base_optimizer: type[Optimizer] | Optimizer | Callable[..., Optimizer],
        rho: float = 0.05,
        *,
        mode: str = "local",
        micro_batches: int | None = None,
        micro_batch_size: int | None = None,
        check_errors: bool = True,
        strategy: str | Strategy = "loop",
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(check_errors, bool):
            raise ValueError(f"check_errors must be True or False, got {check_errors!r}")
        if not (strategy == "loop" or isinstance(strategy, LoopStrategy)):
            raise ValueError(
                f"strategy: DistributedMSAM supports 'loop' only, got {strategy!r} ('vmap' calls "
                "the module functionally and would bypass DDP's gradient synchronisation)"
            )
        if "model" in kwargs:
            raise ValueError("model: pass the DDP model as the first argument instead")
        if mode == "synchronized" and (
            micro_batch_size is not None or (micro_batches is not None and micro_batches != 1)
        ):
            raise ValueError(
                "mode='synchronized' uses one perturbation per step for the whole global batch: "
                f"local micro_batches must be 1 (got micro_batches={micro_batches!r}, "
                f"micro_batch_size={micro_batch_size!r}); use mode='local' for mSAM"
            )
        ddp, module = _resolve(model)
        _check_batchnorm(ddp, module)
        if params is None and not isinstance(base_optimizer, Optimizer):
            params = module.parameters()
        if params is not None:
            params = list(params) if not isinstance(params, torch.Tensor) else [params]
            owned = {id(p) for p in module.parameters()}
            foreign = [p for p in _flatten_params(params) if id(p) not in owned]
            if foreign:
                raise ValueError(
                    f"params: {len(foreign)} parameter(s) do not belong to the model; DDP only "
                    "synchronises the gradients of its module's parameters"
                )
        distribution = DDPDistribution(ddp, module, mode, check_errors)
        super().__init__(
            params, base_optimizer, rho, micro_batches=micro_batches,
            micro_batch_size=micro_batch_size, strategy="loop", model=module,
            distribution=distribution, **kwargs,
        )
        check_support(self.rule, where="ddp", mode=mode)
        self.ddp, self.module, self.mode, self.check_errors = ddp, module, mode, check_errors
        distribution.check_settings(self)

    # -- public ------------------------------------------------------------------------------
    @property
    def global_micro_batches(self) -> int | None:
        """Perturbations averaged per step over all ranks (``world_size * m``; 1 if synchronized).

        ``None`` when ``micro_batch_size`` sets ``m`` from the batch size.
        """
        if self.mode == "synchronized":
            return 1
        m = self.micro_batches
        if m is None:
            return self.world_size if self.engine.micro_batch_size is None else None
        return self.world_size * m

    def accumulate(
        self,
        loss_fn: Callable[..., torch.Tensor],
        batch: Any = None,
        *,
        scale: float = 1.0,
        scaler: Any = None,
        sync: bool = True,
    ) -> torch.Tensor:
        """Add ``scale`` times this batch's mSAM gradient to ``p.grad`` (as MSAM.accumulate).

        ``sync=False`` keeps the call free of gradient communication: pass ``sync=(i == k - 1)``
        over ``k`` accumulation calls (or wrap the first ``k - 1`` calls in ``ddp.no_sync()``)
        and only the last micro-batch of the last call all-reduces. If ``step()`` finds a
        gradient that was never synchronised it all-reduces it once itself -- always the case
        with a rule that combines ``g_j`` and ``h_j`` (GSAM, WSAM), whatever ``sync`` says.
        """
        d = self.distribution
        assert isinstance(d, DDPDistribution)
        if d.ddp is None:
            return super().accumulate(loss_fn, batch, scale=scale, scaler=scaler)
        sync = bool(sync) and d.ddp.require_backward_grad_sync
        d.strategy.sync = sync
        d.strategy.unsynced = False
        out = super().accumulate(loss_fn, batch, scale=scale, scaler=scaler)
        if not (self.last_result is not None and self.last_result.skipped):
            # A synchronised call leaves every accumulated gradient averaged over the ranks; a
            # combining rule's call leaves them all local.
            d.accumulated(sync)
        return out

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + (
            f", mode={self.mode!r}, world_size={self.world_size})"
        )


def settings_fingerprint(opt: Any, **extra: Any) -> dict[str, Any]:
    """The settings every rank must share, as plain values (tensors left out)."""
    rule = {k: v for k, v in opt.rule.state_dict().items()
            if not isinstance(v, (torch.Tensor, dict, list))}
    sched = opt.schedule
    return {
        "micro_batches": opt.engine.micro_batches,
        "micro_batch_size": opt.engine.micro_batch_size,
        "rule": rule,
        "rho": [float(g["rho"]) for g in opt.param_groups],
        "strategy": opt.engine.strategy.name,
        "schedule": (sched.every, sched.start_step, sched.reuse, sched.reuse_alpha),
        "nonfinite": opt.engine.nonfinite,
        "max_grad_norm": opt.max_grad_norm,
        **extra,
    }


def _groups(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices grouped by (dtype, device), so each group flattens into one tensor."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return list(groups.values())


def _global_rank(group: Any, group_rank: int) -> int:
    try:
        return dist.get_global_rank(group, group_rank) if group is not None else group_rank
    except (RuntimeError, ValueError, AttributeError):  # pragma: no cover - default group
        return group_rank


def _check_batchnorm(ddp: nn.parallel.DistributedDataParallel | None, module: nn.Module) -> None:
    sync_bn = [n for n, m in module.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    if sync_bn:
        devices = {p.device.type for p in module.parameters()} | {
            b.device.type for b in module.buffers()}
        if "cpu" in devices:
            raise ValueError(
                f"SyncBatchNorm ({sync_bn[0]!r}) needs CUDA/XPU tensors in this torch "
                f"({torch.__version__}); on CPU use BatchNorm with per-rank statistics "
                "(DDP with msam.distributed.ddp_kwargs()) and "
                "msam.distributed.average_batchnorm_buffers before evaluation"
            )
    if ddp is None or not _forward_syncs_buffers(ddp):
        return
    per_rank = [n for n, m in module.named_modules()
                if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
                and m.track_running_stats and m.running_mean is not None]
    if per_rank:
        kw = ", ".join(f"{k}={v}" for k, v in ddp_kwargs().items())
        raise ValueError(
            f"BatchNorm ({per_rank[0]!r}) with DDP's buffer broadcast: DDP would overwrite "
            "each rank's running statistics with rank 0's on synchronised forwards, mixing two "
            f"policies. Build DDP with {kw} (msam.distributed.ddp_kwargs()) for per-rank "
            "statistics, and call msam.distributed.average_batchnorm_buffers(model) before "
            "evaluating; or use SyncBatchNorm (CUDA)"
        )
