"""The grouped-layer machinery shared by the ``batched`` and ``lowrank`` strategies.

One forward of the model's own code over ``k`` concatenated, equally sized micro-batches
(micro-batch ``j`` in rows ``j b .. (j + 1) b - 1``) in which each parametrised layer gives
micro-batch ``j`` its own parameters: :class:`GroupedMode` (a
:class:`torch.overrides.TorchFunctionMode`) replaces the functional calls that receive a
parameter (``F.linear``, ``F.conv1d`` / ``conv2d``, ``F.embedding``, ``F.layer_norm``,
``F.group_norm``, ``F.batch_norm``) by their grouped rule; :class:`GroupedParam` says how one
parameter enters the pass (shared, per-group leaves for the ascent, points ``w + e_j`` for the
descent); :class:`BNSlot` holds a BatchNorm module's stacked scratch statistics;
:func:`concat_batches` puts the micro-batches one after another; :func:`config_key` names a
step's configuration (what ``auto``'s choice, the ``batched`` loss-contract check and the
``lowrank`` fallbacks are kept per). A model or loss the rules cannot run raises
:class:`Unbatchable`. See :mod:`msam.strategies.batched` for the rules' maths and memory.

This module depends on no other strategy; ``batched``, ``lowrank`` and ``auto`` depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from msam.core.batch import map_tensors, stack_batches, tensor_leaves
from msam.strategies.base import StepContext

__all__ = [
    "BNSlot", "GroupedMode", "GroupedParam", "Unbatchable", "concat_batches", "config_key",
    "flat_tensors", "unsupported_modules",
]


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


class GroupedParam:
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


class GroupedMode(TorchFunctionMode):
    """Replaces the functional calls that receive a parameter by their grouped rule."""

    def __init__(self, params: dict[int, GroupedParam], k: int, n: int,
                 bn_buffers: dict[int, Any],
                 workspace: dict[int, list[torch.Tensor]] | None = None) -> None:
        super().__init__()
        self.params, self.k, self.n = params, k, n
        self.workspace = workspace or {}  # id(weight) -> k gradient buffers (ascent)
        self.bn_buffers = bn_buffers     # id(running_mean scratch) -> BNSlot
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
            for a in flat_tensors(args, kwargs):
                p = self.params.get(id(a))
                if p is not None:
                    raise Unbatchable(f"parameter {p.name} is used by "
                                      f"{getattr(func, '__name__', func)}, which has no "
                                      f"grouped rule")
        return func(*args, **kwargs)

    # helpers
    def _get(self, t: torch.Tensor | None) -> GroupedParam | None:
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


def flat_tensors(args: Any, kwargs: dict) -> list[torch.Tensor]:
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


class BNSlot:
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


def concat_batches(batches: list[Any]) -> Any:
    """The micro-batches one after another along the batch dimension."""
    if len(batches) == 1:
        return batches[0]
    return map_tensors(lambda t: t.flatten(0, 1), stack_batches(batches))


def config_key(ctx: StepContext) -> str:
    """What a per-configuration decision depends on (parameter shapes and dtypes, micro-batch
    shapes, number of micro-batches, device, CPU thread count, perturbed subset), as a string
    (``auto`` saves it in ``state_dict``)."""
    shapes = tuple((tuple(p.shape), str(p.dtype)) for p in ctx.params)
    leaves = tuple((path, tuple(t.shape), str(t.dtype))
                   for path, t in tensor_leaves(ctx.micro_batches[0][0]))
    device = ctx.params[0].device
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return repr((shapes, leaves, len(ctx.micro_batches), str(device), threads,
                 tuple(ctx.perturbed)))
