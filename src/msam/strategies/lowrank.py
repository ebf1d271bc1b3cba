"""The ``lowrank`` strategy: SAM steps on ``Linear`` layers without per-micro-batch gradients.

For a ``Linear`` layer ``y = x W^T + b`` micro-batch ``j``'s weight gradient is the low-rank
``G_j = D_j^T X_j`` (``X_j``: its ``r_j`` input rows, ``D_j``: its output gradients, both from
**one** full-batch ascent pass). With the plain SAM rule everything the step needs follows
from ``X_j`` and ``D_j`` without forming ``G_j``:

* ``||G_j||^2 = sum((X_j X_j^T) * (D_j D_j^T))`` (two ``r_j x r_j`` Gram matrices), the
  bias's ``||1^T D_j||^2``; the global norm of micro-batch ``j`` adds these over the layers
  (and the other perturbed parameters' explicit per-micro-batch gradients, see below), so
  ``c_j = rho / (||g_j|| + 1e-12)`` exactly as :class:`msam.core.SAMRule` computes it;
* the perturbed forward at ``W + c_j G_j`` is ``X'_j W^T + c_j (X'_j X_j^T) D_j`` (one
  full-batch matmul plus an ``r_j x r_j`` term), the bias ``b + c_j 1^T D_j``;
* its backward: input gradient ``D'_j W + c_j (D'_j D_j^T) X_j``, and the weight gradient
  ``sum_j (n_j / n) h_j = D'^T X'`` is one full-batch matmul, as in SAM (the perturbation is a
  constant).

This is exact, not an approximation, but only for the SAM rule: ASAM's elementwise ``T^2``
and the SAM-family rules (which need ``g_j`` and ``h_j`` themselves) break it, and so the
strategy is **fused**: where it applies it computes ascent, rule and descent of a chunk in
one call (:meth:`LowRankStrategy.sam_chunk`, used by the engine when ``fused_sam`` is set),
instead of handing ``g_j`` to the rule. Everywhere else it is the ``batched`` strategy it
derives from (ASAM, the SAM family, ``rho = 0``, and models it cannot factor).

Perturbed parameters that are not a ``Linear`` weight or bias (LayerNorm, embeddings,
convolutions, BatchNorm affine) get explicit per-micro-batch gradients and points ``w + e_j``
by the ``batched`` rules, and enter the same norm. A ``Linear`` whose input is N-D (tokens)
has ``r_j = b_j x T`` rows; it is factored only when ``r_j (d_in + d_out) <= d_in d_out`` (the
factored terms cost about ``r_j^2 (d_in + d_out)``, the explicit gradient ``r_j d_in d_out``),
otherwise the step is left to ``batched``. So are a factored parameter used twice in one
forward (weight tying) or by another layer. Such a model (or another rule than SAM) falls
back to ``batched`` for its configuration, announced once by a
:class:`LowRankFallbackWarning` (``lowrank_reason`` says why; ``reason`` is the ``batched``
fallback's, or this one).

Loss scaling, accumulation weights, ``perturb=`` subsets, the BatchNorm rule and the
non-finite checks behave as in the engine: the engine records the losses and norms this
returns, and the parameters are never moved (nothing to restore).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from msam.core.batch import batch_size
from msam.core.perturbation import EPS, PerturbationRule, SAMRule
from msam.strategies.base import FusedChunk, StepContext, check_loss, fresh_autocast
from msam.strategies.batched import BatchedStrategy
from msam.strategies.compiled import eager
from msam.strategies.grouped import (
    BNSlot,
    GroupedMode,
    GroupedParam,
    Unbatchable,
    concat_batches,
    config_key,
    flat_tensors,
)

__all__ = ["LowRankFallbackWarning", "LowRankStrategy"]


class LowRankFallbackWarning(UserWarning):
    """The ``lowrank`` strategy could not factor a model and uses ``batched`` instead."""


class _Layer:
    """One factored ``Linear`` call: its ascent inputs ``X``, output gradients ``D`` and, for
    the descent, the per-micro-batch coefficients."""

    __slots__ = ("w", "b", "x", "d", "cw", "cb", "db", "cd")

    def __init__(self, w: int, b: int | None, x: torch.Tensor) -> None:
        self.w, self.b = w, b
        self.x = x                        # (k, r, d_in), detached
        self.d: torch.Tensor | None = None     # (k, r, d_out), unscaled (fp16: kept in fp32)
        self.cw: torch.Tensor | None = None    # (k,): c_j for W (None: W not moved)
        self.cb: torch.Tensor | None = None    # (k,): c_j for b
        self.db: torch.Tensor | None = None    # (k, d_out): 1^T D_j
        self.cd: torch.Tensor | None = None    # (k, r, d_out): c_j D_j, formed before the cast


class _FactAscent(torch.autograd.Function):
    """``F.linear(x, w, b)`` at ``w``; its backward records ``D`` (the output gradient) and
    passes the input gradient on; the token is a leaf that only makes autograd call it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                token: torch.Tensor, layer: _Layer, unscale: torch.Tensor | None
                ) -> torch.Tensor:
        ctx.save_for_backward(w)
        ctx.layer, ctx.unscale = layer, unscale
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple:
        (w,) = ctx.saved_tensors
        layer = ctx.layer
        d = gy.reshape(layer.x.shape[0], layer.x.shape[1], gy.shape[-1])
        if d.dtype == torch.float16:  # unscaled, small entries would underflow in fp16
            d = d.float()
        d = d / ctx.unscale if ctx.unscale is not None else d.clone()
        layer.d = d if layer.d is None else layer.d + d
        gx = (gy @ w.to(gy.dtype)) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None, None


class _FactDescent(torch.autograd.Function):
    """``y_j = x'_j (W + c_j D_j^T X_j)^T + b + c_j 1^T D_j`` without forming the weights."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                layer: _Layer) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.layer, ctx.has_b = layer, b is not None
        y = F.linear(x, w, b)
        k, r = layer.x.shape[0], layer.x.shape[1]
        yg = y.view(k, r, y.shape[-1])
        if layer.cd is not None:
            xs = x.reshape(k, r, x.shape[-1])
            a = torch.bmm(xs, layer.x.transpose(1, 2))          # X'_j X_j^T
            yg.baddbmm_(a, layer.cd.to(a.dtype))                # + c_j X'_j X_j^T D_j
        if layer.cb is not None and layer.db is not None:
            yg.add_((layer.cb.to(layer.db.dtype).view(k, 1) * layer.db).to(y.dtype).unsqueeze(1))
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple:
        x, w = ctx.saved_tensors
        layer = ctx.layer
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = gy @ w.to(gy.dtype)
            if layer.cd is not None:
                k, r = layer.x.shape[0], layer.x.shape[1]
                gys = gy.reshape(k, r, gy.shape[-1])
                a = torch.bmm(gys, layer.cd.to(gy.dtype).transpose(1, 2))  # c_j D'_j D_j^T
                gx.view(k, r, gx.shape[-1]).baddbmm_(a, layer.x.to(a.dtype))
            gx = gx.to(x.dtype)
        g2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = (g2.t() @ x.reshape(-1, x.shape[-1]).to(gy.dtype)).to(w.dtype)
        if ctx.needs_input_grad[2] and ctx.has_b:
            gb = g2.sum(0).to(w.dtype)
        return gx, gw, gb, None


class _FactoredMode(GroupedMode):
    """The batched rules, with ``F.linear`` of a perturbed weight factored."""

    def __init__(self, params: dict[int, GroupedParam], k: int, n: int, bn_buffers: dict[int, Any],
                 pert: set[int], layers: dict[int, _Layer], ascent: bool,
                 unscale: torch.Tensor | None) -> None:
        super().__init__(params, k, n, bn_buffers)
        self.pert, self.layers, self.ascent, self.unscale = pert, layers, ascent, unscale
        self.used: dict[int, str] = {}    # id(perturbed param) -> "factored" / "explicit"
        self.tokens: list[torch.Tensor] = []
        self.rules[F.linear] = self._fact_linear

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.linear and self.rules.get(func) is not None:
            for a in flat_tensors(args, kwargs or {}):
                if id(a) in self.pert:
                    self._use(id(a), "explicit")
        return super().__torch_function__(func, types, args, kwargs)

    def _use(self, key: int, how: str) -> None:
        was = self.used.get(key)
        if was is not None and (was == "factored" or how == "factored"):
            name = self.params[key].name
            raise Unbatchable(f"parameter {name} is used more than once (a factored Linear "
                              f"weight or bias must be used by one F.linear call)")
        self.used[key] = how

    def _fact_linear(self, x, weight, bias=None):
        if id(weight) not in self.pert:
            if bias is not None and id(bias) in self.pert:
                self._use(id(bias), "explicit")
            return self._linear(x, weight, bias)
        self._check_batch(x, "linear")
        k = self.k
        rows = x.numel() // x.shape[-1] // k
        d_out, d_in = weight.shape
        if x.dim() > 2 and rows * (d_in + d_out) > d_in * d_out:
            raise Unbatchable(f"linear {self.params[id(weight)].name}: {rows} input rows per "
                              f"micro-batch (tokens) make the factored form dearer than the "
                              f"explicit gradient ({d_in} x {d_out})")
        self._use(id(weight), "factored")
        pb = bias is not None and id(bias) in self.pert
        if pb:
            self._use(id(bias), "factored")
        w = self.params[id(weight)].leaf
        b = None if bias is None else self._value(bias)
        if self.ascent:
            layer = _Layer(id(weight), id(bias) if pb else None,
                           x.detach().reshape(k, rows, d_in))
            self.layers[id(weight)] = layer
            token = torch.zeros((), dtype=w.dtype, device=w.device).requires_grad_()
            self.tokens.append(token)
            return _FactAscent.apply(x, w, b, token, layer, self.unscale)
        layer = self.layers.get(id(weight))
        if layer is None:
            raise Unbatchable("the descent pass used a Linear the ascent did not")
        return _FactDescent.apply(x, w, b, layer)


class LowRankStrategy(BatchedStrategy):
    """``batched``, with SAM steps on ``Linear`` layers in factored form (see the module
    docstring)."""

    name = "lowrank"
    fused_sam = True

    def __init__(self, chunk: int | None = None, fallback: bool = True) -> None:
        self.lowrank_reason = ""
        self._batched_reason = ""
        self._no_factor: dict[tuple, str] = {}   # configuration -> why it is not factored
        super().__init__(chunk=chunk, fallback=fallback)

    @property  # type: ignore[override]
    def reason(self) -> str:
        """Why the last step did not use this strategy's own path ("": it did)."""
        return self._batched_reason or self.lowrank_reason

    @reason.setter
    def reason(self, value: str) -> None:
        self._batched_reason = value

    def _no(self, ctx: StepContext, key: tuple, reason: str) -> None:
        if self._no_factor.get(key) != reason:
            warnings.warn(f"strategy='lowrank' falls back to 'batched': {reason}",
                          LowRankFallbackWarning, stacklevel=3)
        self._no_factor[key] = self.lowrank_reason = reason

    def sam_chunk(self, ctx: StepContext, idx: list[int], rule: PerturbationRule,
                  groups: Sequence[Mapping[str, Any]], clean: bool = False
                  ) -> FusedChunk | None:
        """Ascent, SAM rule and descent of chunk ``idx`` (added into ``p.grad`` as
        :meth:`descent` does): the losses at ``w``, the norms ``||g_j||``, the losses at
        ``w + e_j`` and, with ``clean`` (a reuse schedule), ``sum_j weight (n_j / n) g_j`` per
        perturbed parameter (a factored weight's is ``sum_j c_j D_j^T X_j``, one matmul);
        ``None`` where the factored path does not apply (nothing was changed: the engine then
        takes the ordinary path)."""
        if type(rule) is not SAMRule:
            self._no(ctx, ("rule", rule.name), f"rule {rule.name!r}: only the plain SAM rule "
                     f"has a low-rank perturbation")
            return None
        if self._use_loop(ctx):
            return None
        key = (config_key(ctx), len(idx), id(ctx.model))
        if key in self._no_factor:
            self.lowrank_reason = self._no_factor[key]
            return None
        try:
            self._check_contract(ctx, idx)
            out = self._fused(ctx, idx, groups, clean)
        except Unbatchable as err:
            if isinstance(err.__cause__, _Contract):
                self._fail(ctx, str(err), err)
            else:
                self._no(ctx, key, str(err))
            return None
        self.lowrank_reason = ""
        return out

    def _check_contract(self, ctx: StepContext, idx: list[int]) -> None:
        try:
            super()._check_contract(ctx, idx)
        except Unbatchable as err:  # the loss contract: batched cannot run it either
            raise Unbatchable(str(err)) from _Contract()

    def _fused(self, ctx: StepContext, idx: list[int], groups: Sequence[Mapping[str, Any]],
               keep_clean: bool = False) -> FusedChunk:
        model = ctx.model
        assert model is not None
        k = len(idx)
        batch = concat_batches([ctx.micro_batches[j][0] for j in idx])
        n = batch_size(batch)
        names = {id(p): nm for nm, p in model.named_parameters(remove_duplicate=False)}
        col = {id(ctx.params[i]): c for c, i in enumerate(ctx.perturbed)}
        pert = set(col)
        device = ctx.params[0].device

        # -- ascent: one full-batch pass at w; D of the factored layers, stacked g_j else
        params: dict[int, GroupedParam] = {}
        for p in ctx.params:
            if id(p) not in names:
                raise Unbatchable("an optimized parameter does not belong to model")
            entry = params[id(p)] = GroupedParam(names[id(p)], p.detach())
            if id(p) in pert:
                w = p.detach()
                entry.stacked = w.unsqueeze(0).expand((k,) + tuple(w.shape)).requires_grad_()
        layers: dict[int, _Layer] = {}
        unscale = ctx.loss_scale
        bn_slots = {}
        with ctx.bn.pass_(record=False):
            for rec in ctx.bn.records.values():
                bn_slots[id(rec.module._buffers["running_mean"])] = BNSlot(rec, k)
            mode = _FactoredMode(params, k, n, bn_slots, pert, layers, True, unscale)
            fresh_autocast()
            with eager(), torch.enable_grad(), mode:
                loss = check_loss(ctx.loss_fn(batch))
            explicit = [i for i in ctx.perturbed
                        if mode.used.get(id(ctx.params[i])) == "explicit"]
            leaves = mode.tokens + [t for i in explicit
                                    if (t := params[id(ctx.params[i])].stacked) is not None]
            grads = torch.autograd.grad(ctx.scaled(loss * float(k)), leaves,
                                        allow_unused=True) if leaves else ()
        for slot in bn_slots.values():
            if slot.last is not None:
                c = slot.record.module._buffers["running_mean"].numel()
                slot.record.means.extend(slot.last[0].reshape(k, c).unbind(0))
                slot.record.vars.extend(slot.last[1].reshape(k, c).unbind(0))
        g_exp = {i: (None if g is None else ctx.unscaled([g])[0])
                 for i, g in zip(explicit, grads[len(mode.tokens):])}

        # -- the SAM rule, per micro-batch: sq_j over every perturbed parameter
        with torch.no_grad():
            sq = torch.zeros(k, dtype=torch.float64, device=device)
            for layer in layers.values():
                if layer.d is None:
                    continue  # the output did not reach the loss: no gradient, not moved
                dd = layer.d
                gram_x = torch.bmm(layer.x.to(dd.dtype), layer.x.to(dd.dtype).transpose(1, 2))
                gram_d = torch.bmm(dd, dd.transpose(1, 2))
                sq += (gram_x * gram_d).sum((1, 2), dtype=torch.float64)
                if layer.b is not None:
                    layer.db = dd.sum(1)
                    sq += layer.db.pow(2).sum(1, dtype=torch.float64)
            for g in g_exp.values():
                if g is not None:
                    sq += g.reshape(k, -1).pow(2).sum(1, dtype=torch.float64)
            norm = sq.sqrt()
            denom = norm + EPS

            def coef(i: int, dtype: torch.dtype) -> torch.Tensor:
                return (float(groups[col[id(ctx.params[i])]]["rho"]) / denom).to(dtype)

            index = {id(p): i for i, p in enumerate(ctx.params)}
            for layer in layers.values():
                if layer.d is None:
                    continue
                iw = index[layer.w]
                layer.cw = coef(iw, ctx.params[iw].dtype)
                # c_j D_j in D's dtype (fp32 under fp16): D is unscaled, c_j large
                layer.cd = layer.d * coef(iw, layer.d.dtype).view(-1, 1, 1)
                if layer.b is not None:
                    ib = index[layer.b]
                    layer.cb = coef(ib, ctx.params[ib].dtype)
            offsets: dict[int, torch.Tensor] = {}
            for i, g in g_exp.items():
                if g is not None:
                    c = coef(i, g.dtype).reshape((k,) + (1,) * (g.dim() - 1))
                    offsets[i] = g * c
            clean = self._clean(ctx, idx, layers, g_exp, col) if keep_clean else None

        # -- descent: one full-batch pass at w + e_j
        dparams: dict[int, GroupedParam] = {}
        dleaves = []
        for i, p in enumerate(ctx.params):
            entry = dparams[id(p)] = GroupedParam(names[id(p)], p.detach().requires_grad_())
            dleaves.append(entry.leaf)
            if i in offsets:
                entry.offsets = offsets[i]
        with ctx.bn.pass_(record=False):
            dslots = {id(rec.module._buffers["running_mean"]): BNSlot(rec, k)
                      for rec in ctx.bn.records.values()}
            dmode = _FactoredMode(dparams, k, n, dslots, pert, layers, False, None)
            fresh_autocast()
            with eager(), torch.enable_grad(), dmode:
                loss_p = check_loss(ctx.loss_fn(batch))
            weight = sum(ctx.micro_batches[j][1] for j in idx) * ctx.grad_weight
            dgrads = torch.autograd.grad(ctx.scaled(loss_p * weight), dleaves,
                                         allow_unused=True)
        with torch.no_grad():
            for p, g in zip(ctx.params, dgrads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        loss, loss_p = loss.detach(), loss_p.detach()
        return [loss] * k, list(norm.unbind(0)), [loss_p] * k, clean

    @staticmethod
    def _clean(ctx: StepContext, idx: list[int], layers: dict[int, _Layer],
               g_exp: Mapping[int, torch.Tensor | None], col: Mapping[int, int]
               ) -> list[torch.Tensor | None]:
        """``sum_j weight (n_j / n) g_j`` of the chunk per perturbed parameter (the order of
        ``ctx.pert_params``): ``D^T X`` with the rows of micro-batch ``j`` scaled by its
        weight for a factored weight, ``sum_j c_j 1^T D_j`` for its bias, the weighted sum of
        the stacked explicit gradients for the rest."""
        c = torch.tensor([ctx.grad_weight * ctx.micro_batches[j][1] for j in idx],
                         dtype=torch.float64, device=ctx.params[0].device)
        out: list[torch.Tensor | None] = [None] * len(col)
        by_id = {id(p): p for p in ctx.params}
        for layer in layers.values():
            if layer.d is None:
                continue
            w = by_id[layer.w]
            dd = layer.d * c.to(layer.d.dtype).view(-1, 1, 1)
            g = dd.flatten(0, 1).t() @ layer.x.flatten(0, 1).to(dd.dtype)
            out[col[layer.w]] = g.to(w.dtype).reshape(w.shape)
            if layer.b is not None and layer.db is not None:
                b = by_id[layer.b]
                out[col[layer.b]] = (c.to(layer.db.dtype) @ layer.db).to(b.dtype)
        for i, gi in g_exp.items():
            if gi is not None:
                cg = c.to(gi.dtype).reshape((-1,) + (1,) * (gi.dim() - 1))
                out[col[id(ctx.params[i])]] = (gi * cg).sum(0)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "chunk": self.chunk}


class _Contract(Exception):
    """Marks an :class:`Unbatchable` raised by the loss-contract check."""
