"""Shared helpers of :mod:`msam.analysis`.

Conventions used by every measurement in this package:

* ``model`` is a :class:`torch.nn.Module`; the *parameters* are the ones with
  ``requires_grad=True`` (in ``model.parameters()`` order).
* ``loss_fn(model, batch)`` returns the scalar **mean** loss of ``batch``.
* ``batches`` is a list of batches. A batch is a tensor, or a (nested) tuple / list / dict of
  tensors; its size is ``dim 0`` of its first tensor leaf (depth-first, dict values in insertion
  order). The loss of interest is the example-weighted mean over all batches,
  ``L(w) = sum_b n_b L_b(w) / sum_b n_b``.

Nothing here performs I/O.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]

__all__ = [
    "LossFn",
    "batch_size",
    "split_batch",
    "trainable_parameters",
]


# --------------------------------------------------------------------------------------------
# parameters and flat vectors
# --------------------------------------------------------------------------------------------
def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the analysis acts on: ``requires_grad=True``, in ``parameters()`` order."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters with requires_grad=True")
    return params


def num_parameters(params: Sequence[Tensor]) -> int:
    return sum(p.numel() for p in params)


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one 1-D tensor (copies)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a 1-D tensor into tensors shaped like ``like`` (views of ``vector``)."""
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[offset : offset + n].view_as(t))
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, parameters have {offset}")
    return out


def as_param_list(vector: Tensor | Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    """Accept either a list of parameter-shaped tensors or one flat tensor; return a list."""
    if isinstance(vector, Tensor):
        if vector.dim() != 1:
            raise ValueError("a tensor vector must be 1-D (flattened over all parameters)")
        vector = vector.to(device=params[0].device, dtype=params[0].dtype)
        return unflatten(vector, params)
    vector = list(vector)
    if len(vector) != len(params):
        raise ValueError(f"vector has {len(vector)} tensors, model has {len(params)} parameters")
    out = []
    for v, p in zip(vector, params):
        if v.shape != p.shape:
            raise ValueError(f"vector entry of shape {tuple(v.shape)} != parameter {p.shape}")
        out.append(v.to(device=p.device, dtype=p.dtype))
    return out


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator: random draws are identical whatever the model's device."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def rademacher(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """A vector of ``n`` independent +-1 entries with the dtype/device of ``like``."""
    z = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8)
    return (z.to(like.dtype) * 2 - 1).to(like.device)


def gaussian(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    return z.to(dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------
def first_tensor(batch: Any) -> Tensor | None:
    """First tensor leaf of a batch (depth-first; dict values in insertion order)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, (tuple, list)):
        items = batch
    else:
        return None
    for item in items:
        t = first_tensor(item)
        if t is not None:
            return t
    return None


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: ``dim 0`` of its first tensor leaf."""
    t = first_tensor(batch)
    if t is None or t.dim() == 0:
        raise ValueError("cannot infer the batch size: no tensor leaf with at least one dimension")
    return int(t.shape[0])


def split_batch(batch: Any, m: int) -> list[Any]:
    """Split a batch into micro-batches of ``m`` examples along ``dim 0`` (last may be smaller).

    Every tensor leaf whose ``dim 0`` equals the batch size is split; other leaves (scalars,
    tensors of another length, non-tensors) are shared by all micro-batches. Tuples, lists,
    named tuples and dicts keep their type.
    """
    if m < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {m}")
    n = batch_size(batch)
    k = math.ceil(n / m)

    def _split(x: Any) -> list[Any]:
        if isinstance(x, Tensor):
            if x.dim() >= 1 and x.shape[0] == n:
                return list(torch.split(x, m, dim=0))
            return [x] * k
        if isinstance(x, dict):
            parts = {key: _split(val) for key, val in x.items()}
            return [type(x)((key, parts[key][i]) for key in x) for i in range(k)]
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # named tuple
            parts_nt = [_split(v) for v in x]
            return [type(x)(*(p[i] for p in parts_nt)) for i in range(k)]
        if isinstance(x, (tuple, list)):
            parts_seq = [_split(v) for v in x]
            return [type(x)(p[i] for p in parts_seq) for i in range(k)]
        return [x] * k

    return _split(batch)


def as_batch_list(batches: Any) -> list[Any]:
    """Materialise ``batches`` as a non-empty list (the measurements iterate over it often)."""
    if isinstance(batches, (Tensor, dict)):
        raise TypeError("batches must be a list of batches, not a single batch")
    out = list(batches)
    if not out:
        raise ValueError("batches is empty")
    return out


def batch_weights(batches: Sequence[Any]) -> tuple[list[float], int]:
    """Example weights ``n_b / N`` of each batch and the total number of examples ``N``."""
    sizes = [batch_size(b) for b in batches]
    total = sum(sizes)
    if total == 0:
        raise ValueError("batches contain no examples")
    return [s / total for s in sizes], total


def check_scalar(loss: Tensor) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn(model, batch) must return a scalar tensor (the mean loss)")
    return loss.reshape(())


# --------------------------------------------------------------------------------------------
# model state safety
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in ``eval()`` mode, restoring every submodule's own flag afterwards.

    The measurements treat the loss as a fixed, deterministic function of the weights: with
    dropout active, or with BatchNorm normalising by the statistics of the current batch (and
    updating its running buffers on every forward pass), the "Hessian" of one call would not
    be the Hessian of the next, finite differences would mix weight changes with noise, and
    running statistics would silently change. ``eval()`` makes BatchNorm use its running
    statistics and turns dropout off. The per-module flags are restored (not just
    ``model.train(old)``), so mixed-mode models come back exactly as they were.
    """
    flags = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for mod, flag in flags:
            mod.training = flag


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[list[Tensor]]:
    """Save copies of all parameters and buffers; restore them bit-exactly on exit.

    Yields the saved copies of the trainable parameters (the base point ``w``). Restoration
    copies the saved tensors back (``copy_``) instead of subtracting perturbations, so the
    weights are bit-identical afterwards whatever arithmetic happened in between.
    """
    params = trainable_parameters(model)
    saved_all = [(t, t.detach().clone()) for t in model.parameters()]
    saved_all += [(b, b.detach().clone()) for b in model.buffers()]
    base = [p.detach().clone() for p in params]
    try:
        yield base
    finally:
        with torch.no_grad():
            for t, s in saved_all:
                t.copy_(s)


def set_params(params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


# --------------------------------------------------------------------------------------------
# loss and gradient over all batches
# --------------------------------------------------------------------------------------------
def mean_loss(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any]) -> float:
    """Example-weighted mean loss over ``batches`` (no graph is built)."""
    weights, _ = batch_weights(batches)
    total = 0.0
    with torch.no_grad():
        for batch, w in zip(batches, weights):
            total += w * float(check_scalar(loss_fn(model, batch)).double())
    return total


def loss_and_grad(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    params: Sequence[Tensor],
) -> tuple[float, list[Tensor]]:
    """Example-weighted mean loss and its gradient w.r.t. ``params`` (one batch in memory)."""
    weights, _ = batch_weights(batches)
    grads = [torch.zeros_like(p) for p in params]
    total = 0.0
    with torch.enable_grad():
        for batch, w in zip(batches, weights):
            loss = check_scalar(loss_fn(model, batch))
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(grads, gs):
                if g is not None:
                    acc.add_(g, alpha=w)
            total += w * float(loss.detach().double())
    return total, grads


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(dot(a, a))
