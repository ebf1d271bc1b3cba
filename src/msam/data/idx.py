"""Reader (and writer, for tests and tools) of the IDX binary format used by (Fashion-)MNIST.

IDX (LeCun et al., "Gradient-based learning applied to document recognition", 1998; the file
format is described on the MNIST web page) is: two zero bytes, a type code byte, a byte giving
the number of dimensions ``d``, then ``d`` big-endian uint32 sizes, then the data in row-major
order, big-endian.  Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017, arXiv:1708.07747) ships its
images and labels in the same format, gzip-compressed.

The reader is written with plain numpy so the package needs neither torchvision nor network
access, and it validates everything it can (magic bytes, type code, dimension count, exact
file length) so that a truncated or corrupted download gives a ``ValueError`` naming the file
instead of silently producing garbage.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_DTYPES", "read_idx", "write_idx"]

#: IDX type code -> numpy dtype (big-endian).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == _GZIP_MAGIC:
        try:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        except (EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupted or truncated gzip data ({exc})") from exc
    return path.read_bytes()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a native-endian numpy array.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file, if the gzip stream is damaged, the magic number or type
            code is invalid, or the payload length does not match the header dimensions.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic number {raw[:4].hex()} (first two bytes must be zero)"
        )
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated IDX header (need {header_len} bytes, have {len(raw)})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = header_len + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX file {kind}: header dims {dims} need {expected} bytes, "
            f"file has {len(raw)}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip-compressed when ``compress`` (default: name ends .gz).

    Used by the tests to build small synthetic Fashion-MNIST directories.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"array dtype {array.dtype} has no IDX type code")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"array must have 1..255 dimensions, got {array.ndim}")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(
        array.shape, dtype=">u4"
    ).tobytes()
    payload = header + array.astype(IDX_DTYPES[codes[native]], copy=False).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path
