"""In-memory dataset containers.

The experiments in this project (SAM / mSAM on small vision and text benchmarks) use datasets
that fit comfortably in memory, so a dataset is simply a pair of arrays: inputs ``x`` and
integer labels ``y``.  Keeping everything as tensors (or a list of strings for text) lets
:func:`msam.data.iterate_batches` slice batches with a single indexing operation and makes the
batch order a pure function of ``(seed, epoch)`` without any DataLoader worker state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ArrayDataset", "DatasetSplits"]


def _as_index(idx: Any, n: int) -> torch.Tensor:
    """Convert ``idx`` to an int64 index tensor, checking bounds against ``n``."""
    index = torch.as_tensor(idx)
    if index.dtype == torch.bool:
        if index.shape != (n,):
            raise ValueError(f"boolean idx must have shape ({n},), got {tuple(index.shape)}")
        return index.nonzero().flatten()
    if index.dtype.is_floating_point or index.dtype.is_complex:
        raise TypeError(f"idx must be an integer or boolean tensor, got dtype {index.dtype}")
    index = index.to(torch.int64).flatten()
    if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
        raise IndexError(f"idx out of range for a dataset of length {n}")
    return index


@dataclass
class ArrayDataset:
    """An in-memory dataset of inputs ``x`` and int64 labels ``y``.

    ``x`` is a float32 tensor ``(N, C, H, W)`` for images (already normalised per channel with
    training-set statistics) or a ``list[str]`` for text.  ``y`` has shape ``(N,)``.
    """

    x: torch.Tensor | list[str]
    y: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(self.y).__name__}")
        if self.y.dim() != 1:
            raise ValueError(f"y must be one-dimensional, got shape {tuple(self.y.shape)}")
        if self.y.dtype != torch.int64:
            raise TypeError(f"y must have dtype torch.int64, got {self.y.dtype}")
        if isinstance(self.x, torch.Tensor):
            if self.x.dim() < 1:
                raise ValueError("x must have a leading example dimension")
            n_x = self.x.shape[0]
        elif isinstance(self.x, list):
            if not all(isinstance(s, str) for s in self.x):
                raise TypeError("x given as a list must contain only str")
            n_x = len(self.x)
        else:
            raise TypeError(f"x must be a torch.Tensor or list[str], got {type(self.x).__name__}")
        if n_x != self.y.shape[0]:
            raise ValueError(f"x has {n_x} examples but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def is_text(self) -> bool:
        """True when ``x`` is a list of strings."""
        return isinstance(self.x, list)

    def subset(self, idx: torch.Tensor) -> ArrayDataset:
        """Return a new dataset holding the examples at ``idx`` (int or bool tensor), in order."""
        index = _as_index(idx, len(self))
        if isinstance(self.x, list):
            x: torch.Tensor | list[str] = [self.x[i] for i in index.tolist()]
        else:
            x = self.x[index]
        return ArrayDataset(x=x, y=self.y[index])


@dataclass
class DatasetSplits:
    """Train / (optional) validation / test splits of one dataset plus its description.

    ``meta`` records provenance and preprocessing: the source path, the fixed test-split seed,
    normalisation mean/std, label-noise counts and masks, group (movie) ids for text, class
    names.  See ``docs/data.md`` for the keys.
    """

    name: str
    train: ArrayDataset
    val: ArrayDataset | None
    test: ArrayDataset
    num_classes: int
    input_shape: tuple
    modality: str
    meta: dict = field(default_factory=dict)
