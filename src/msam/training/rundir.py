"""One writer per run directory, and files that prove their integrity.

**Lock.** :func:`run_lock` holds an OS advisory lock (``fcntl.flock``) on ``RUN/run.lock`` for
as long as a process writes the run. The kernel releases it when the process exits in any way
(including ``SIGKILL``), so a lock is never stale once its holder is gone. A second writer is
refused with :class:`RunLockedError`, which names the holder's pid (written into the lock
file). The lock is re-entrant within one process (a study holds it around ``train``, which
takes it again).

The lock file is opened with ``O_NOFOLLOW`` and must be a plain file with one link: a
planted symbolic (or hard) link named ``run.lock`` is refused instead of being followed, so
the pid is never written over another file. We keep ``fcntl`` rather than a lock library
(``filelock``): it adds no dependency, ``flock`` has exactly the release-on-exit semantics we
need, and the checks above are what a library would not do for us. Platforms without
``fcntl`` (Windows) get no lock; :func:`run_lock` warns once that runs are not guarded there.

**Checksums.** :class:`RunFiles` writes files atomically (see
:func:`msam.training.checkpoint.atomic_write`) and records their SHA-256 and size in
``RUN/checksums.json``. The record is updated in two phases, so that every state a kill can
leave behind still verifies: first the new digests are added as ``pending`` (the manifest then
accepts the old and the new content), then the files are replaced, then ``pending`` is folded
into ``files``. A file whose content matches neither its recorded digest nor a pending one is
corrupted: :meth:`RunFiles.verify` says so, and the trainer refuses to load it.

The last two checkpoints are kept: before ``last.pt`` is replaced, the current one becomes
``prev.pt`` (a hard link, with its digest), so a corrupted ``last.pt`` can fall back to
``prev.pt``; ``last.pt`` exists at every moment.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .checkpoint import _TMP_MARK, _fsync_dir, atomic_write
from .config import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not guarded
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "MANIFEST_NAME",
    "IntegrityError",
    "RunDirError",
    "RunFiles",
    "RunLockedError",
    "RunWriteError",
    "run_lock",
    "sha256_file",
]

LOCK_NAME = "run.lock"
MANIFEST_NAME = "checksums.json"
MANIFEST_FORMAT = "msam-checksums"


class RunDirError(ConfigError):
    """A run directory that cannot be used as asked (the CLI exits with 2)."""


class RunLockedError(RunDirError):
    """Another live process holds the run directory's lock."""


class IntegrityError(RunDirError):
    """A run file does not match its recorded SHA-256, or cannot be parsed."""


class RunWriteError(OSError):
    """Writing a run file failed (disk full, read-only file system, ...); the files written
    before are intact (every write is atomic), so the run can be resumed once fixed."""

    def __init__(self, path: Path, err: OSError) -> None:
        name = errno.errorcode.get(err.errno or 0, "")
        super().__init__(err.errno, f"cannot write {path}: {err.strerror or err}"
                         + (f" ({name})" if name else ""))
        self.path = path


# -- lock ------------------------------------------------------------------------------------

_HELD: dict[str, list[Any]] = {}  # resolved run dir -> [fd, depth]


def _read_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, wait: bool = False) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the duration of the block (creates ``run_dir``).

    ``wait=False`` raises :class:`RunLockedError` at once if another process holds it;
    ``wait=True`` blocks until it is released.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"run directory {str(run_dir)!r} cannot be created: "
                          f"{err.strerror or err}; choose another out_dir") from None
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {str(run_dir)!r} is not a directory; choose "
                          "another out_dir")
    key = str(run_dir.resolve())
    if key in _HELD:  # re-entered by the process that holds it
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    path = run_dir / LOCK_NAME
    if fcntl is None:  # pragma: no cover
        warnings.warn("this platform has no fcntl: run directories are not locked, so two "
                      "processes must not write one run", RuntimeWarning, stacklevel=3)
        yield
        return
    fd = _open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RunLockedError(
                f"run directory {str(run_dir)!r} is in use by process {_read_pid(path)} (lock "
                f"{path}); wait for it to finish or stop it, then run again") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = [fd, 1]
        try:
            yield
        finally:
            del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_lock_file(path: Path) -> int:
    """Open (create) the lock file without following links; refuse anything but a plain file
    with a single link (a planted link would make the pid overwrite its target)."""
    planted = (f"{str(path)!r} is not a plain file (a symbolic or hard link, or a special "
               "file); msam never writes through it. Delete it and run again")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise RunDirError(planted) from None
        raise RunDirError(f"cannot create the lock file {str(path)!r}: {err.strerror or err}; "
                          "the run directory must be writable") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise RunDirError(planted)
    return fd


def holds_lock(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds ``run_dir``'s lock."""
    return str(Path(run_dir).resolve()) in _HELD


# -- checksums ---------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


class RunFiles:
    """Atomic, checksummed writes and verified reads of the files of one run directory.

    Writers must hold the directory's :func:`run_lock`.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir)
        self.manifest_path = self.dir / MANIFEST_NAME

    # manifest
    def _load(self) -> dict[str, Any]:
        if self.manifest_path.is_symlink():
            raise IntegrityError(
                f"{self.manifest_path} is a symbolic link; msam never reads or writes run files "
                "through links. Delete it (then resume with --accept-unverified), or pass "
                "--rerun to train the run again from scratch")
        if not self.manifest_path.exists():
            return {"format": MANIFEST_FORMAT, "version": 1, "files": {}, "pending": {}}
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
                raise ValueError("not an msam checksum manifest")
            data.setdefault("files", {})
            data.setdefault("pending", {})
        except (OSError, ValueError) as err:
            raise IntegrityError(
                f"{self.manifest_path} is unreadable ({err}); the run's files cannot be "
                f"verified. Delete {self.manifest_path} and resume with --accept-unverified to "
                "accept the files unverified, or pass --rerun to train the run again") from None
        return data

    def _settled(self) -> dict[str, Any]:
        """The manifest with a killed writer's ``pending`` digests resolved: a file that
        matches its pending digest was written (the digest is now its record); the others
        keep their old record."""
        manifest = self._load()
        for name, entry in manifest["pending"].items():
            path = self.dir / name
            if path.is_file() and sha256_file(path) == (entry["sha256"], entry["size"]):
                manifest["files"][name] = entry
        manifest["pending"] = {}
        return manifest

    def _save(self, manifest: dict[str, Any]) -> None:
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        atomic_write(self.manifest_path, lambda f: f.write(text.encode("utf-8")))

    # writing
    def write(self, files: Mapping[str, bytes], rotate: tuple[str, str] | None = None) -> None:
        """Write ``{name: bytes}`` atomically, in order, with their digests.

        ``rotate=(src, dst)``: first move ``src`` (if it exists) to ``dst`` with its digest,
        e.g. ``("last.pt", "prev.pt")`` to keep the previous checkpoint. An ``OSError`` (disk
        full, read-only file system) is raised as :class:`RunWriteError` naming the file; every
        file keeps its old or new content, both of which the manifest accepts.
        """
        try:
            self._write(files, rotate)
        except RunWriteError:
            raise
        except OSError as err:
            raise RunWriteError(Path(err.filename) if err.filename else self.dir, err) from err

    def _write(self, files: Mapping[str, bytes], rotate: tuple[str, str] | None) -> None:
        manifest = self._settled()
        pending = {name: _entry(data) for name, data in files.items()}
        move = rotate is not None and (self.dir / rotate[0]).exists()
        if move:
            assert rotate is not None
            old = manifest["files"].get(rotate[0])
            if old is None:  # an unrecorded file (older msam): keep it unrecorded
                manifest["files"].pop(rotate[1], None)
            else:
                pending[rotate[1]] = old
        manifest["pending"] = pending
        self._save(manifest)
        if move:
            assert rotate is not None
            self._keep_copy(rotate[0], rotate[1])
        for name, data in files.items():
            atomic_write(self.dir / name, lambda f, d=data: f.write(d))
        manifest["files"].update(pending)
        manifest["pending"] = {}
        self._save(manifest)

    def _keep_copy(self, src: str, dst: str) -> None:
        """Atomically make ``dst`` a copy of ``src`` (a hard link where the file system has
        them, so no data is copied); ``src`` stays in place throughout."""
        source, target = self.dir / src, self.dir / dst
        tmp = target.with_name(f".{dst}{_TMP_MARK}{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here: copy the bytes
            data = source.read_bytes()
            atomic_write(target, lambda f: f.write(data))
            return
        os.replace(tmp, target)
        _fsync_dir(self.dir)

    def write_text(self, name: str, text: str) -> None:
        self.write({name: text.encode("utf-8")})

    def discard(self, *names: str) -> None:
        """Delete files and the whole manifest without reading it (a run discarded by
        ``--rerun``, whose manifest may be damaged)."""
        for name in (*names, MANIFEST_NAME):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()

    def forget(self, *names: str) -> None:
        """Delete files and their records (missing files are fine)."""
        manifest = self._settled()
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()
            manifest["files"].pop(name, None)
            manifest["pending"].pop(name, None)
        if self.manifest_path.exists() or manifest["files"]:
            self._save(manifest)

    def require_manifest(self, names: tuple[str, ...], fix: str) -> None:
        """Raise :class:`IntegrityError` if any of ``names`` exists but the manifest does not:
        msam writes the manifest before any run file, so a missing one was deleted, and the
        files can no longer be verified (a corrupted checkpoint would load without a word)."""
        present = [n for n in names if (self.dir / n).exists()]
        if present and not self.manifest_path.exists():
            raise IntegrityError(
                f"{self.manifest_path} is missing, so {', '.join(present)} cannot be verified "
                f"against their checksums (a corrupted file would be used without a word). "
                f"Restore it from a backup{fix}")

    # reading
    def verify(self, name: str) -> bool | None:
        """True: matches its digest; False: corrupted; None: no digest recorded."""
        manifest = self._load()
        known = [e for e in (manifest["files"].get(name), manifest["pending"].get(name)) if e]
        if not known:
            return None
        digest, size = sha256_file(self.dir / name)
        return any(e.get("sha256") == digest and e.get("size") == size for e in known)

    def check(self, name: str, what: str = "") -> None:
        """Raise :class:`IntegrityError` if ``name`` does not match its recorded digest."""
        if self.verify(name) is False:
            raise IntegrityError(
                f"{self.dir / name} does not match its SHA-256 in {self.manifest_path} "
                f"(the file is corrupted){what}")

    def read_json(self, name: str, what: str = "") -> Any:
        """Verified and parsed JSON file; :class:`IntegrityError` naming it otherwise."""
        self.check(name, what)
        path = self.dir / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise IntegrityError(f"{path} is corrupted or truncated ({err}){what}") from None
