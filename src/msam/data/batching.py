"""Reproducible mini-batch iteration and CIFAR-style augmentation in plain torch.

The batch order of epoch ``e`` is a pure function of ``(seed, e)``: the permutation comes from
a fresh :class:`torch.Generator` seeded from both, and the augmentation of batch ``b`` from a
generator seeded from ``(seed, e, b)``.  A run resumed from a checkpoint at ``(epoch,
start_batch)`` therefore sees exactly the batches (and augmented pixels) the uninterrupted run
would have seen, with no RNG state to save.

:func:`random_crop_flip` is the standard CIFAR augmentation (zero-pad by 4, random 32x32 crop,
random horizontal flip; He et al., "Deep Residual Learning for Image Recognition", CVPR 2016)
that the SAM / mSAM CIFAR experiments use ("basic augmentations"; Foret et al., ICLR 2021;
Behdin et al., "mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization", 2023).  It is
vectorised with one gather instead of a Python loop and needs no torchvision.  Padding happens
on the already-normalised tensor, so the pad value 0 equals the channel mean.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ._seeding import make_generator
from .containers import ArrayDataset

__all__ = ["iterate_batches", "num_batches", "random_crop_flip"]


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def num_batches(dataset: ArrayDataset | int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches per epoch for ``dataset`` (or a length) with ``batch_size``."""
    _check_batch_size(batch_size)
    n = dataset if isinstance(dataset, int) else len(dataset)
    return n // batch_size if drop_last else -(-n // batch_size)


def random_crop_flip(
    x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True
) -> torch.Tensor:
    """Zero-pad each image by ``pad``, crop a random ``H x W`` window, randomly mirror it.

    ``x`` is ``(N, C, H, W)``.  Random numbers are drawn from ``generator`` in this order:
    vertical offsets ``randint(0, 2*pad+1, (N,))``, horizontal offsets (same), then, if
    ``flip``, ``randint(0, 2, (N,))`` flip decisions (1 = mirror).  Returns a new tensor.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    n, c, h, w = x.shape
    gdev = generator.device
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(x.device)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    rows = top[:, None] + torch.arange(h, device=x.device)  # (N, H) rows of the padded image
    cols = left[:, None] + torch.arange(w, device=x.device)  # (N, W)
    if flip:
        mirror = torch.randint(0, 2, (n,), generator=generator, device=gdev).to(x.device)
        cols = torch.where(mirror[:, None].bool(), cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def iterate_batches(
    dataset: ArrayDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    augment: bool = False,
    drop_last: bool = False,
    start_batch: int = 0,
) -> Iterator[tuple[torch.Tensor | list[str], torch.Tensor]]:
    """Yield ``(x, y)`` batches of one epoch, reproducibly.

    With ``shuffle`` the order is ``randperm`` from a generator seeded by ``(seed, epoch)``;
    otherwise the stored order.  ``augment`` applies :func:`random_crop_flip` to image batches
    with a generator seeded by ``(seed, epoch, batch_index)``.  ``start_batch`` skips the first
    batches (for resuming mid-epoch); the remaining batches are identical to the ones a full
    pass yields.  For text datasets ``x`` is a ``list[str]``.
    """
    if not isinstance(dataset, ArrayDataset):
        raise TypeError(f"dataset must be an ArrayDataset, got {type(dataset).__name__}")
    _check_batch_size(batch_size)
    total = num_batches(dataset, batch_size, drop_last)
    if isinstance(start_batch, bool) or not isinstance(start_batch, int) \
            or not 0 <= start_batch <= total:
        raise ValueError(f"start_batch must be an int in [0, {total}], got {start_batch!r}")
    if augment and dataset.is_text:
        raise ValueError("augment=True is only supported for image datasets, not text")
    if augment and (not isinstance(dataset.x, torch.Tensor) or dataset.x.dim() != 4):
        raise ValueError("augment=True needs image inputs of shape (N, C, H, W)")
    n = len(dataset)
    if shuffle:
        order = torch.randperm(n, generator=make_generator(seed, "shuffle", epoch))
    else:
        order = torch.arange(n)
    for b in range(start_batch, total):
        idx = order[b * batch_size:(b + 1) * batch_size]
        y = dataset.y[idx]
        if isinstance(dataset.x, list):
            yield [dataset.x[i] for i in idx.tolist()], y
            continue
        x = dataset.x[idx]
        if augment:
            x = random_crop_flip(x, make_generator(seed, "augment", epoch, b))
        yield x, y
