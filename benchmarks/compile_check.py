"""torch.compile with msam: graphs compiled over a run, and step time compiled vs eager.

    python benchmarks/compile_check.py --steps 20 --m 2

A BatchNorm MLP (784-256-BN-256-10, batch 128) trained by mSAM; the compiled model is counted
with a backend wrapper around inductor (one call per graph dynamo hands over). Step times are
medians over the last half of the steps, eager and compiled interleaved step by step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import msam


def model_fn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.BatchNorm1d(256), nn.ReLU(),
                         nn.Linear(256, 10))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="inductor")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from torch._dynamo import lookup_backend

    inner = lookup_backend(args.backend)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return inner(gm, example_inputs)

    eager, base = model_fn(), model_fn()
    compiled = torch.compile(base, backend=counting)
    kw = {"rho": 0.05, "micro_batches": args.m, "lr": 0.05, "momentum": 0.9}
    opt_e = msam.MSAM(eager.parameters(), torch.optim.SGD, model=eager, **kw)
    opt_c = msam.MSAM(base.parameters(), torch.optim.SGD, model=compiled, **kw)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    t_e, t_c = [], []
    for s in range(args.steps):
        t0 = time.perf_counter()
        opt_e.step(lambda b: F.cross_entropy(eager(b[0]), b[1]), (x, y))
        t1 = time.perf_counter()
        opt_c.step(lambda b: F.cross_entropy(compiled(b[0]), b[1]), (x, y))
        t2 = time.perf_counter()
        t_e.append(t1 - t0)
        t_c.append(t2 - t1)
        if s == 0:
            print(f"first step: eager {1e3 * t_e[0]:.0f} ms, compiled {1e3 * t_c[0]:.0f} ms "
                  f"(includes compilation)")
    half = args.steps // 2
    me, mc = statistics.median(t_e[half:]), statistics.median(t_c[half:])
    diff = max(float((a - b).abs().max()) for a, b in
               zip(eager.state_dict().values(), base.state_dict().values()))
    print(f"m={args.m}, {args.steps} steps, backend {args.backend}: {len(graphs)} graphs "
          f"compiled (nodes {graphs}); step time eager {1e3 * me:.2f} ms, compiled "
          f"{1e3 * mc:.2f} ms, compiled / eager {mc / me:.2f}; max |eager - compiled| over "
          f"weights and BatchNorm buffers {diff:.2e}; num_batches_tracked "
          f"{int(base[2].num_batches_tracked)}")


if __name__ == "__main__":
    main()
