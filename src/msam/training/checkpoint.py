"""Crash-safe files: atomic writes, checkpoints and RNG state.

Every file the trainer writes goes through :func:`atomic_write`: the content is written to a
temporary file in the same directory, flushed and ``fsync``-ed, then moved over the target with
``os.replace`` (atomic on POSIX and Windows), and the directory entry is ``fsync``-ed. A process
killed at any moment therefore leaves either the old file or the new one, never a torn one; at
worst a stray ``.<name>.tmp-<pid>`` file, which :func:`remove_stale_temp_files` cleans up once
its writer is gone. Run directories add SHA-256 checksums and a lock on top
(:mod:`msam.training.rundir`).

Checkpoints are plain dicts saved with :func:`torch.save` and read back with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only (the
NumPy RNG state is stored as a list), so loading one never runs pickled code.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "atomic_save_torch",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "capture_rng_state",
    "json_text",
    "load_checkpoint",
    "remove_stale_temp_files",
    "restore_rng_state",
    "torch_bytes",
]

CHECKPOINT_FORMAT = "msam-checkpoint"
CHECKPOINT_VERSION = 1
_TMP_MARK = ".tmp-"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` atomically: ``write(fileobj)`` into a temp file, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a stale (or planted) one: never written through
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_BINARY", 0), 0o644)
    except OSError as err:
        err.filename = err.filename or str(path)
        raise
    try:
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and not err.filename:
            err.filename = str(path)  # name the file (ENOSPC from write/fsync has none)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def json_text(obj: Any) -> str:
    """``obj`` as indented JSON (paths, tensors and NumPy scalars converted)."""
    return json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json_text(obj))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (serialised in memory first)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    return atomic_write(path, lambda f: f.write(data))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by the trainer (``weights_only=True``) and check its format."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an msam training checkpoint")
    if int(ckpt.get("version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {ckpt.get('version')}; this msam reads "
                         f"up to {CHECKPOINT_VERSION}")
    return ckpt


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:  # pragma: no cover - e.g. Windows
        return True
    return True


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>`` files in ``directory`` whose writer is gone.

    A temp file is removed only if its pid is this process's or no live process has it, so
    a file another process is still writing is never touched.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if not (p.name.startswith(".") and _TMP_MARK in p.name and p.is_file()):
            continue
        owner = p.name.rsplit(_TMP_MARK, 1)[1]
        if owner.isdigit() and int(owner) != os.getpid() and _pid_alive(int(owner)):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` into memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU, CUDA if initialised, NumPy, Python) as plain data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
