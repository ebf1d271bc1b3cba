"""Step time of mSAM-DDP (local perturbations) vs synchronized SAM, in one launch.

Run under torchrun, e.g. on 2 CPU processes::

    torchrun --nproc_per_node=2 -m msam.distributed.bench --model cnn --steps 60

Each configuration gets its own model, DDP wrapper and optimizer, all from the same initial
weights and on the same data; the configurations are timed in interleaved rounds (so that a
change in machine load hits them alike). A step is timed from a barrier to its end on every
rank, the slowest rank counts, and the median over all timed steps is reported, with its ratio
to synchronized SAM. Rank 0 prints the table (and ``--json`` writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from msam.distributed.optimizer import DistributedMSAM, ddp_kwargs

CONFIGS = {
    # name: (mode, local micro-batches)
    "sam-synchronized": ("synchronized", 1),
    "msam-local-m1": ("local", 1),
    "msam-local-m2": ("local", 2),
}


def _model(kind: str) -> nn.Module:
    if kind == "cnn":  # 1x28x28 inputs, ~60k parameters
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10),
        )
    if kind == "mlp":  # 784 inputs, ~1.3M parameters: more to all-reduce per unit of compute
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 1024), nn.BatchNorm1d(1024), nn.ReLU(),
            nn.Linear(1024, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 10),
        )
    raise ValueError(f"--model must be cnn or mlp, got {kind!r}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--steps", type=int, default=60, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-error-check", action="store_true",
                   help="check_errors=False (no error-flag all-reduce per step)")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    if not dist.is_initialized():
        raise SystemExit("run under torchrun (see the module docstring)")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = args.batch_size // world

    g = torch.Generator().manual_seed(0)
    n_batches = 8
    data = [(torch.randn(args.batch_size, 1, 28, 28, generator=g),
             torch.randint(0, 10, (args.batch_size,), generator=g)) for _ in range(n_batches)]
    data = [(x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local])
            for x, y in data]

    runs = {}
    for name, (mode, m) in CONFIGS.items():
        torch.manual_seed(0)
        model = _model(args.model)
        ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs())
        opt = DistributedMSAM(ddp, None, torch.optim.SGD, rho=0.05, mode=mode, micro_batches=m,
                              check_errors=not args.no_error_check, lr=0.01, momentum=0.9)
        runs[name] = (ddp, opt, [])

    def one_step(name: str, i: int) -> float:
        ddp, opt, _ = runs[name]
        dist.barrier()
        t0 = time.perf_counter()
        opt.step(lambda b: nn.functional.cross_entropy(ddp(b[0]), b[1]), data[i % n_batches])
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        return float(dt)

    for name in runs:
        for i in range(args.warmup):
            one_step(name, i)
    per_round = max(1, args.steps // args.rounds)
    for r in range(args.rounds):
        for name in runs:
            for i in range(per_round):
                runs[name][2].append(one_step(name, r * per_round + i))

    n_params = sum(p.numel() for p in runs["sam-synchronized"][1]._params())
    base = statistics.median(runs["sam-synchronized"][2])
    result = {
        "model": args.model, "parameters": n_params, "world_size": world,
        "global_batch": args.batch_size, "threads_per_rank": args.threads,
        "check_errors": not args.no_error_check,
        "steps_per_config": per_round * args.rounds, "torch": torch.__version__,
        "backend": dist.get_backend(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "configs": {},
    }
    for name, (_, opt, times) in runs.items():
        med = statistics.median(times)
        q = statistics.quantiles(times, n=4)
        result["configs"][name] = {
            "comm_per_step": {k: v / (len(times) + args.warmup)
                              for k, v in opt.comm_counts.items()},
            "mode": opt.mode, "local_m": opt.engine.micro_batches,
            "perturbations_per_step": opt.global_micro_batches,
            "median_ms": 1e3 * med, "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2],
            "ratio_to_sam": med / base,
        }
    if rank == 0:
        print(f"{args.model} ({n_params:,} parameters), {world} ranks ({result['backend']}), "
              f"global batch {args.batch_size}, {args.threads} thread(s)/rank, "
              f"{per_round * args.rounds} timed steps per configuration, "
              f"check_errors={not args.no_error_check}")
        print(f"{'configuration':18} {'perturb.':>8} {'median ms':>10} {'IQR ms':>15} "
              f"{'vs SAM':>7}")
        for name, c in result["configs"].items():
            print(f"{name:18} {c['perturbations_per_step']:>8} {c['median_ms']:>10.2f} "
                  f"{c['q1_ms']:>7.2f}-{c['q3_ms']:<7.2f} {c['ratio_to_sam']:>7.3f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
