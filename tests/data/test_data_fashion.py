"""Fashion-MNIST: the Debian copy, generated IDX directories, search order, and download
against a local HTTP server (checksum success and failure)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import struct
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import msam.data.sources as sources
from msam.data import (
    FASHION_MNIST_MD5,
    ChecksumError,
    DatasetNotFoundError,
    DownloadError,
    download_fashion_mnist,
    find_fashion_mnist,
    load_dataset,
)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def _idx_gz(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def _fake_arrays(n_train=60, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(n_train, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test, dtype=np.uint8) * 7) % 10,
    }


def _write_fake(directory: Path, arrays) -> dict[str, bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    blobs = {NAMES[k]: _idx_gz(v) for k, v in arrays.items()}
    for name, blob in blobs.items():
        (directory / name).write_bytes(blob)
    return blobs


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No system copy, no MSAM_DATA, cache under tmp: only what a test provides is found."""
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-dir")
    monkeypatch.delenv("MSAM_DATA", raising=False)
    monkeypatch.delenv("MSAM_FASHION_MNIST_URL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


# ----------------------------------------------------------------------- Debian copy


@pytest.mark.skipif(not all((DEBIAN_DIR / n).is_file() for n in NAMES.values()),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist(monkeypatch):
    monkeypatch.delenv("MSAM_DATA", raising=False)
    splits = load_dataset("fashion_mnist")
    assert splits.meta["source"] == str(DEBIAN_DIR)
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    # Fashion-MNIST is balanced: 6,000 train and 1,000 test images per class (Xiao et al.).
    assert torch.bincount(splits.train.y).tolist() == [6000] * 10
    assert torch.bincount(splits.test.y).tolist() == [1000] * 10
    assert splits.train.x.dtype == torch.float32
    mean = splits.train.x.mean(dim=(0, 2, 3))
    std = splits.train.x.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros(1), atol=1e-4)
    assert torch.allclose(std, torch.ones(1), atol=1e-4)
    # Independently decode one image: first train image bytes start after a 16-byte header.
    with gzip.open(DEBIAN_DIR / NAMES["train_images"], "rb") as fh:
        raw = np.frombuffer(fh.read(16 + 784), dtype=np.uint8)[16:].reshape(28, 28)
    m, s = splits.meta["normalization"]["mean"][0], splits.meta["normalization"]["std"][0]
    expected = (raw.astype(np.float64) / 255.0 - m) / s
    np.testing.assert_allclose(splits.train.x[0, 0].numpy(), expected, atol=1e-5)


# ----------------------------------------------------------------------- generated files


def test_generated_dir_via_data_dir(isolated):
    arrays = _fake_arrays()
    _write_fake(isolated / "fm", arrays)
    splits = load_dataset("fashion-mnist", data_dir=isolated / "fm")
    assert splits.meta["source"] == str(isolated / "fm")
    assert splits.name == "fashion_mnist" and splits.modality == "image"
    np.testing.assert_array_equal(splits.train.y.numpy(), arrays["train_labels"])
    np.testing.assert_array_equal(splits.test.y.numpy(), arrays["test_labels"])
    # Normalisation uses numpy stats of the training pixels only.
    px = arrays["train_images"].astype(np.float64) / 255.0
    mean, std = px.mean(), px.std()
    assert splits.meta["normalization"]["mean"][0] == pytest.approx(mean, rel=1e-9)
    assert splits.meta["normalization"]["std"][0] == pytest.approx(std, rel=1e-9)
    expected = (arrays["test_images"].astype(np.float64) / 255.0 - mean) / std
    np.testing.assert_allclose(splits.test.x[:, 0].numpy(), expected, atol=1e-5)


def test_uncompressed_files_and_msam_data_subfolder(isolated, monkeypatch):
    arrays = _fake_arrays(seed=1)
    target = isolated / "root" / "fashion-mnist"
    for name, blob in _write_fake(target, arrays).items():
        (target / name).unlink()
        (target / name.removesuffix(".gz")).write_bytes(gzip.decompress(blob))
    monkeypatch.setenv("MSAM_DATA", str(isolated / "root"))
    assert find_fashion_mnist() == target
    splits = load_dataset("fashion_mnist")
    np.testing.assert_array_equal(splits.test.y.numpy(), arrays["test_labels"])


def test_search_order_data_dir_before_msam_data(isolated, monkeypatch):
    _write_fake(isolated / "a", _fake_arrays(seed=2))
    _write_fake(isolated / "b", _fake_arrays(seed=3))
    monkeypatch.setenv("MSAM_DATA", str(isolated / "b"))
    assert find_fashion_mnist(isolated / "a") == isolated / "a"
    assert find_fashion_mnist(isolated / "empty") == isolated / "b"
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", isolated / "a")
    monkeypatch.delenv("MSAM_DATA")
    assert find_fashion_mnist() == isolated / "a"


def test_not_found_error_explains_options(isolated):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", data_dir=isolated / "nothing-here")
    msg = str(info.value)
    for hint in ("apt-get install dataset-fashion-mnist", "MSAM_DATA", "download=True",
                 str(isolated / "nothing-here")):
        assert hint in msg


def test_truncated_file_in_dataset_names_file(isolated):
    directory = isolated / "fm"
    blobs = _write_fake(directory, _fake_arrays())
    raw = gzip.decompress(blobs[NAMES["test_images"]])
    (directory / NAMES["test_images"]).write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist", data_dir=directory)


def test_label_image_count_mismatch(isolated):
    arrays = _fake_arrays()
    arrays["train_labels"] = arrays["train_labels"][:-1]
    _write_fake(isolated / "fm", arrays)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("fashion_mnist", data_dir=isolated / "fm")


# ----------------------------------------------------------------------- download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass


@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path/'www' on 127.0.0.1 from a background thread; yields (dir, base_url)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_QuietHandler, directory=str(root))
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_published_md5_table():
    assert FASHION_MNIST_MD5 == {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }


def test_download_success_with_md5(http_root, isolated):
    root, url = http_root
    arrays = _fake_arrays(seed=4)
    blobs = _write_fake(root, arrays)
    md5s = {name: hashlib.md5(blob).hexdigest() for name, blob in blobs.items()}
    dest = download_fashion_mnist(isolated / "dl", base_url=url, md5s=md5s)
    assert sorted(p.name for p in dest.iterdir()) == sorted(NAMES.values())
    for name, blob in blobs.items():
        assert (dest / name).read_bytes() == blob


def test_load_dataset_download_into_cache(http_root, isolated, monkeypatch):
    root, url = http_root
    arrays = _fake_arrays(seed=5)
    blobs = _write_fake(root, arrays)
    monkeypatch.setattr(sources, "FASHION_MNIST_MD5",
                        {name: hashlib.md5(blob).hexdigest() for name, blob in blobs.items()})
    monkeypatch.setenv("MSAM_FASHION_MNIST_URL", url)
    with pytest.raises(DatasetNotFoundError):
        load_dataset("fashion_mnist")  # download=False: nothing fetched
    splits = load_dataset("fashion_mnist", download=True)
    cache = isolated / "cache" / "msam" / "fashion-mnist"
    assert splits.meta["source"] == str(cache)
    np.testing.assert_array_equal(splits.train.y.numpy(), arrays["train_labels"])
    # Second call finds the cached copy even with the server's files gone.
    for f in root.iterdir():
        f.unlink()
    assert load_dataset("fashion_mnist").meta["source"] == str(cache)


def test_download_checksum_failure_leaves_nothing(http_root, isolated):
    root, url = http_root
    blobs = _write_fake(root, _fake_arrays(seed=6))
    md5s = {name: hashlib.md5(blob).hexdigest() for name, blob in blobs.items()}
    md5s[NAMES["train_labels"]] = "0" * 32
    dest = isolated / "dl"
    with pytest.raises(ChecksumError, match="train-labels-idx1-ubyte.gz") as info:
        download_fashion_mnist(dest, base_url=url, md5s=md5s)
    assert "0" * 32 in str(info.value)
    names = {p.name for p in dest.iterdir()}
    assert NAMES["train_labels"] not in names
    assert not any(n.endswith(".part") for n in names)


def test_download_with_official_table_rejects_fake_files(http_root, isolated, monkeypatch):
    root, url = http_root
    _write_fake(root, _fake_arrays(seed=7))
    monkeypatch.setenv("MSAM_FASHION_MNIST_URL", url)
    with pytest.raises(ChecksumError):
        load_dataset("fashion_mnist", download=True, data_dir=isolated / "target")
    assert [p for p in (isolated / "target").iterdir()] == []


def test_download_http_error(http_root, isolated):
    _, url = http_root
    with pytest.raises(DownloadError, match="404"):
        download_fashion_mnist(isolated / "dl", base_url=url, md5s=dict(FASHION_MNIST_MD5))
    assert list((isolated / "dl").iterdir()) == []
