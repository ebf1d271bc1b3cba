"""Checksummed, atomic file download (used for Fashion-MNIST).

A download is streamed into a temporary file in the destination directory while its MD5 is
computed; only when the digest matches the expected value is the temporary file moved into
place with :func:`os.replace` (atomic on POSIX and Windows within one filesystem).  A
mismatching or interrupted download therefore never leaves a partial or wrong file under the
final name, so a later search cannot pick it up.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from .errors import ChecksumError, DownloadError

__all__ = ["download_file", "download_files", "md5_of_file"]

_CHUNK = 1 << 20


def md5_of_file(path: str | os.PathLike) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str, dest: str | os.PathLike, *, md5: str | None, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``md5`` (hex) when given.

    Raises:
        DownloadError: the request failed or the body was shorter than its Content-Length.
        ChecksumError: the MD5 differs; nothing is left at ``dest`` or in its directory.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    received = 0
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise DownloadError(f"failed to download {url}: {exc}") from exc
            if length is not None and received != int(length):
                raise DownloadError(
                    f"failed to download {url}: got {received} of {length} bytes"
                )
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if md5 is not None and actual.lower() != md5.lower():
            raise ChecksumError(
                f"MD5 mismatch for {dest.name} downloaded from {url}: expected {md5}, got "
                f"{actual}; the file was deleted. Retry, or check the URL/mirror."
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def download_files(
    base_url: str,
    dest_dir: str | os.PathLike,
    md5s: Mapping[str, str | None],
    *,
    timeout: float = 60.0,
) -> list[Path]:
    """Download each file name in ``md5s`` from ``base_url`` into ``dest_dir``.

    A file already present under its final name is re-verified instead of re-downloaded; if its
    MD5 is wrong it is deleted and fetched again.
    """
    dest_dir = Path(dest_dir)
    base = base_url if base_url.endswith("/") else base_url + "/"
    paths = []
    for name, md5 in md5s.items():
        target = dest_dir / name
        if target.is_file() and (md5 is None or md5_of_file(target) == md5.lower()):
            paths.append(target)
            continue
        target.unlink(missing_ok=True)
        paths.append(download_file(base + name, target, md5=md5, timeout=timeout))
    return paths
