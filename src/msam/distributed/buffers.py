"""BatchNorm running statistics across ranks.

With DDP's per-forward buffer broadcast switched off (``msam.distributed.ddp_kwargs()``), every
rank keeps the running statistics of its own data, following the core BatchNorm policy
(:mod:`msam.core.batchnorm`): per-micro-batch statistics, one running update per step from the
unperturbed pass. Training does not read the running statistics, so the ranks' weights stay
identical; before evaluating (or exporting a model) average them with
:func:`average_batchnorm_buffers`. Because the running update is linear in the running value, the
average over ranks equals what single-process mSAM with ``world_size * m`` micro-batches would
hold (when the ranks started from equal buffers and use the same momentum).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["average_batchnorm_buffers", "per_rank_batchnorm"]


def per_rank_batchnorm(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """BatchNorm modules whose running statistics are kept per rank (``SyncBatchNorm`` excluded)."""
    return [
        (name, m) for name, m in module.named_modules()
        if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
        and m.running_mean is not None and m.running_var is not None
    ]


@torch.no_grad()
def average_batchnorm_buffers(model: nn.Module, process_group: Any = None) -> int:
    """Average ``running_mean`` / ``running_var`` of every BatchNorm module over the ranks.

    A collective: call it on every rank (e.g. before evaluation or export). ``model`` may be the
    DDP wrapper or the module; ``process_group`` defaults to the DDP wrapper's group (or the
    default group). One all-reduce per (dtype, device) of the buffers. Returns the number of
    modules averaged; does nothing without an initialised process group.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if process_group is None:
            process_group = model.process_group
        model = model.module
    modules = per_rank_batchnorm(model)
    if not modules or not (dist.is_available() and dist.is_initialized()):
        return len(modules) if modules else 0
    world = dist.get_world_size(process_group)
    if world == 1:
        return len(modules)
    tensors = [t for _, m in modules for t in (m.running_mean, m.running_var)]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    backend = dist.get_backend(process_group)
    for ts in groups.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        moved = flat.device.type == "cpu" and backend == "nccl"
        if moved:
            flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(flat, group=process_group)
        flat.div_(world)
        if moved:
            flat = flat.cpu()
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return len(modules)
