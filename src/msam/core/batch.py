"""Splitting a mini-batch into micro-batches.

A batch is a tensor, or a (nested) tuple / list / dict whose tensor leaves all share their size
along dim 0 (the example dimension). Non-tensor leaves (``None``, numbers, strings) are handed to
every micro-batch unchanged. Splitting uses :func:`torch.tensor_split`, so with ``n`` examples and
``m`` micro-batches the sizes differ by at most one and the larger ones come first.

mSAM (Behdin et al. 2023) gives each micro-batch ``j`` the weight ``n_j / n``, so that averaging
the per-micro-batch mean-loss gradients reproduces the full-batch mean-loss gradient exactly
when ``rho = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "batch_size",
    "map_tensors",
    "resolve_micro_batches",
    "split_batch",
    "stack_batches",
    "tensor_leaves",
]


def tensor_leaves(batch: Any, path: str = "batch") -> list[tuple[str, torch.Tensor]]:
    """All tensor leaves of ``batch`` with a readable path (``batch[0]``, ``batch['ids']``)."""
    if isinstance(batch, torch.Tensor):
        return [(path, batch)]
    if isinstance(batch, Mapping):
        out: list[tuple[str, torch.Tensor]] = []
        for key, value in batch.items():
            out.extend(tensor_leaves(value, f"{path}[{key!r}]"))
        return out
    if isinstance(batch, (tuple, list)):
        out = []
        for i, value in enumerate(batch):
            out.extend(tensor_leaves(value, f"{path}[{i}]"))
        return out
    return []


def _same_type(x: Any) -> Any:
    """``type(x)`` as a constructor (for mappings: ``type(x)(pairs)``), untyped on purpose."""
    return type(x)


def map_tensors(fn: Callable[[torch.Tensor], Any], batch: Any) -> Any:
    """Apply ``fn`` to every tensor leaf, keeping the structure (namedtuples included)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return _same_type(batch)((k, map_tensors(fn, v)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(fn, v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(fn, v) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    """The common dim-0 size of the tensor leaves of ``batch``.

    Raises ``ValueError`` naming the offending leaf when there is no tensor, a 0-d tensor, or
    leaves of different sizes.
    """
    leaves = tensor_leaves(batch)
    if not leaves:
        raise ValueError("batch: contains no tensor to split along dim 0")
    sizes = {}
    for path, t in leaves:
        if t.dim() == 0:
            raise ValueError(f"batch: {path} is a 0-d tensor; every tensor needs an example dim 0")
        sizes[path] = t.shape[0]
    first_path, n = leaves[0][0], leaves[0][1].shape[0]
    for path, size in sizes.items():
        if size != n:
            raise ValueError(
                f"batch: tensors differ in dim-0 size ({first_path} has {n}, {path} has {size}); "
                "all tensors in one batch must hold the same examples"
            )
    return n


def resolve_micro_batches(n: int, micro_batches: int | None, micro_batch_size: int | None) -> int:
    """Number of micro-batches for a batch of ``n`` examples.

    ``micro_batch_size=s`` gives ``ceil(n / s)`` micro-batches, so none holds more than ``s``
    examples (sizes still differ by at most one).
    """
    if micro_batch_size is not None:
        m = math.ceil(n / micro_batch_size)
    else:
        m = 1 if micro_batches is None else micro_batches
    if n < m:
        raise ValueError(
            f"batch: has {n} examples, fewer than micro_batches={m}; every micro-batch needs at "
            "least one example"
        )
    return m


def _split_leaf(x: Any, m: int) -> Sequence[Any]:
    if isinstance(x, torch.Tensor):
        return torch.tensor_split(x, m, dim=0)
    if isinstance(x, Mapping):
        parts = {k: _split_leaf(v, m) for k, v in x.items()}
        return [_same_type(x)((k, parts[k][j]) for k in x) for j in range(m)]
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        fields = [_split_leaf(v, m) for v in x]
        return [type(x)(*(p[j] for p in fields)) for j in range(m)]
    if isinstance(x, (tuple, list)):
        items = [_split_leaf(v, m) for v in x]
        return [type(x)(p[j] for p in items) for j in range(m)]
    return [x] * m


def split_batch(batch: Any, m: int) -> list[tuple[Any, int]]:
    """Split ``batch`` into ``m`` micro-batches; returns ``[(micro_batch, n_j), ...]``."""
    n = batch_size(batch)
    if m < 1:
        raise ValueError(f"micro_batches must be >= 1, got {m}")
    if n < m:
        raise ValueError(
            f"batch: has {n} examples, fewer than micro_batches={m}; every micro-batch needs at "
            "least one example"
        )
    if m == 1:
        return [(batch, n)]
    parts = _split_leaf(batch, m)
    sizes = [t.shape[0] for t in torch.tensor_split(torch.empty(n, 0), m, dim=0)]
    return list(zip(parts, sizes))


def stack_batches(batches: Sequence[Any]) -> Any:
    """Stack equally sized micro-batches along a new leading dim (for ``torch.func.vmap``)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(batches))
    if isinstance(first, Mapping):
        return _same_type(first)((k, stack_batches([b[k] for b in batches])) for k in first)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(stack_batches([b[i] for b in batches]) for i in range(len(first))))
    if isinstance(first, (tuple, list)):
        return type(first)(stack_batches([b[i] for b in batches]) for i in range(len(first)))
    return first
