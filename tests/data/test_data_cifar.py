"""CIFAR-10/100 from generated files in the original python-pickle format (folder and .tar.gz),
plus corrupted, truncated, malicious and missing inputs."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from msam.data import DatasetNotFoundError, load_dataset

PER_BATCH = 6


def _dump(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _cifar10_members(seed=0) -> tuple[dict[str, bytes], np.ndarray, list[int], np.ndarray, list]:
    rng = np.random.default_rng(seed)
    members, train_data, train_labels = {}, [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, PER_BATCH)]
        members[f"data_batch_{i}"] = _dump(
            {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels,
             b"data": data, b"filenames": [b"x.png"] * PER_BATCH})
        train_data.append(data)
        train_labels += labels
    test = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    test_labels = [1, 2, 3, 4]
    members["test_batch"] = _dump({b"batch_label": b"testing batch 1 of 1",
                                   b"labels": test_labels, b"data": test})
    names = [f"name{k}".encode() for k in range(10)]
    members["batches.meta"] = _dump({b"label_names": names, b"num_cases_per_batch": PER_BATCH,
                                     b"num_vis": 3072})
    return members, np.concatenate(train_data), train_labels, test, test_labels


def _cifar100_members(seed=0):
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (30, 3072), dtype=np.uint8)
    fine = [int(v) for v in rng.integers(0, 100, 30)]
    test = rng.integers(0, 256, (7, 3072), dtype=np.uint8)
    test_fine = [int(v) for v in rng.integers(0, 100, 7)]
    members = {
        "train": _dump({b"filenames": [b"a"] * 30, b"batch_label": b"training batch 1 of 1",
                        b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
                        b"data": train}),
        "test": _dump({b"filenames": [b"a"] * 7, b"batch_label": b"testing batch 1 of 1",
                       b"fine_labels": test_fine, b"coarse_labels": [f // 5 for f in test_fine],
                       b"data": test}),
        "meta": _dump({b"fine_label_names": [f"f{k}".encode() for k in range(100)],
                       b"coarse_label_names": [f"c{k}".encode() for k in range(20)]}),
    }
    return members, train, fine, test, test_fine


def _write_folder(root: Path, folder: str, members: dict[str, bytes]) -> Path:
    target = root / folder
    target.mkdir(parents=True)
    for name, blob in members.items():
        (target / name).write_bytes(blob)
    return target


def _write_archive(path: Path, folder: str, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        dir_info = tarfile.TarInfo(folder)
        dir_info.type = tarfile.DIRTYPE
        archive.addfile(dir_info)
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return path


def _denormalise(x: torch.Tensor, meta: dict) -> np.ndarray:
    mean = torch.tensor(meta["normalization"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["normalization"]["std"]).view(1, 3, 1, 1)
    return np.rint(((x.double() * std + mean) * 255.0).numpy()).astype(np.int64)


def _check_pixels(x: torch.Tensor, flat: np.ndarray, meta: dict) -> None:
    """Reference: CIFAR rows store the R plane, then G, then B, each 32x32 row-major."""
    pixels = _denormalise(x, meta)
    for n in range(flat.shape[0]):
        for c, i, j in [(0, 0, 0), (1, 5, 7), (2, 31, 31), (0, 31, 0), (2, 10, 20)]:
            assert pixels[n, c, i, j] == flat[n, c * 1024 + i * 32 + j]
    assert pixels.reshape(flat.shape[0], -1).tolist() == flat.astype(np.int64).tolist()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("MSAM_DATA", raising=False)


@pytest.mark.parametrize("layout", ["folder", "archive", "archive-path", "folder-path"])
def test_cifar10_layouts(tmp_path, layout):
    members, train, train_labels, test, test_labels = _cifar10_members()
    if layout.startswith("folder"):
        folder = _write_folder(tmp_path, "cifar-10-batches-py", members)
        data_dir = folder if layout == "folder-path" else tmp_path
    else:
        archive = _write_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py",
                                 members)
        data_dir = archive if layout == "archive-path" else tmp_path
    splits = load_dataset("cifar10", data_dir=data_dir)
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10
    assert splits.meta["class_names"] == [f"name{k}" for k in range(10)]
    assert splits.meta["format"] == layout.split("-")[0]
    assert splits.train.y.tolist() == train_labels
    assert splits.test.y.tolist() == test_labels
    assert splits.train.x.dtype == torch.float32
    _check_pixels(splits.train.x, train, splits.meta)
    _check_pixels(splits.test.x, test, splits.meta)
    ref = train.reshape(-1, 3, 1024).astype(np.float64) / 255.0
    np.testing.assert_allclose(splits.meta["normalization"]["mean"], ref.mean(axis=(0, 2)),
                               rtol=1e-9)
    np.testing.assert_allclose(splits.meta["normalization"]["std"], ref.std(axis=(0, 2)),
                               rtol=1e-9)


@pytest.mark.parametrize("layout", ["folder", "archive"])
def test_cifar100_layouts(tmp_path, monkeypatch, layout):
    members, train, fine, test, test_fine = _cifar100_members()
    if layout == "folder":
        _write_folder(tmp_path, "cifar-100-python", members)
    else:
        _write_archive(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", members)
    monkeypatch.setenv("MSAM_DATA", str(tmp_path))  # found through the environment
    splits = load_dataset("cifar100")
    assert splits.num_classes == 100
    assert splits.meta["class_names"][:2] == ["f0", "f1"]
    assert splits.train.y.tolist() == fine and splits.test.y.tolist() == test_fine
    _check_pixels(splits.train.x, train, splits.meta)
    _check_pixels(splits.test.x, test, splits.meta)


def test_cifar10_folder_and_archive_agree_with_options(tmp_path):
    members = _cifar10_members(seed=3)[0]
    _write_folder(tmp_path / "a", "cifar-10-batches-py", members)
    _write_archive(tmp_path / "b" / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    kw = dict(val_fraction=0.2, label_noise=0.5, seed=11)
    one = load_dataset("cifar10", data_dir=tmp_path / "a", **kw)
    two = load_dataset("cifar10", data_dir=tmp_path / "b", **kw)
    assert torch.equal(one.train.x, two.train.x) and torch.equal(one.train.y, two.train.y)
    assert torch.equal(one.val.x, two.val.x) and torch.equal(one.val.y, two.val.y)


def test_truncated_batch_in_folder_names_file(tmp_path):
    members = _cifar10_members()[0]
    members["data_batch_3"] = members["data_batch_3"][: len(members["data_batch_3"]) // 2]
    folder = _write_folder(tmp_path, "cifar-10-batches-py", members)
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(folder / "data_batch_3") in str(info.value)


def test_corrupted_member_in_archive_names_archive_and_member(tmp_path):
    members = _cifar100_members()[0]
    members["test"] = b"\x80\x02garbage" + bytes(50)
    archive = _write_archive(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", members)
    with pytest.raises(ValueError) as info:
        load_dataset("cifar100", data_dir=tmp_path)
    assert str(archive) in str(info.value) and "cifar-100-python/test" in str(info.value)


def test_truncated_archive_names_archive(tmp_path):
    archive = _write_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py",
                             _cifar10_members()[0])
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(archive) in str(info.value)


def test_archive_missing_member(tmp_path):
    members = _cifar10_members()[0]
    del members["data_batch_5"]
    archive = _write_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    with pytest.raises(ValueError, match="data_batch_5") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(archive) in str(info.value)


def test_malicious_pickle_is_rejected(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    members = _cifar10_members()[0]
    members["test_batch"] = pickle.dumps({b"data": Evil()}, protocol=2)
    _write_folder(tmp_path, "cifar-10-batches-py", members)
    with pytest.raises(ValueError, match="not allowed"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_wrong_shape_names_file(tmp_path):
    members = _cifar10_members()[0]
    members["data_batch_2"] = _dump({b"labels": [0, 1], b"data": np.zeros((2, 100), np.uint8)})
    folder = _write_folder(tmp_path, "cifar-10-batches-py", members)
    with pytest.raises(ValueError, match="3072") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(folder / "data_batch_2") in str(info.value)


def test_missing_cifar_says_no_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar100", data_dir=tmp_path, download=True)
    msg = str(info.value)
    assert "cifar-100-python" in msg and "download is not available" in msg
    assert str(tmp_path) in msg
