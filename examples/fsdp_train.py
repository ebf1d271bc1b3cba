"""SAM / mSAM on an FSDP2-sharded transformer (``fully_shard``), CPU/gloo or CUDA/NCCL.

Launch (2 processes on one machine)::

    torchrun --nproc_per_node=2 examples/fsdp_train.py                    # mSAM, m = 4
    torchrun --nproc_per_node=2 examples/fsdp_train.py --micro-batches 1  # SAM
    torchrun --nproc_per_node=2 examples/fsdp_train.py --bf16             # bf16 compute
    torchrun --nproc_per_node=2 examples/fsdp_train.py --resume           # continue a run

Data: synthetic token sequences (vocabulary 64, length 24); the label says which of two marker
tokens occurs more often, so a small transformer must attend over the whole sequence. Each step
draws one global batch (the same on every rank) and rank ``r`` takes its ``r``-th contiguous
shard; with ``--micro-batches m`` micro-batch ``j`` of the step is the union of the ranks'
``j``-th local micro-batches (see docs/distributed.md, "FSDP2"). Every transformer block and
the root are sharded with ``fully_shard``; the optimizer is
``msam.distributed.ShardedMSAM(model, torch.optim.AdamW, ...)``. A DCP checkpoint is written
to ``--ckpt`` every ``--save-every`` steps.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from msam.distributed import ShardedMSAM, load_sharded_checkpoint, save_sharded_checkpoint

VOCAB, SEQ, A, B = 64, 24, 1, 2


class Classifier(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(0.02 * torch.randn(SEQ, d))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


def batch(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    k = torch.randint(1, 6, (n, 2), generator=g)
    for i in range(n):  # plant k[i, 0] tokens A and k[i, 1] tokens B (ties broken to A)
        pos = torch.randperm(SEQ, generator=g)[: int(k[i].sum())]
        x[i, pos[: k[i, 0]]] = A
        x[i, pos[k[i, 0]:]] = B
    return x, (k[:, 1] > k[:, 0]).long()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 shards")
    p.add_argument("--ckpt", default="runs/fsdp_example/ckpt")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) \
        if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    model = Classifier().to(device)
    kw = {}
    if args.bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    opt = ShardedMSAM(model, torch.optim.AdamW, rho=args.rho, micro_batches=args.micro_batches,
                      max_grad_norm=1.0, lr=args.lr, weight_decay=0.01)

    start = 0
    if args.resume and os.path.exists(os.path.join(args.ckpt, ".metadata")):
        start = load_sharded_checkpoint(args.ckpt, model, opt)["step"]
        if rank == 0:
            print(f"resumed from {args.ckpt} at step {start}")

    def loss_fn(mb):
        x, y = mb
        return nn.functional.cross_entropy(model(x).float(), y)

    t0 = time.perf_counter()
    for step in range(start, args.steps):
        x, y = batch(step, args.batch_size)
        local = (x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device))
        loss = opt.step(loss_fn, local)
        mean = loss.detach().reshape(1).to(device)
        dist.all_reduce(mean)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {float(mean) / world:.4f}  "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
        if (step + 1) % args.save_every == 0 or step == args.steps - 1:
            save_sharded_checkpoint(args.ckpt, model, opt, extra={"step": step + 1})

    with torch.no_grad():  # held-out accuracy (same batch on every rank, no perturbation)
        x, y = batch(999_999, 256)
        acc = (model(x.to(device)).argmax(1).cpu() == y).float().mean()
    if rank == 0:
        print(f"held-out accuracy {float(acc):.3f} after {opt.steps} optimizer steps "
              f"(m = {args.micro_batches}, rho = {args.rho}, world size {world})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
