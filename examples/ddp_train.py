"""Minimal mSAM + DistributedDataParallel training script (CPU/gloo or CUDA/NCCL).

Launch (2 processes on one machine)::

    torchrun --nproc_per_node=2 examples/ddp_train.py
    torchrun --nproc_per_node=2 examples/ddp_train.py --mode synchronized   # SAM, global e
    torchrun --nproc_per_node=2 examples/ddp_train.py --resume              # continue a run

``python examples/ddp_train.py`` (no torchrun) runs the same thing in one process.

Data: scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn) when it is installed,
otherwise a synthetic 10-class problem. Every step draws one global batch of ``--batch-size``
examples (same permutation on every rank) and rank ``r`` trains on its ``r``-th contiguous
shard, with ``--micro-batches`` micro-batches: a step averages ``world_size * m``
perturbations, and the result equals single-process mSAM with ``world_size * m`` micro-batches
on the global batch.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from msam.distributed import (
    DistributedMSAM,
    average_batchnorm_buffers,
    ddp_kwargs,
    load_checkpoint,
    save_checkpoint,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128, help="global batch (all ranks)")
    p.add_argument("--micro-batches", type=int, default=2, help="m per rank (local mode)")
    p.add_argument("--mode", choices=["local", "synchronized"], default="local")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--checkpoint", default=os.path.join("runs", "ddp_train", "checkpoint.pt"),
                   help="checkpoint path (default under runs/, which git ignores)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    return p.parse_args()


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test); identical on every rank."""
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
    except ImportError:  # synthetic: 10 Gaussian blobs in 64 dimensions
        g = torch.Generator().manual_seed(1234)
        centers = torch.randn(10, 64, generator=g)
        y = torch.randint(0, 10, (2000,), generator=g)
        x = centers[y] + 1.5 * torch.randn(2000, 64, generator=g)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 10),
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    distributed = "RANK" in os.environ  # set by torchrun
    try:
        train(args, distributed)
    finally:
        if distributed and dist.is_initialized():
            # Every rank reaches this point before any tears gloo down: a rank that leaves
            # while another still has a collective in flight aborts the process at exit
            # ("terminate called without an active exception"), seen on a resume with no
            # epoch left to train.
            dist.barrier()
            dist.destroy_process_group()


def train(args: argparse.Namespace, distributed: bool) -> None:
    os.makedirs(os.path.dirname(args.checkpoint) or ".", exist_ok=True)
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        rank, world = 0, 1
    device = torch.device("cuda", torch.cuda.current_device()) if (
        distributed and torch.cuda.is_available()) else torch.device("cpu")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {world} ranks")

    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts them)
    model = make_model().to(device)
    # ddp_kwargs(): no buffer broadcast on every forward, i.e. per-rank BatchNorm statistics.
    runner = nn.parallel.DistributedDataParallel(model, **ddp_kwargs()) if distributed else model
    opt = DistributedMSAM(
        runner, None, torch.optim.SGD, rho=args.rho, mode=args.mode,
        micro_batches=args.micro_batches if args.mode == "local" else 1,
        lr=args.lr, momentum=0.9, weight_decay=5e-4,
    )
    torch.manual_seed(args.seed + 1000 + rank)  # per-rank stream (dropout, augmentation, ...)

    start_epoch = 0
    if args.resume and os.path.exists(args.checkpoint):
        start_epoch = load_checkpoint(args.checkpoint, runner, opt)["epoch"]

    x_train, y_train, x_test, y_test = load_data(args.seed)
    x_train, y_train = x_train.to(device), y_train.to(device)
    steps_per_epoch = len(y_train) // args.batch_size
    local = args.batch_size // world

    def loss_fn(batch):
        x, y = batch
        return nn.functional.cross_entropy(runner(x), y)

    if rank == 0:
        print(f"world_size={world} mode={args.mode} m/rank={opt.engine.micro_batches} "
              f"perturbations/step={opt.global_micro_batches} batch={args.batch_size} "
              f"(per rank {local})")
    for epoch in range(start_epoch, args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(
            args.seed * 1000 + epoch)).to(device)
        t0, total = time.perf_counter(), torch.zeros((), device=device)
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            idx = idx[rank * local:(rank + 1) * local]          # this rank's contiguous shard
            total += opt.step(loss_fn, (x_train[idx], y_train[idx])).detach()
        if distributed:
            dist.all_reduce(total)
            average_batchnorm_buffers(runner)  # per-rank running statistics -> their mean
        train_loss = float(total) / (steps_per_epoch * world)
        acc = evaluate(model, x_test, y_test, rank, world, device, distributed)
        save_checkpoint(args.checkpoint, runner, opt, extra={"epoch": epoch + 1})
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {train_loss:.4f}  test acc {acc:.4f}  "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)


@torch.no_grad()
def evaluate(model, x, y, rank, world, device, distributed) -> float:
    model.eval()
    part = torch.tensor_split(torch.arange(len(y)), world)[rank]
    logits = model(x[part].to(device))
    counts = torch.tensor([(logits.argmax(1) == y[part].to(device)).sum().item(), len(part)],
                          dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(counts)
    return float(counts[0] / counts[1])


if __name__ == "__main__":
    main()
