"""mSAM with ``torch.distributed``: DistributedDataParallel (DDP), launched with ``torchrun``.

``DistributedMSAM(ddp_model, params, base_optimizer, rho=..., micro_batches=m, mode=...)``:

* ``mode="local"`` (mSAM): every rank perturbs with its own ``m`` micro-batches, without
  communication; DDP averages the perturbed gradients with one all-reduce per step. A step
  averages ``world_size * m`` perturbations.
* ``mode="synchronized"``: the ascent gradient is averaged over the ranks first (SAM with one
  global perturbation, ``m = 1``); two all-reduces per step.

Helpers: :func:`ddp_kwargs` (DDP arguments for per-rank BatchNorm statistics),
:func:`average_batchnorm_buffers`, :func:`save_checkpoint` / :func:`load_checkpoint` (rank 0,
atomic; bit-identical resume on the same number of ranks).

FSDP2 (``fully_shard``): :class:`ShardedMSAM` (global micro-batches, sharded perturbation),
:func:`save_sharded_checkpoint` / :func:`load_sharded_checkpoint` (torch.distributed.checkpoint).

Step-time benchmark:
``torchrun --nproc_per_node=2 -m msam.distributed.bench``. See ``docs/distributed.md``.
"""

from msam.distributed.buffers import average_batchnorm_buffers, per_rank_batchnorm
from msam.distributed.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from msam.distributed.dcp import load_sharded_checkpoint, save_sharded_checkpoint
from msam.distributed.optimizer import (
    MODES,
    DistributedMSAM,
    DistributedStepError,
    RemoteNonFiniteError,
    UnsupportedWrapperError,
    ddp_kwargs,
    unwrap_model,
)
from msam.distributed.sharded import FSDPStrategy, ShardedMSAM, fsdp_modules

__all__ = [
    "MODES", "CheckpointError", "DistributedMSAM", "DistributedStepError", "FSDPStrategy",
    "RemoteNonFiniteError", "ShardedMSAM", "UnsupportedWrapperError", "average_batchnorm_buffers",
    "ddp_kwargs", "fsdp_modules", "load_checkpoint", "load_sharded_checkpoint",
    "per_rank_batchnorm", "save_checkpoint", "save_sharded_checkpoint", "unwrap_model",
]
