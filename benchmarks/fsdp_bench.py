"""FSDP2 mSAM vs FSDP2 base optimizer vs DDP mSAM: step time and peak memory per rank, one run.

    torchrun --nproc_per_node=2 benchmarks/fsdp_bench.py --steps 24 --rounds 4 \
        --markdown benchmarks/results/fsdp.md

Configurations (each its own model, optimizer and wrapper, same initial weights, same data;
a small transformer on synthetic tokens, AdamW, float32, rho = 0.05):

* ``fsdp-base-m1``: FSDP2, one forward + backward of the local batch, AdamW step;
* ``fsdp-base-m4``: FSDP2, gradient accumulation over 4 micro-batches, every backward
  reduce-scattered into the sharded ``.grad`` (FSDP2's default);
* ``fsdp-base-m4-nosync``: the same with ``set_requires_gradient_sync(False)`` for the first 3
  backwards (FSDP then accumulates **unsharded** full-size gradients and reduce-scatters once);
* ``fsdp-msam-m1`` / ``fsdp-msam-m4``: :class:`msam.distributed.ShardedMSAM` (SAM and mSAM);
* ``ddp-msam-m1`` / ``ddp-msam-m4``: :class:`msam.distributed.DistributedMSAM` (local mode).

Step time: interleaved rounds, each step from a barrier to its end on the slower rank; median.
Memory (per rank, the larger rank): ``state`` = this rank's parameters, ``.grad``, optimizer
state and batch before the step (local shards for FSDP); ``peak`` = state + the largest
increase of live allocator bytes during the step (``torch.profiler`` ``profile_memory``, as
``msam.bench.memory``). The FSDP-mSAM overhead is compared with one parameter shard plus one
perturbation shard (``2 x`` the local parameter bytes).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

from msam.bench.memory import _cpu_step_peak, tensor_bytes
from msam.distributed import DistributedMSAM, ShardedMSAM, ddp_kwargs
from msam.strategies.base import local

VOCAB, SEQ, CLASSES = 512, 32, 4


class TinyTransformer(nn.Module):
    def __init__(self, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.zeros(SEQ, d))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
            for _ in range(layers))
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


def _build(kind: str, args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyTransformer(args.d_model, args.layers, args.heads)
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model, **ddp_kwargs()), model
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model, model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--steps", type=int, default=24, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--memory-repeats", type=int, default=5)
    p.add_argument("--markdown", default=None, help="write the table here (rank 0)")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    if not dist.is_initialized():
        raise SystemExit("run under torchrun (see the module docstring)")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(100 + rank)
    data = [(torch.randint(0, VOCAB, (args.batch_size, SEQ), generator=g),
             torch.randint(0, CLASSES, (args.batch_size,), generator=g)) for _ in range(4)]

    runs: dict[str, dict] = {}
    for name in ("fsdp-base-m1", "fsdp-base-m4", "fsdp-base-m4-nosync", "fsdp-msam-m1",
                 "fsdp-msam-m4", "ddp-msam-m1", "ddp-msam-m4"):
        kind, method, m = name.split("-")[0], name.split("-")[1], int(name.split("-")[2][1:])
        wrapped, module = _build(kind, args)
        kw = {"lr": 1e-3, "weight_decay": 0.01}
        if method == "base":
            opt = torch.optim.AdamW(module.parameters(), **kw)
        elif kind == "fsdp":
            opt = ShardedMSAM(wrapped, torch.optim.AdamW, rho=0.05, micro_batches=m, **kw)
        else:
            opt = DistributedMSAM(wrapped, None, torch.optim.AdamW, rho=0.05, micro_batches=m,
                                  **kw)
        runs[name] = {"model": wrapped, "module": module, "opt": opt, "m": m,
                      "nosync": name.endswith("nosync"), "times": [], "kind": kind,
                      "method": method}

    def step(name: str, batch: tuple) -> None:
        r = runs[name]
        model, opt, m = r["model"], r["opt"], r["m"]

        def loss_fn(b):
            return nn.functional.cross_entropy(model(b[0]), b[1])

        if r["method"] == "msam":
            opt.step(loss_fn, batch)
            return
        opt.zero_grad(set_to_none=True)
        parts = list(zip(*(torch.tensor_split(t, m) for t in batch)))
        for j, mb in enumerate(parts):
            if r["nosync"]:
                model.set_requires_gradient_sync(j == m - 1)
            (loss_fn(mb) / m).backward()
        opt.step()

    def timed(name: str, i: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        step(name, data[i % len(data)])
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        return float(dt)

    def state_bytes(name: str, batch: tuple) -> int:
        r = runs[name]
        opt = r["opt"]
        base = getattr(opt, "base_optimizer", opt)
        ts = []
        for prm in r["module"].parameters():
            ts.append(local(prm))
            if prm.grad is not None:
                ts.append(local(prm.grad))
            for v in base.state.get(prm, {}).values():
                if isinstance(v, torch.Tensor):
                    ts.append(local(v))
        return tensor_bytes(ts + list(batch))

    memory = {}
    for name in runs:
        for i in range(args.warmup):
            timed(name, i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _cpu_step_peak(lambda n=name: step(n, data[0]))      # leftovers get known sizes
            state = state_bytes(name, data[0])
            # 5 measured steps: when gloo's all-gather / reduce-scatter buffers are freed
            # varies from step to step (by up to a few shards here); min and max reported
            peaks = [_cpu_step_peak(lambda n=name: step(n, data[0]))
                     for _ in range(args.memory_repeats)]
        vals = torch.tensor([state, state + min(peaks), state + max(peaks)],
                            dtype=torch.float64)
        dist.all_reduce(vals, op=dist.ReduceOp.MAX)
        memory[name] = {"state": int(vals[0]), "peak": int(vals[1]), "peak_max": int(vals[2])}
    per_round = max(1, args.steps // args.rounds)
    for rnd in range(args.rounds):
        for name in runs:
            for i in range(per_round):
                runs[name]["times"].append(timed(name, rnd * per_round + i))

    module = runs["fsdp-base-m1"]["module"]
    n_params = sum(prm.numel() for prm in module.parameters())
    shard = torch.tensor([sum(local(prm).numel() * local(prm).element_size()
                              for prm in module.parameters())], dtype=torch.float64)
    dist.all_reduce(shard, op=dist.ReduceOp.MAX)
    shard_bytes = int(shard)
    med = {n: statistics.median(r["times"]) for n, r in runs.items()}
    rows = []
    for name, r in runs.items():
        q = statistics.quantiles(r["times"], n=4)
        base_name = f"fsdp-base-m{r['m']}"
        over = memory[name]["peak"] - memory[base_name]["peak"]
        rows.append({
            "config": name, "median_ms": 1e3 * med[name], "q1_ms": 1e3 * q[0],
            "q3_ms": 1e3 * q[2], "vs_base_same_m": med[name] / med[base_name],
            "vs_base_m1": med[name] / med["fsdp-base-m1"],
            "state_kib": memory[name]["state"] / 1024, "peak_kib": memory[name]["peak"] / 1024,
            "peak_max_kib": memory[name]["peak_max"] / 1024,
            "over_base_kib": over / 1024, "over_in_shards": over / shard_bytes,
        })
    if rank == 0:
        cmd = f"torchrun --nproc_per_node={world} {' '.join(sys.argv)}"
        head = (f"TinyTransformer d={args.d_model}, {args.layers} layers, {n_params:,} parameters "
                f"(one shard: {shard_bytes / 1024:.1f} KiB on the larger rank), {world} ranks "
                f"({dist.get_backend()}), {args.batch_size} sequences x {SEQ} tokens per rank, "
                f"AdamW, float32, 1 thread/rank, {per_round * args.rounds} timed steps per "
                f"configuration, torch {torch.__version__}, {platform.machine()}, "
                f"{os.cpu_count()} CPUs")
        lines = [f"Command: `{cmd}`", "", head, "",
                 "| configuration | median ms (IQR) | vs FSDP-base same m | vs FSDP-base m=1 | "
                 "state KiB | peak KiB / rank, min (max) | min peak over FSDP-base same m | "
                 "in shards |",
                 "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(
                f"| {row['config']} | {row['median_ms']:.1f} ({row['q1_ms']:.1f}-"
                f"{row['q3_ms']:.1f}) | {row['vs_base_same_m']:.3f} | {row['vs_base_m1']:.3f} | "
                f"{row['state_kib']:.0f} | {row['peak_kib']:.0f} ({row['peak_max_kib']:.0f}) | "
                f"{row['over_base_kib']:+.0f} KiB | {row['over_in_shards']:+.2f} |")
        print("\n".join(lines))
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("# FSDP2: ShardedMSAM vs FSDP base vs DDP mSAM\n\n"
                        + "\n".join(lines) + "\n")
    dist.destroy_process_group()
    return {"rows": rows, "shard_bytes": shard_bytes}


if __name__ == "__main__":
    main()
