"""Exception types raised by :mod:`msam.data`.

They subclass the built-in exception a caller would naturally catch (``FileNotFoundError``,
``ValueError``, ``OSError``) so generic handlers keep working, while tests and the CLI can
single out data problems and print the attached how-to-fix message.
"""

from __future__ import annotations

__all__ = ["ChecksumError", "DatasetNotFoundError", "DownloadError"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files were not found in any searched location.

    The message lists the locations searched and how to obtain the data.
    """


class ChecksumError(ValueError):
    """A downloaded file's MD5 digest differs from the expected one (the file is removed)."""


class DownloadError(OSError):
    """Fetching a file over the network failed (connection, HTTP status, truncated body)."""
