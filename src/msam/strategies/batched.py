"""The ``batched`` strategy: all micro-batches of a chunk in one full-batch pass per phase.

``loss_fn`` runs **once** on the concatenation of ``k`` equally sized micro-batches (``k b``
examples, micro-batch ``j`` in rows ``j b .. (j + 1) b - 1``), with the model's own code and
PyTorch's full-batch kernels; every parametrised layer is replaced, for that call only, by a
**grouped** rule that gives micro-batch ``j`` its own parameters (a
:class:`torch.overrides.TorchFunctionMode` intercepts the functional calls that receive a
parameter: ``F.linear``, ``F.conv1d`` / ``conv2d``, ``F.embedding``, ``F.layer_norm``,
``F.group_norm``, ``F.batch_norm``). Layers without parameters (activations, dropout, pooling,
attention, reshapes) run on the full batch unchanged. One ordinary backward follows.

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
configuration (the losses at ``w``, batched vs one micro-batch at a time, without randomness
differences: the RNG is forked). A loss or model that breaks it, a parameter used outside the
supported layers (e.g. a ``cls_token`` added in ``forward``), a recurrent module, or an
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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from msam.core.batch import batch_size, map_tensors, stack_batches
from msam.strategies.base import Offsets, StepContext, Strategy, check_loss, fresh_autocast
from msam.strategies.loop import LoopStrategy

__all__ = ["BatchedFallbackWarning", "BatchedStrategy", "Unbatchable", "unsupported_modules"]


class BatchedFallbackWarning(UserWarning):
    """The ``batched`` strategy could not batch a model or loss and uses ``loop`` instead."""


class Unbatchable(Exception):
    """Raised inside a batched pass for a model or loss the grouped rules cannot run."""


def unsupported_modules(model: nn.Module) -> list[str]:
    """Submodules (``name (Type)``) that the batched evaluator refuses up front."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.RNNBase, nn.MultiheadAttention)) or (
                isinstance(mod, nn.modules.instancenorm._InstanceNorm)
                and mod.track_running_stats):
            out.append(f"{name or '<root>'} ({type(mod).__name__})")
    return out


# -- grouped layers ------------------------------------------------------------------------
class _LinearAscent(torch.autograd.Function):
    """At ``w``: ``F.linear(x, w, b)`` as one full-batch (fused) matmul; the gradients of the
    per-group leaves ``ws[j]`` (aliases of ``w``) are ``delta_j^T x_j``, one matmul each into
    a reused buffer (the rule then writes ``e_j`` into it in place), and the bias's per-group
    gradients (leaf ``bstack``, ``k`` x ``b`` as a stride-0 view) are row sums of ``delta_j``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int,
                outs: list[torch.Tensor] | None, bstack: torch.Tensor | None,
                *ws: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.k, ctx.outs = k, outs
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple:
        x, w = ctx.saved_tensors
        k = ctx.k
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ w.to(gy.dtype)).to(x.dtype)
        gys = gy.reshape(k, -1, gy.shape[-1])
        if ctx.needs_input_grad[5]:
            gb = gys.sum(1).to(w.dtype)
        xs = x.reshape(k, -1, x.shape[-1]).to(gy.dtype)
        outs = ctx.outs if ctx.outs is not None and gy.dtype == w.dtype else None
        gws = [(torch.mm(gys[j].t(), xs[j]) if outs is None else
                torch.mm(gys[j].t(), xs[j], out=outs[j])).to(w.dtype)
               if ctx.needs_input_grad[6 + j] else None for j in range(k)]
        return (gx, None, None, None, None, gb, *gws)


class _LinearDescent(torch.autograd.Function):
    """At ``w + e_j``: ``y_j = x_j P_j^T + b_j`` (``P_j = w + e_j``, formed in place in the
    ``e_j`` buffer; ``b_j`` the bias or its points), one matmul per group into its rows of
    ``y``; the gradients for the unbatched leaves are ``sum_j delta_j^T x_j`` (one full-batch
    matmul) and ``sum_j sum_rows delta_j`` -- no per-micro-batch gradient is formed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int,
                bpoints: torch.Tensor | None, *points: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, *points)
        ctx.k, ctx.wdtype = k, w.dtype
        dev = x.device.type
        amp = torch.is_autocast_enabled(dev)
        dt = torch.get_autocast_dtype(dev) if amp else torch.promote_types(x.dtype,
                                                                          points[0].dtype)
        with torch.autocast(dev, enabled=False):  # explicit casts, as autocast would do
            xs = x.reshape(k, -1, x.shape[-1]).to(dt)
            out = torch.empty((*x.shape[:-1], points[0].shape[0]), dtype=dt, device=x.device)
            y = out.view(k, xs.shape[1], points[0].shape[0])
            for j, pj in enumerate(points):
                bj = bpoints[j] if bpoints is not None else b
                if bj is None:
                    torch.mm(xs[j], pj.to(dt).t(), out=y[j])
                else:
                    torch.addmm(bj.to(dt), xs[j], pj.to(dt).t(), out=y[j])
        return out

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple:
        x, *points = ctx.saved_tensors
        k = ctx.k
        gx = gw = gb = None
        g2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[0]:
            gys = gy.reshape(k, -1, gy.shape[-1])
            gxs = torch.empty((k, gys.shape[1], points[0].shape[1]), dtype=gy.dtype,
                              device=gy.device)
            for j, pj in enumerate(points):
                torch.mm(gys[j], pj.to(gy.dtype), out=gxs[j])
            gx = gxs.reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = (g2.t() @ x.reshape(-1, x.shape[-1]).to(gy.dtype)).to(ctx.wdtype)
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(ctx.wdtype)
        return (gx, gw, gb, None, None, *([None] * len(points)))


class _Param:
    """How one parameter enters the batched pass."""

    __slots__ = ("leaf", "stacked", "per_group", "points", "offsets", "name")

    def __init__(self, name: str, leaf: torch.Tensor) -> None:
        self.name = name
        self.leaf = leaf          # what the gradient is taken with respect to
        self.stacked: torch.Tensor | None = None    # ascent: (k, ...) leaf, stride-0 view of w
        self.per_group: list[torch.Tensor] | None = None  # ascent, 2-D: k leaves (aliases)
        self.points: list[torch.Tensor] | None = None  # descent, 2-D: the k w + e_j (const)
        self.offsets: torch.Tensor | None = None    # descent: stacked e_j (constant)

    def grouped(self) -> torch.Tensor | None:
        """The ``(k, ...)`` per-group value with autograd to the right leaf (None: shared)."""
        if self.stacked is not None:
            return self.stacked
        if self.per_group is not None:
            return torch.stack(self.per_group)
        if self.offsets is not None:
            return self.leaf.unsqueeze(0) + self.offsets
        if self.points is not None:  # a 2-D weight used by another layer than F.linear
            return self.leaf.unsqueeze(0) + (torch.stack(self.points) - self.leaf.detach())
        return None


_META = {"__get__", "size", "dim", "numel", "stride", "is_contiguous", "element_size",
         "data_ptr", "is_floating_point", "is_complex", "__len__", "__hash__", "__eq__",
         "requires_grad_", "__format__", "__repr__", "storage_offset", "nelement", "ndimension",
         "untyped_storage", "get_device", "__bool__"}


class _GroupedMode(TorchFunctionMode):
    """Replaces the functional calls that receive a parameter by their grouped rule."""

    def __init__(self, params: dict[int, _Param], k: int, n: int,
                 bn_buffers: dict[int, Any],
                 workspace: dict[int, list[torch.Tensor]] | None = None) -> None:
        super().__init__()
        self.params, self.k, self.n = params, k, n
        self.workspace = workspace or {}  # id(weight) -> k gradient buffers (ascent)
        self.bn_buffers = bn_buffers     # id(running_mean scratch) -> _BNSlot
        self.rules: dict[Callable, Callable] = {
            F.linear: self._linear, F.conv1d: self._conv, F.conv2d: self._conv,
            F.embedding: self._embedding, F.layer_norm: self._layer_norm,
            F.group_norm: self._group_norm, F.batch_norm: self._batch_norm,
        }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = self.rules.get(func)
        if rule is not None:
            return rule(*args, **kwargs)
        if getattr(func, "__name__", "") not in _META:
            for a in _flat(args, kwargs):
                p = self.params.get(id(a))
                if p is not None:
                    raise Unbatchable(f"parameter {p.name} is used by "
                                      f"{getattr(func, '__name__', func)}, which has no "
                                      f"grouped rule")
        return func(*args, **kwargs)

    # helpers
    def _get(self, t: torch.Tensor | None) -> _Param | None:
        return None if t is None else self.params.get(id(t))

    def _check_batch(self, x: torch.Tensor, what: str) -> None:
        if x.dim() == 0 or x.shape[0] != self.n:
            raise Unbatchable(f"{what}: the input's first dimension is {tuple(x.shape)[:1]}, "
                              f"not the batch ({self.n})")

    def _value(self, t: torch.Tensor) -> torch.Tensor:
        p = self._get(t)
        return t if p is None else p.leaf

    def _grouped_add(self, y: torch.Tensor, bias: torch.Tensor | None, channel_dim: int
                     ) -> torch.Tensor:
        """``y + b`` with ``b`` per group (``channel_dim`` of ``y`` is the bias's dim)."""
        if bias is None:
            return y
        p = self._get(bias)
        g = None if p is None else p.grouped()
        if g is None:
            b = self._value(bias)
            shape = [1] * y.dim()
            shape[channel_dim] = b.numel()
            return y + b.reshape(shape)
        yg = y.reshape(self.k, -1, *y.shape[1:])
        shape = [self.k] + [1] * (yg.dim() - 1)
        shape[channel_dim + 1] = g.shape[1]
        return (yg + g.reshape(shape).to(y.dtype)).reshape(y.shape)

    def _grouped_mul(self, y: torch.Tensor, weight: torch.Tensor | None, channel_dims: int,
                     first: int) -> torch.Tensor:
        """``y * w`` with ``w`` spanning dims ``first .. first + channel_dims`` of ``y``."""
        if weight is None:
            return y
        p = self._get(weight)
        g = None if p is None else p.grouped()
        tail = y.dim() - first - channel_dims
        if g is None:
            w = self._value(weight)
            return y * w.reshape(tuple(w.shape) + (1,) * tail)
        yg = y.reshape(self.k, -1, *y.shape[1:])
        shape = (self.k,) + (1,) * (first) + tuple(g.shape[1:]) + (1,) * tail
        return (yg * g.reshape(shape).to(y.dtype)).reshape(y.shape)

    # rules
    def _linear(self, x, weight, bias=None):
        p, pb = self._get(weight), self._get(bias)
        if p is not None and p.per_group is not None and (pb is None or pb.per_group is None):
            self._check_batch(x, "linear")
            b = None if bias is None else (bias if pb is None else pb.leaf)
            # pop: a weight used twice (tied) must not reuse the buffer of its first use
            return _LinearAscent.apply(x, p.leaf, b, self.k, self.workspace.pop(id(weight), None),
                                       None if pb is None else pb.stacked, *p.per_group)
        if p is not None and p.points is not None and (pb is None or pb.points is None):
            self._check_batch(x, "linear")
            bpoints = None
            if pb is not None and pb.offsets is not None:
                bpoints = pb.offsets + pb.leaf.detach()
            b = None if bias is None else (bias if pb is None else pb.leaf)
            return _LinearDescent.apply(x, p.leaf, b, self.k, bpoints, *p.points)
        if p is None:
            y = F.linear(x, weight)
        else:
            self._check_batch(x, "linear")
            g = p.grouped()
            if g is None:
                y = F.linear(x, p.leaf)
            else:
                y = torch.matmul(x.reshape(self.k, -1, x.shape[-1]), g.transpose(1, 2))
                y = y.reshape(*x.shape[:-1], g.shape[1])
        if bias is not None and self._get(bias) is not None:
            self._check_batch(x, "linear")
        return self._grouped_add(y, bias, y.dim() - 1)

    def _conv(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        conv = F.conv1d if x.dim() == 3 else F.conv2d
        p = self._get(weight)
        g = None if p is None else p.grouped()
        if g is None:
            if self._get(bias) is not None and self._get(bias).grouped() is not None:
                self._check_batch(x, "conv")
            y = conv(x, self._value(weight), None, stride, padding, dilation, groups)
            return self._grouped_add(y, bias, 1)
        self._check_batch(x, "conv")
        k, b = self.k, x.shape[0] // self.k
        xs = x.reshape(k, b, *x.shape[1:]).transpose(0, 1).reshape(b, k * x.shape[1],
                                                                     *x.shape[2:])
        wg = g.to(x.dtype).reshape(k * g.shape[1], *g.shape[2:])
        y = conv(xs, wg, None, stride, padding, dilation, groups * k)
        y = y.reshape(b, k, -1, *y.shape[2:]).transpose(0, 1).reshape(k * b, -1, *y.shape[2:])
        return self._grouped_add(y, bias, 1)

    def _embedding(self, ids, weight, padding_idx=None, max_norm=None, norm_type=2.0,
                   scale_grad_by_freq=False, sparse=False):
        p = self._get(weight)
        if max_norm is not None or scale_grad_by_freq or sparse:
            if p is not None:
                raise Unbatchable("embedding with max_norm / scale_grad_by_freq / sparse")
        g = None if p is None else p.grouped()
        if g is None:
            return F.embedding(ids, self._value(weight), padding_idx, max_norm, norm_type,
                               scale_grad_by_freq, sparse)
        self._check_batch(ids, "embedding")
        k, v = self.k, g.shape[1]
        shift = (torch.arange(k, device=ids.device) * v).reshape((k,) + (1,) * ids.dim())
        flat = (ids.reshape(k, -1, *ids.shape[1:]) + shift).reshape(ids.shape)
        out = F.embedding(flat, g.reshape(k * v, *g.shape[2:]))
        if padding_idx is not None:
            pad = padding_idx if padding_idx >= 0 else padding_idx + v
            out = torch.where((ids == pad).unsqueeze(-1), out.detach(), out)
        return out

    def _layer_norm(self, x, normalized_shape, weight=None, bias=None, eps=1e-5):
        grouped = self._get(weight) is not None or self._get(bias) is not None
        if grouped:
            self._check_batch(x, "layer_norm")
        y = F.layer_norm(x, normalized_shape, None, None, eps)
        first = x.dim() - len(normalized_shape)
        y = self._grouped_mul(y, weight, len(normalized_shape), first)
        if bias is None:
            return y
        if self._get(bias) is None or self._get(bias).grouped() is None:
            return y + self._value(bias)
        g = self._get(bias).grouped()
        yg = y.reshape(self.k, -1, *y.shape[1:])
        shape = (self.k,) + (1,) * first + tuple(g.shape[1:])
        return (yg + g.reshape(shape).to(y.dtype)).reshape(y.shape)

    def _group_norm(self, x, num_groups, weight=None, bias=None, eps=1e-5):
        if self._get(weight) is not None or self._get(bias) is not None:
            self._check_batch(x, "group_norm")
        y = F.group_norm(x, num_groups, None, None, eps)
        y = self._grouped_mul(y, weight, 1, 1)
        return self._grouped_add(y, bias, 1)

    def _batch_norm(self, x, running_mean, running_var, weight=None, bias=None,
                    training=False, momentum=0.1, eps=1e-5):
        grouped = self._get(weight) is not None or self._get(bias) is not None
        if training:
            self._check_batch(x, "batch_norm")
            k, b, c = self.k, x.shape[0] // self.k, x.shape[1]
            slot = self.bn_buffers.get(id(running_mean)) if running_mean is not None else None
            rm = rv = None
            if running_mean is not None:
                if slot is None:
                    raise Unbatchable("batch_norm with running statistics the step does not "
                                      "manage")
                rm, rv = slot.fresh()
            xs = x.reshape(k, b, *x.shape[1:]).transpose(0, 1).reshape(b, k * c, *x.shape[2:])
            y = F.batch_norm(xs, rm, rv, None, None, True, momentum, eps)
            y = y.reshape(b, k, c, *x.shape[2:]).transpose(0, 1).reshape(x.shape)
        else:
            if grouped:
                self._check_batch(x, "batch_norm")
            y = F.batch_norm(x, running_mean, running_var, None, None, False, momentum, eps)
        y = self._grouped_mul(y, weight, 1, 1)
        return self._grouped_add(y, bias, 1)


def _flat(args: Any, kwargs: dict) -> list[torch.Tensor]:
    """Every tensor in a call's (nested) arguments."""
    out: list[torch.Tensor] = []
    stack = [args, tuple(kwargs.values())]
    while stack:
        a = stack.pop()
        if isinstance(a, (list, tuple)):
            stack.extend(a)
        elif isinstance(a, torch.Tensor):
            out.append(a)
    return out


class _BNSlot:
    """One managed BatchNorm module in a batched pass: stacked scratch statistics."""

    def __init__(self, record: Any, k: int) -> None:
        self.record, self.k = record, k
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def fresh(self) -> tuple[torch.Tensor, torch.Tensor]:
        mod = self.record.module
        rm = mod._buffers["running_mean"].detach().repeat(self.k)
        rv = mod._buffers["running_var"].detach().repeat(self.k)
        self.last = (rm, rv)  # a module called twice contributes its last call
        return rm, rv


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
        batch = _concat([ctx.micro_batches[j][0] for j in idx])
        n = batch_size(batch)
        names = {id(p): nm for nm, p in model.named_parameters(remove_duplicate=False)}
        pert = {i: col for col, i in enumerate(ctx.perturbed)}
        params: dict[int, _Param] = {}
        leaves: list[torch.Tensor] = []
        for i, p in enumerate(ctx.params):
            if id(p) not in names:
                raise Unbatchable("an optimized parameter does not belong to model")
            w = p.detach()
            if ascent:
                entry = params[id(p)] = _Param(names[id(p)], w)
                if i not in pert:
                    continue
                if w.dim() == 2:
                    entry.per_group = [p.detach().requires_grad_() for _ in range(k)]
                    leaves.extend(entry.per_group)
                else:
                    entry.stacked = w.unsqueeze(0).expand((k,) + tuple(w.shape))
                    leaves.append(entry.stacked.requires_grad_())
                continue
            entry = params[id(p)] = _Param(names[id(p)], p.detach().requires_grad_())
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
                bn_slots[id(rec.module._buffers["running_mean"])] = _BNSlot(rec, k)
            mode = _GroupedMode(params, k, n, bn_slots,
                                self._workspace(ctx, k) if ascent else None)
            fresh_autocast()
            with torch.enable_grad(), mode:
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
        from msam.strategies.auto import config_key

        # Once per model and configuration: loss_fn is often a new closure each step, so it
        # is not part of the key (a loss_fn changed later is not re-checked).
        key = (config_key(ctx), len(idx), id(ctx.model))
        if key in self._checked:
            return
        model = ctx.model
        assert model is not None
        batch = _concat([ctx.micro_batches[j][0] for j in idx])
        n = batch_size(batch)
        dev = ctx.params[0].device
        with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda"
                                                    else []):
            state = torch.random.get_rng_state()
            names = {id(p): nm for nm, p in model.named_parameters(remove_duplicate=False)}
            shared = {id(p): _Param(names.get(id(p), "?"), p.detach()) for p in ctx.params}
            with ctx.bn.pass_(record=False):
                slots = {id(rec.module._buffers["running_mean"]): _BNSlot(rec, len(idx))
                         for rec in ctx.bn.records.values()}
                with _GroupedMode(shared, len(idx), n, slots):  # BatchNorm per micro-batch
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
        if not math.isclose(whole, parts, rel_tol=tol, abs_tol=tol) or not math.isfinite(whole):
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


def _concat(batches: list[Any]) -> Any:
    """The micro-batches one after another along the batch dimension."""
    if len(batches) == 1:
        return batches[0]
    return map_tensors(lambda t: t.flatten(0, 1), stack_batches(batches))
