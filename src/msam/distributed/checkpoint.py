"""Checkpoints for DDP training: written once by rank 0, atomically; rank-local state kept.

:func:`save_checkpoint` is a collective (call it on every rank at the same point). It stores

* ``model``: the module's ``state_dict`` (from rank 0; DDP keeps the weights equal on all ranks),
* ``optimizer``: the optimizer's ``state_dict`` (equal on all ranks: same gradients, same steps),
* ``ranks``: per rank, the BatchNorm running statistics (kept per rank, see
  :mod:`msam.distributed.buffers`) and the random number generator states (torch CPU, CUDA,
  Python ``random``, NumPy) -- what differs between ranks,
* ``extra``: whatever the caller passes (epoch, step, data position, ...).

Rank 0 writes to a temporary file in the same directory, flushes and fsyncs it, then
``os.replace``-s it onto ``path``, so ``path`` always holds either the previous checkpoint or the
new one, never a partial file. The ranks then agree on the outcome: a failed write raises
:class:`CheckpointError` on every rank (and leaves the previous file).

:func:`load_checkpoint` (every rank reads the file, so ``path`` must be on a file system all
ranks see) restores each rank's own BatchNorm statistics and RNG states when the world size is
the one saved; a run resumed on the same number of ranks then continues bit-identically (given
the same data order, which ``extra`` can carry). With another world size rank 0's statistics
are used everywhere and the RNG states are left alone (with a warning).
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from msam.distributed.buffers import per_rank_batchnorm

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

_FORMAT = "msam.distributed.checkpoint"
_VERSION = 1


class CheckpointError(RuntimeError):
    """Writing or reading a checkpoint failed (raised on every rank for a failed write)."""


def _group_of(model: nn.Module, process_group: Any) -> tuple[nn.Module, Any, int, int]:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if process_group is None:
            process_group = model.process_group
        model = model.module
    if dist.is_available() and dist.is_initialized():
        return model, process_group, dist.get_world_size(process_group), \
            dist.get_rank(process_group)
    return model, None, 1, 0


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    version, internal, gauss = random.getstate()
    state["python"] = (version, torch.tensor(internal, dtype=torch.int64), gauss)
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                          int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _rank_state(module: nn.Module) -> dict[str, Any]:
    bn = {}
    for name, m in per_rank_batchnorm(module):
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            t = m._buffers.get(key)
            if t is not None:
                bn[f"{name}.{key}" if name else key] = t.detach().cpu().clone()
    return {"batchnorm": bn, "rng": _rng_state()}


def _agree_ok(ok: bool, group: Any, world: int) -> bool:
    if world == 1:
        return ok
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
        else torch.device("cpu")
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, group=group)
    return int(flag.item()) == 0


def _atomic_save(payload: dict[str, Any], path: str) -> None:
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (POSIX); best effort elsewhere.
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    *,
    process_group: Any = None,
) -> None:
    """Write a checkpoint from rank 0, atomically (a collective; see the module docstring).

    ``model`` is the DDP wrapper or its module; ``optimizer`` any optimizer (``DistributedMSAM``
    included). Raises :class:`CheckpointError` on every rank if rank 0 could not write.
    """
    module, group, world, rank = _group_of(model, process_group)
    mine = _rank_state(module)
    if world > 1:
        ranks: list[Any] = [None] * world
        dist.all_gather_object(ranks, mine, group=group)
    else:
        ranks = [mine]
    error = ""
    if rank == 0:
        try:
            payload = {
                "format": _FORMAT,
                "version": _VERSION,
                "world_size": world,
                "model": module.state_dict(),
                "optimizer": None if optimizer is None else optimizer.state_dict(),
                "ranks": ranks,
                "extra": {} if extra is None else extra,
            }
            _atomic_save(payload, os.fspath(path))
        except Exception as err:  # noqa: BLE001 - reported to every rank below
            error = f"{type(err).__name__}: {err}"
    if not _agree_ok(not error, group, world):
        msg = f"rank 0 could not write checkpoint {os.fspath(path)!r}"
        raise CheckpointError(msg + (f" ({error})" if error else "") +
                              "; the previous checkpoint file (if any) is unchanged")


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    map_location: Any = None,
    restore_rng: bool = True,
    strict: bool = True,
    weights_only: bool = True,
    process_group: Any = None,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``extra`` dict.

    Not a collective: each rank reads ``path``. ``map_location`` defaults to the device of the
    model's first parameter. ``weights_only=True`` (torch's safe loader) works for checkpoints
    whose ``extra`` holds tensors and plain Python values.
    """
    module, _group, world, rank = _group_of(model, process_group)
    if map_location is None:
        first = next(iter(module.parameters()), None)
        map_location = first.device if first is not None else "cpu"
    try:
        payload = torch.load(os.fspath(path), map_location=map_location,
                             weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise CheckpointError(f"could not read checkpoint {os.fspath(path)!r}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{os.fspath(path)!r} is not a msam.distributed checkpoint")
    module.load_state_dict(payload["model"], strict=strict)
    ranks = payload.get("ranks") or []
    if payload.get("world_size") == world and len(ranks) == world:
        own = ranks[rank]
        state = module.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, value in own["batchnorm"].items():
                if key in state:
                    state[key].copy_(value)
        if restore_rng:
            _set_rng_state(own["rng"])
    else:
        warnings.warn(
            f"checkpoint {os.fspath(path)!r} was written by {payload.get('world_size')} ranks, "
            f"this run has {world}: every rank uses rank 0's BatchNorm statistics and the random "
            "number generators are not restored (the run is not bit-identical)",
            stacklevel=2,
        )
    if optimizer is not None:
        if payload.get("optimizer") is None:
            raise CheckpointError(f"{os.fspath(path)!r} holds no optimizer state")
        optimizer.load_state_dict(payload["optimizer"])
    return payload.get("extra", {})
