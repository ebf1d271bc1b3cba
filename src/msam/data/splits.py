"""Seeded splitting utilities and the symmetric label-noise corruption.

* :func:`stratified_split` takes an exact number of examples while keeping class proportions
  (largest-remainder allocation), used for ``train_subset``, validation carving and the fixed
  test splits of datasets without an official one.
* :func:`group_split` keeps whole groups together (e.g. all reviews of one movie), so that no
  group leaks between the two sides.
* :func:`add_symmetric_label_noise` implements the noisy-label setting of the SAM paper (Foret
  et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021,
  Section 3.3, following Jiang et al., 2018 / Zhang et al., 2017): a fixed fraction of the
  training labels is replaced by a uniformly random *different* class.
"""

from __future__ import annotations

import torch

from ._seeding import make_generator

__all__ = ["add_symmetric_label_noise", "group_split", "stratified_split"]


def _check_count(n_take: int, n: int, what: str) -> None:
    if isinstance(n_take, bool) or not isinstance(n_take, int):
        raise TypeError(f"{what} must be an int, got {type(n_take).__name__}")
    if not 0 <= n_take <= n:
        raise ValueError(f"{what} must be between 0 and {n}, got {n_take}")


def stratified_split(
    y: torch.Tensor, n_take: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices ``0..N-1`` into ``(taken, rest)`` with exactly ``n_take`` taken.

    Each class ``k`` with ``c_k`` examples contributes ``floor(n_take * c_k / N)`` examples,
    and the leftover slots go to the classes with the largest fractional parts (ties: lower
    class id), so class proportions are preserved as closely as possible.  Which examples of a
    class are taken is drawn from ``generator``.  Both outputs are sorted ascending.
    """
    y = torch.as_tensor(y).flatten()
    n = int(y.numel())
    _check_count(n_take, n, "n_take")
    classes, counts = torch.unique(y, sorted=True, return_counts=True)
    exact = [n_take * int(c) / n for c in counts] if n else []
    quota = [int(e) for e in exact]
    leftover = n_take - sum(quota)
    order = sorted(range(len(quota)), key=lambda k: (-(exact[k] - quota[k]), k))
    for k in order[:leftover]:
        quota[k] += 1
    taken = []
    for cls, q in zip(classes.tolist(), quota):
        members = (y == cls).nonzero().flatten()
        perm = torch.randperm(members.numel(), generator=generator)
        taken.append(members[perm[:q]])
    take = torch.cat(taken) if taken else torch.empty(0, dtype=torch.int64)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[take] = True
    return mask.nonzero().flatten(), (~mask).nonzero().flatten()


def group_split(
    groups: torch.Tensor, n_target: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into ``(taken, rest)`` keeping every group on one side.

    Groups are visited in a random order drawn from ``generator`` and taken whole until at
    least ``n_target`` examples are taken (so the taken side may slightly exceed the target).
    If that would leave the other side empty, the last group is not taken.  Outputs are sorted.
    """
    groups = torch.as_tensor(groups).flatten()
    n = int(groups.numel())
    _check_count(n_target, n, "n_target")
    uniq, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    chosen = torch.zeros(uniq.numel(), dtype=torch.bool)
    total = 0
    for g in torch.randperm(uniq.numel(), generator=generator).tolist():
        if total >= n_target:
            break
        if total + int(counts[g]) >= n and total > 0:
            break
        chosen[g] = True
        total += int(counts[g])
    mask = chosen[inverse]
    return mask.nonzero().flatten(), (~mask).nonzero().flatten()


def add_symmetric_label_noise(
    y: torch.Tensor, num_classes: int, rate: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace exactly ``round(rate * N)`` labels by a uniformly random different class.

    The positions to corrupt are a uniformly random subset drawn from a generator derived from
    ``seed``; each corrupted label becomes ``(y + s) mod num_classes`` with ``s`` uniform in
    ``1..num_classes-1``, i.e. uniform over the *other* classes, so every flipped label really
    changes.  Returns ``(noisy_y, flipped_mask)``; ``y`` itself is not modified.
    """
    y = torch.as_tensor(y)
    if y.dim() != 1:
        raise ValueError(f"y must be one-dimensional, got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"y must be an integer tensor, got dtype {y.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate (label_noise) must be in [0, 1], got {rate}")
    n = int(y.numel())
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels in y must lie in [0, {num_classes}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    n_flip = int(round(rate * n))
    noisy = y.clone().to(torch.int64)
    mask = torch.zeros(n, dtype=torch.bool)
    if n_flip == 0:
        return noisy, mask
    if num_classes < 2:
        raise ValueError("label noise needs num_classes >= 2 (no different class to flip to)")
    gen = make_generator(seed, "symmetric-label-noise")
    where = torch.randperm(n, generator=gen)[:n_flip]
    shift = torch.randint(1, num_classes, (n_flip,), generator=gen)
    noisy[where] = (noisy[where] + shift) % num_classes
    mask[where] = True
    return noisy, mask
