"""Symmetric label noise, stratified / group splits, and the load_dataset option pipeline
(train_subset, val_fraction, label_noise, normalisation statistics, argument errors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msam.data import (
    DATASETS,
    ArrayDataset,
    add_symmetric_label_noise,
    group_split,
    load_dataset,
    stratified_split,
)

# ----------------------------------------------------------------------- label noise


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), k=st.integers(2, 12), rate=st.floats(0, 1), seed=st.integers(0, 99))
def test_noise_exact_count_and_always_different(n, k, rate, seed):
    y = torch.arange(n) % k
    noisy, mask = add_symmetric_label_noise(y, k, rate, seed)
    assert mask.dtype == torch.bool and noisy.dtype == torch.int64
    assert int(mask.sum()) == round(rate * n)
    assert torch.all(noisy[mask] != y[mask])
    assert torch.equal(noisy[~mask], y[~mask])
    assert noisy.min() >= 0 if n else True
    assert noisy.max() < k if n else True
    assert torch.equal(y, torch.arange(n) % k)  # input untouched


def test_noise_deterministic_per_seed():
    y = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    a = add_symmetric_label_noise(y, 10, 0.3, seed=5)
    b = add_symmetric_label_noise(y, 10, 0.3, seed=5)
    c = add_symmetric_label_noise(y, 10, 0.3, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_noise_new_labels_uniform_over_other_classes():
    k, n = 5, 20000
    y = torch.zeros(n, dtype=torch.int64)
    noisy, mask = add_symmetric_label_noise(y, k, 1.0, seed=0)
    counts = torch.bincount(noisy[mask], minlength=k).double()
    assert counts[0] == 0
    expected = n / (k - 1)
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # chi-square, 3 dof, p = 0.001


def test_noise_argument_errors():
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="rate"):
        add_symmetric_label_noise(y, 3, 1.5, 0)
    with pytest.raises(ValueError, match="must lie in"):
        add_symmetric_label_noise(y, 2, 0.5, 0)
    with pytest.raises(ValueError, match="num_classes"):
        add_symmetric_label_noise(torch.tensor([0, 0]), 1, 0.5, 0)
    with pytest.raises(TypeError):
        add_symmetric_label_noise(torch.tensor([0.0, 1.0]), 2, 0.5, 0)


# ----------------------------------------------------------------------- splits


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=6), frac=st.floats(0, 1),
       seed=st.integers(0, 50))
def test_stratified_split_exact_and_proportional(counts, frac, seed):
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]
    n_take = round(frac * len(y))
    take, rest = stratified_split(y, n_take, torch.Generator().manual_seed(seed))
    assert len(take) == n_take
    assert sorted(take.tolist() + rest.tolist()) == list(range(len(y)))
    for k, c in enumerate(counts):
        got = int((y[take] == k).sum())
        exact = n_take * c / len(y)
        assert math.floor(exact) <= got <= math.ceil(exact)


def test_group_split_keeps_groups_whole():
    groups = torch.repeat_interleave(torch.arange(30), torch.arange(1, 31))
    take, rest = group_split(groups, 100, torch.Generator().manual_seed(1))
    assert not set(groups[take].tolist()) & set(groups[rest].tolist())
    assert len(take) >= 100 and len(rest) > 0
    assert sorted(take.tolist() + rest.tolist()) == list(range(len(groups)))


# ----------------------------------------------------------------------- pipeline


def test_dataset_names():
    assert DATASETS == ("fashion_mnist", "mnist5k", "digits", "cifar10", "cifar100",
                        "rotten_tomatoes")
    with pytest.raises(ValueError, match="unknown dataset name 'imagenet'"):
        load_dataset("imagenet")


def test_pipeline_subset_val_noise_and_stats():
    base = load_dataset("digits")
    s = load_dataset("digits", train_subset=600, val_fraction=0.25, label_noise=0.4, seed=7)
    assert (len(s.train), len(s.val)) == (450, 150)
    meta = s.meta
    tr_idx, va_idx = meta["train_indices"], meta["val_indices"]
    assert not set(tr_idx.tolist()) & set(va_idx.tolist())
    # Label noise: exact counts on train and val, test untouched.
    assert meta["label_noise"] == {"rate": 0.4, "train_flipped": 180, "val_flipped": 60}
    assert torch.equal(s.train.y[~meta["train_noise_mask"]],
                       meta["train_clean_y"][~meta["train_noise_mask"]])
    assert torch.all(s.train.y[meta["train_noise_mask"]]
                     != meta["train_clean_y"][meta["train_noise_mask"]])
    assert torch.equal(s.test.y, base.test.y)
    # Clean labels are the source labels at the recorded indices (base has no subset).
    base_mean, base_std = base.meta["normalization"]["mean"][0], base.meta["normalization"][
        "std"][0]
    src_pixels = base.train.x * base_std + base_mean  # pixels / 16 of the full train split
    assert torch.equal(meta["train_clean_y"], base.train.y[tr_idx])
    # Stratified subset + carve: class counts follow the source proportions.
    src_counts = torch.bincount(base.train.y, minlength=10).double()
    sub_counts = torch.bincount(torch.cat([meta["train_clean_y"], meta["val_clean_y"]]),
                                minlength=10).double()
    assert torch.all((sub_counts - 600 * src_counts / src_counts.sum()).abs() <= 1)
    # Normalisation statistics come from the final training split only (numpy reference).
    ref = src_pixels[tr_idx].double().numpy()
    assert meta["normalization"]["mean"][0] == pytest.approx(ref.mean(), abs=1e-6)
    assert meta["normalization"]["std"][0] == pytest.approx(ref.std(), abs=1e-6)
    assert float(s.train.x.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(s.val.x.mean()) != pytest.approx(0.0, abs=1e-5)


def test_pipeline_deterministic_and_seed_dependent():
    a = load_dataset("digits", train_subset=300, val_fraction=0.2, label_noise=0.2, seed=1)
    b = load_dataset("digits", train_subset=300, val_fraction=0.2, label_noise=0.2, seed=1)
    c = load_dataset("digits", train_subset=300, val_fraction=0.2, label_noise=0.2, seed=2)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert torch.equal(a.val.y, b.val.y)
    assert not torch.equal(a.meta["train_indices"], c.meta["train_indices"])
    assert torch.equal(a.test.y, c.test.y)
    assert a.val is not None and load_dataset("digits").val is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(val_fraction=-0.1), "val_fraction"),
        (dict(label_noise=2.0), "label_noise"),
        (dict(train_subset=0), "train_subset"),
        (dict(train_subset=10**6), "train_subset"),
        (dict(train_subset=10, val_fraction=0.01), "val_fraction"),
    ],
)
def test_pipeline_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("digits", **kwargs)


def test_array_dataset_subset_and_validation():
    ds = ArrayDataset(torch.arange(12.0).view(6, 2), torch.arange(6))
    sub = ds.subset(torch.tensor([4, 1]))
    assert sub.y.tolist() == [4, 1] and sub.x.tolist() == [[8.0, 9.0], [2.0, 3.0]]
    text = ArrayDataset(["a", "b", "c"], torch.tensor([0, 1, 0]))
    assert text.subset(torch.tensor([True, False, True])).x == ["a", "c"]
    assert len(text) == 3 and text.is_text
    with pytest.raises(ValueError, match="examples"):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="int64"):
        ArrayDataset(torch.zeros(2, 2), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(IndexError):
        ds.subset(torch.tensor([6]))
    assert np.array_equal(ds.subset(torch.tensor([], dtype=torch.int64)).x.shape, (0, 2))
