"""Checkpoints of FSDP2 training with ``torch.distributed.checkpoint`` (DCP).

:func:`save_sharded_checkpoint` (a collective) writes, into the directory ``path``, each rank's
shards of the model and of the base optimizer's state (``get_state_dict``: keys are parameter
names, so a checkpoint does not depend on the optimizer's parameter order), the mSAM settings
and counters of :class:`msam.distributed.ShardedMSAM`, each rank's torch RNG state and the
caller's ``extra``. DCP writes the shards in parallel and a ``.metadata`` file last.

:func:`load_sharded_checkpoint` (a collective) loads it into a model and optimizer built the
same way (``fully_shard`` with the same mesh); ``set_state_dict`` puts the shards back. On the
same world size the run then continues bit-identically (tested in float64).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

__all__ = ["load_sharded_checkpoint", "save_sharded_checkpoint"]

_FORMAT = "msam.distributed.dcp"
_VERSION = 1


def _state(model: nn.Module, opt: Any, extra: Any) -> dict[str, Any]:
    msd, osd = get_state_dict(model, opt.base_optimizer)
    world, rank = dist.get_world_size(), dist.get_rank()
    return {
        "model": msd,
        "optim": osd,
        # One JSON string each (a leaf for DCP, whatever the structure inside).
        "msam": json.dumps({"format": _FORMAT, "version": _VERSION, "world_size": world,
                            "settings": opt.settings()}),
        f"rng/rank{rank}": torch.get_rng_state(),
        "extra": json.dumps(extra),
    }


def save_sharded_checkpoint(path: str | Path, model: nn.Module, opt: Any,
                            extra: Any = None) -> None:
    """Save model shards, base-optimizer state, mSAM settings, RNG and ``extra`` (all ranks;
    ``extra``: JSON-serialisable, e.g. ``{"epoch": 3, "step": 1200}``, the same on every rank).

    Written into ``<path>.tmp`` first; after every rank has finished, rank 0 swaps it into
    place (rename), so an interrupted save leaves the previous checkpoint at ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(_state(model, opt, extra), storage_writer=dcp.FileSystemWriter(str(tmp)))
    dist.barrier()
    if rank == 0:
        old = path.with_name(path.name + ".old")
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier()


def load_sharded_checkpoint(path: str | Path, model: nn.Module, opt: Any) -> Any:
    """Load what :func:`save_sharded_checkpoint` wrote into ``model`` / ``opt`` (all ranks);
    returns ``extra``. The RNG state is restored when the world size matches."""
    state = _state(model, opt, None)
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
        keys = set(meta.state_dict_metadata)
    except Exception as err:  # noqa: BLE001 - a clear error for a missing / foreign path
        raise ValueError(f"{path}: not a readable torch.distributed.checkpoint directory "
                         f"({type(err).__name__}: {err})") from err
    rng_key = f"rng/rank{dist.get_rank()}"
    if rng_key not in keys:
        state.pop(rng_key)
    dcp.load(state, checkpoint_id=str(path))
    info = json.loads(state["msam"]) if isinstance(state["msam"], str) else None
    if not isinstance(info, dict) or info.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a {_FORMAT} checkpoint")
    saved_world = info.get("world_size")
    set_state_dict(model, opt.base_optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    opt.load_settings(info["settings"])
    if rng_key in state and saved_world == dist.get_world_size():
        torch.set_rng_state(state[rng_key])
    return json.loads(state["extra"])
