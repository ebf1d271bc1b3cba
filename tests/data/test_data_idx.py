"""IDX parsing: header/payload checks against hand-built bytes, and corruption handling."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from msam.data import read_idx, write_idx


def _idx_bytes(array: np.ndarray, code: int, fmt: str) -> bytes:
    """Independent IDX encoder built with struct (big-endian), element by element."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    body = b"".join(struct.pack(">" + fmt, v) for v in array.flatten().tolist())
    return header + body


@pytest.mark.parametrize(
    "dtype, code, fmt",
    [(np.uint8, 0x08, "B"), (np.int8, 0x09, "b"), (np.int16, 0x0B, "h"),
     (np.int32, 0x0C, "i"), (np.float32, 0x0D, "f"), (np.float64, 0x0E, "d")],
)
@pytest.mark.parametrize("compressed", [False, True])
def test_read_idx_matches_struct_encoding(tmp_path, dtype, code, fmt, compressed):
    rng = np.random.default_rng(0)
    arr = (rng.integers(-100, 100, size=(3, 4, 5)) if np.dtype(dtype).kind != "u"
           else rng.integers(0, 255, size=(3, 4, 5))).astype(dtype)
    payload = _idx_bytes(arr, code, fmt)
    path = tmp_path / ("a.idx.gz" if compressed else "a.idx")
    path.write_bytes(gzip.compress(payload) if compressed else payload)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype)
    assert out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr)


def test_write_idx_round_trip_and_bytes(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.idx", arr)
    assert (tmp_path / "x.idx").read_bytes() == _idx_bytes(arr, 0x08, "B")
    write_idx(tmp_path / "x.idx.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx.gz"), arr)


def _good(tmp_path):
    return _idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5), 0x08, "B")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b"\x01" + b[1:], "magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "type code"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b[:2], "too short"),
    ],
)
def test_corrupted_idx_raises_value_error_naming_file(tmp_path, mutate, message):
    path = tmp_path / "broken-images-idx3-ubyte"
    path.write_bytes(mutate(_good(tmp_path)))
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_raises_value_error_naming_file(tmp_path):
    data = gzip.compress(_good(tmp_path) * 50)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope.gz")
