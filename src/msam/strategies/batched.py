"""The ``batched`` strategy: all micro-batches of a chunk in one full-batch pass per phase.

``loss_fn`` runs **once** on the concatenation of ``k`` equally sized micro-batches (``k b``
examples, micro-batch ``j`` in rows ``j b .. (j + 1) b - 1``), with the model's own code and
PyTorch's full-batch kernels; every parametrised layer is replaced, for that call only, by a
**grouped** rule (:mod:`msam.strategies.grouped`, shared with ``lowrank``) that gives
micro-batch ``j`` its own parameters (a :class:`torch.overrides.TorchFunctionMode` intercepts
the functional calls that receive a parameter: ``F.linear``, ``F.conv1d`` / ``conv2d``,
``F.embedding``, ``F.layer_norm``, ``F.group_norm``, ``F.batch_norm``). Layers without
parameters (activations, dropout, pooling, attention, reshapes) run on the full batch
unchanged. One ordinary backward follows.

* **Ascent** (at ``w``): the forward is SAM's full-batch forward (``F.linear(x, w, b)`` fused,
  one matmul); each perturbed parameter also enters as per-group leaves (``k`` aliases of a 2-D
  weight; a stride-0 ``w.expand(k, ...)`` view otherwise: no copy), whose gradients are the
  ``g_j``: for ``Linear`` ``delta_j^T x_j``, one small matmul per group into a buffer reused
  from step to step, and the bias's row sums of ``delta_j``. The loss is scaled by ``k`` (the
  chunk loss is the mean of the ``L_j``).
* **Descent** (at ``w + e_j``): for ``Linear`` the points ``P_j = w + e_j`` are formed in
  place in the ``e_j`` buffers and ``y_j = x_j P_j^T + b_j`` runs as one matmul per group into
  its rows of ``y``; the backward gives ``sum_j c_j h_j`` for ``w`` directly as one full-batch
  matmul (no per-micro-batch gradient is formed). The other parameters (norms, convolutions,
  embeddings) use ``w + E`` (stacked) with autograd. With ``rho = 0`` the pass is the plain
  full-batch pass.

The contract this relies on -- ``loss_fn(concatenated micro-batches)`` is the size-weighted
mean of ``loss_fn(micro-batch)`` (a per-example mean such as ``cross_entropy``), and every
parametrised layer sees the batch in dimension 0 -- is **checked** on the first step of each
configuration and loss function (a function is known by what its code does: a closure made anew
each step is not checked again, a different function is; a closure whose captured values change
how it reduces is not seen): the losses at ``w``, batched vs one micro-batch at a time, without
randomness differences (the RNG is forked). A loss or model that breaks it, a parameter used
outside the supported layers (e.g. a ``cls_token`` added in ``forward``), a recurrent module, or an
option the rules do not implement makes the strategy **fall back to ``loop``** for that model,
announced once by a :class:`BatchedFallbackWarning` (``reason`` says why); with
``fallback=False`` it raises ``ValueError`` instead. Each micro-batch of a chunk reports the
chunk's mean loss as its ``L_j`` (their weighted sum is the step's loss, as with ``loop``).

Memory: the ``k`` ascent gradients ``g_j`` (the rule writes ``e_j`` into them; for ``Linear``
weights they are ``k`` buffers reused from step to step, because a fresh large CPU allocation
pays page faults on first touch), the stacked ``w + E`` of the other perturbed parameters, and
the activations of the chunk (SAM's full-batch pass): about ``k`` parameter copies beyond
SAM's. ``chunk=c`` runs the micro-batches ``c`` at a time, bounding that to about ``c``
copies; micro-batches of different sizes (``torch.tensor_split``) run as separate chunks.

BatchNorm follows :mod:`msam.core.batchnorm`: statistics per micro-batch in both passes
(``F.batch_norm`` runs over ``k C`` channels), running statistics from the ascent pass only.
Dropout draws one mask for the concatenated batch (so results are not bit-equal to ``loop``
with dropout).

``torch.compile``: the grouped passes run a compiled model eagerly, announced once by a
:class:`~msam.strategies.compiled.NotCompiledWarning` (see :mod:`msam.strategies.compiled`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch

from msam.core.batch import batch_size
from msam.strategies.base import Offsets, StepContext, Strategy, check_loss, fresh_autocast
from msam.strategies.compiled import eager, warn_not_compiled
from msam.strategies.grouped import (
    BNSlot,
    GroupedMode,
    GroupedParam,
    Unbatchable,
    concat_batches,
    config_key,
    unsupported_modules,
)
from msam.strategies.loop import LoopStrategy

__all__ = ["BatchedFallbackWarning", "BatchedStrategy", "Unbatchable", "unsupported_modules"]


#: Why ``batched`` and ``lowrank`` run a compiled model eagerly (see msam.strategies.compiled).
COMPILE_WHY = ("dynamo would recompile the model under the grouped TorchFunctionMode every "
               "pass until its recompile limit and then run it uncompiled")


class BatchedFallbackWarning(UserWarning):
    """The ``batched`` strategy could not batch a model or loss and uses ``loop`` instead."""


# -- the strategy --------------------------------------------------------------------------
class BatchedStrategy(Strategy):
    """See the module docstring. ``chunk``: at most this many micro-batches per batched pass
    (``None``: all of one size); ``fallback``: run ``loop`` (announced) for a model or loss
    that cannot be batched, instead of raising ``ValueError``."""

    name = "batched"

    def __init__(self, chunk: int | None = None, fallback: bool = True) -> None:
        self.chunk = _check_chunk(chunk)
        self.fallback = bool(fallback)
        self.reason = ""                      # why the last step used loop ("": it did not)
        self._loop = LoopStrategy()
        self._failed: dict[int, str] = {}     # id(model) -> reason
        self._checked: set[tuple] = set()     # configurations whose loss contract was checked
        self._buffers: dict[tuple, list[torch.Tensor]] = {}  # see _workspace

    def chunks(self, ctx: StepContext) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for j, (mb, _) in enumerate(ctx.micro_batches):
            groups.setdefault(batch_size(mb), []).append(j)
        out: list[list[int]] = []
        for idx in groups.values():
            step = len(idx) if self.chunk is None else self.chunk
            out.extend(idx[i:i + step] for i in range(0, len(idx), step))
        return out

    # fallback bookkeeping
    def _use_loop(self, ctx: StepContext) -> bool:
        model = ctx.model
        if model is None:
            return self._fail(ctx, "no model (pass model=... to the optimizer)")
        if id(model) in self._failed:
            self.reason = self._failed[id(model)]
            return True
        bad = unsupported_modules(model)
        if bad:
            return self._fail(ctx, f"modules it cannot batch: {', '.join(bad)}")
        self.reason = ""
        warn_not_compiled(self, self.name, model, COMPILE_WHY)
        return False

    def _fail(self, ctx: StepContext, reason: str, err: BaseException | None = None) -> bool:
        if not self.fallback:
            raise ValueError(f"strategy='batched' cannot batch this model: {reason}") from err
        key = id(ctx.model)
        if self._failed.get(key) != reason:
            warnings.warn(f"strategy='batched' falls back to 'loop': {reason}",
                          BatchedFallbackWarning, stacklevel=2)
        self._failed[key] = self.reason = reason
        return True

    # the two passes
    def ascent(self, ctx: StepContext, idx: list[int]) -> list[tuple[torch.Tensor, Offsets]]:
        if len(idx) > 1 and not self._use_loop(ctx):
            try:
                self._check_contract(ctx, idx)
                loss, grads = self._pass(ctx, idx, None, ascent=True)
            except Unbatchable as err:
                self._fail(ctx, str(err), err)
            else:
                if ctx.loss_scale is not None:
                    grads = [[None if x is None else x / ctx.loss_scale for x in g]
                             if isinstance(g, list) else
                             (None if g is None else g / ctx.loss_scale) for g in grads]
                return [(loss, [None if g is None else g[r] for g in grads])
                        for r in range(len(idx))]
        return [self._loop.ascent(ctx, [j])[0] for j in idx]

    def descent(self, ctx: StepContext, idx: list[int],
                offsets: list[Offsets] | None) -> list[torch.Tensor]:
        if len(idx) > 1 and not self._use_loop(ctx):
            try:
                if offsets is None:
                    self._check_contract(ctx, idx)
                loss, grads = self._pass(ctx, idx, offsets, ascent=False)
            except Unbatchable as err:
                self._fail(ctx, str(err), err)
            else:
                with torch.no_grad():
                    for p, g in zip(ctx.params, grads):
                        if g is not None:
                            p.grad = g if p.grad is None else p.grad.add_(g)
                if offsets is not None:
                    offsets.clear()
                return [loss] * len(idx)
        out = []
        for r, j in enumerate(idx):
            out += self._loop.descent(ctx, [j], None if offsets is None else [offsets[r]])
        return out

    def _pass(self, ctx: StepContext, idx: list[int], offsets: list[Offsets] | None,
              ascent: bool) -> tuple[torch.Tensor, list[Any]]:
        """The pass's loss and gradients: per perturbed parameter in the ascent (``(k, ...)``
        or a list of k tensors), per leaf otherwise."""
        model = ctx.model
        assert model is not None
        k = len(idx)
        batch = concat_batches([ctx.micro_batches[j][0] for j in idx])
        n = batch_size(batch)
        names = {id(p): nm for nm, p in model.named_parameters(remove_duplicate=False)}
        pert = {i: col for col, i in enumerate(ctx.perturbed)}
        params: dict[int, GroupedParam] = {}
        leaves: list[torch.Tensor] = []
        for i, p in enumerate(ctx.params):
            if id(p) not in names:
                raise Unbatchable("an optimized parameter does not belong to model")
            w = p.detach()
            if ascent:
                entry = params[id(p)] = GroupedParam(names[id(p)], w)
                if i not in pert:
                    continue
                if w.dim() == 2:
                    entry.per_group = [p.detach().requires_grad_() for _ in range(k)]
                    leaves.extend(entry.per_group)
                else:
                    entry.stacked = w.unsqueeze(0).expand((k,) + tuple(w.shape))
                    leaves.append(entry.stacked.requires_grad_())
                continue
            entry = params[id(p)] = GroupedParam(names[id(p)], p.detach().requires_grad_())
            leaves.append(entry.leaf)
            if offsets is not None and i in pert:
                col = pert[i]
                given = [e[col] for e in offsets]
                if any(e is not None for e in given):
                    es = [torch.zeros_like(w) if e is None else e for e in given]
                    for e in offsets:  # the pass holds them now
                        e[col] = None
                    if w.dim() == 2:  # a Linear weight: the points w + e_j, in place
                        entry.points = [e.add_(w) for e in es]
                    else:
                        entry.offsets = torch.stack(es)
        bn_slots = {}
        with ctx.bn.pass_(record=False):
            for rec in ctx.bn.records.values():
                bn_slots[id(rec.module._buffers["running_mean"])] = BNSlot(rec, k)
            mode = GroupedMode(params, k, n, bn_slots,
                                self._workspace(ctx, k) if ascent else None)
            fresh_autocast()
            with eager(), torch.enable_grad(), mode:
                loss = check_loss(ctx.loss_fn(batch))
            if ascent:
                coef: float = float(k)
            else:
                weight = sum(ctx.micro_batches[j][1] for j in idx)
                coef = weight * ctx.grad_weight
            grads = list(torch.autograd.grad(ctx.scaled(loss * coef), leaves,
                                             allow_unused=True))
        if ascent or offsets is None:
            for slot in bn_slots.values():
                if slot.last is None:
                    continue
                c = slot.record.module._buffers["running_mean"].numel()
                slot.record.means.extend(slot.last[0].reshape(k, c).unbind(0))
                slot.record.vars.extend(slot.last[1].reshape(k, c).unbind(0))
        if ascent:  # one entry per perturbed parameter: (k, ...) or a list of k tensors
            pos, out = 0, []  # type: tuple[int, list[Any]]
            for i in ctx.perturbed:
                entry = params[id(ctx.params[i])]
                if entry.per_group is not None:
                    out.append(grads[pos:pos + k])
                    pos += k
                else:
                    out.append(grads[pos])
                    pos += 1
            return loss.detach(), out
        return loss.detach(), grads

    def _workspace(self, ctx: StepContext, k: int) -> dict[int, list[torch.Tensor]]:
        """``k`` gradient buffers per perturbed 2-D weight, kept between steps: a fresh
        allocation of a large CPU tensor costs page faults on first touch (measured: about a
        third of a millisecond per 1.6 MB buffer), several times the matmul that fills it.
        The buffers become ``g_j``, then ``e_j`` (the rule writes it in place), and are free
        again after the descent."""
        ws: dict[int, list[torch.Tensor]] = {}
        keep: dict[tuple, list[torch.Tensor]] = {}
        for i in ctx.perturbed:
            p = ctx.params[i]
            if p.dim() != 2:
                continue
            key = (id(p), tuple(p.shape), p.dtype, p.device)
            bufs = self._buffers.get(key, [])
            while len(bufs) < k:
                bufs.append(torch.empty_like(p, memory_format=torch.contiguous_format))
            keep[key] = bufs
            ws[id(p)] = bufs[:k]
        self._buffers = keep
        return ws

    def workspace_tensors(self) -> list[torch.Tensor]:
        """The buffers kept between steps (counted by ``msam bench``'s peak memory)."""
        return [t for bufs in self._buffers.values() for t in bufs]

    def _check_contract(self, ctx: StepContext, idx: list[int]) -> None:
        """Once per configuration: ``loss_fn(concat)`` equals the weighted mean of
        ``loss_fn(micro-batch)`` at ``w`` (same RNG state for both)."""
        # Once per model, configuration and loss function. loss_fn is often a new closure each
        # step, so it is keyed by its code (a lambda made anew each step is the same code); a
        # different function -- e.g. a switch to a sum-reduced loss -- is checked again.
        key = (config_key(ctx), len(idx), id(ctx.model), _code_of(ctx.loss_fn))
        if key in self._checked:
            return
        model = ctx.model
        assert model is not None
        batch = concat_batches([ctx.micro_batches[j][0] for j in idx])
        n = batch_size(batch)
        dev = ctx.params[0].device
        with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda"
                                                    else []):
            state = torch.random.get_rng_state()
            names = {id(p): nm for nm, p in model.named_parameters(remove_duplicate=False)}
            shared = {id(p): GroupedParam(names.get(id(p), "?"), p.detach()) for p in ctx.params}
            with ctx.bn.pass_(record=False):
                slots = {id(rec.module._buffers["running_mean"]): BNSlot(rec, len(idx))
                         for rec in ctx.bn.records.values()}
                with eager(), GroupedMode(shared, len(idx), n, slots):  # BN per micro-batch
                    whole = float(_scalar(ctx.loss_fn(batch)))
            parts = 0.0
            for j in idx:
                torch.random.set_rng_state(state)
                mb = ctx.micro_batches[j][0]
                with ctx.bn.pass_(record=False):
                    parts += float(_scalar(ctx.loss_fn(mb))) * batch_size(mb) / n
        # float32 (and autocast to bf16 inside loss_fn: about 5e-4 measured) vs float64;
        # what the check is for -- a sum, a batch-level term -- is off by far more.
        tol = 2e-3 if ctx.params[0].dtype in (torch.float16, torch.bfloat16, torch.float32) \
            else 1e-9
        if not (math.isfinite(whole) and math.isfinite(parts)):
            return  # inconclusive (a non-finite batch): the step's own check reports it
        if not math.isclose(whole, parts, rel_tol=tol, abs_tol=tol):
            raise Unbatchable(
                f"loss_fn over the concatenated micro-batches ({whole:.6g}) is not the mean of "
                f"loss_fn over each ({parts:.6g}): a batch-level loss (sum reduction, "
                f"contrastive terms), randomness, or a model that mixes examples")
        self._checked.add(key)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "chunk": self.chunk}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.chunk = _check_chunk(state.get("chunk", self.chunk))
        except ValueError as err:
            raise ValueError(f"strategy state: {err}") from None


def _scalar(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    return loss.reshape(())


def _check_chunk(chunk: Any) -> int | None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                              or chunk < 1):
        raise ValueError(f"chunk must be an integer >= 1 or None, got {chunk!r}")
    return chunk


def _code_of(fn: Any) -> Any:
    """What identifies a loss function across steps: what its code does (bytecode, constants
    and names: closures made anew each step, or two identical lambdas, are the same; a loss
    with ``reduction="sum"`` is not), looking through ``functools.partial``; for another
    callable, its class."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(fn, "__code__", None)
    if code is None:
        return type(fn)
    return (code.co_code, code.co_consts, code.co_names)
