"""Step time of msam's SAM family against the SAM-family peer, pytorch_optimizer 4.1.

    pip install --no-deps "pytorch_optimizer==4.1.*"      # for this benchmark only
    python benchmarks/peer.py --rounds 30 --threads 1      # MLP 784-512-256-10, batch 128

Each variant runs the same equations in both libraries (SAM, GSAM, WSAM decoupled,
FriendlySAM, and GCSAM = the peer's ``SAM(use_gc=True)``) around SGD with momentum, m = 1, on
one model object per library and the same batch. The peer is called as its documentation says
(a closure that zeroes, runs forward and ``backward()``; GSAM through ``set_closure``); msam
as ``opt.step(loss_fn, batch)``. Each round times ``--steps`` steps of every (variant,
library) pair in a shuffled order; the figure per variant is the median over rounds of the
per-round ratio msam / peer (paired, so machine noise that hits one round hits both).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import msam

VARIANTS = ("sam", "gsam", "wsam", "friendlysam", "gcsam")


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256),
                         nn.ReLU(), nn.Linear(256, 10))


def _msam(kind: str, model: nn.Module, rho: float):
    rule = {"sam": "sam", "gsam": msam.core.GSAMRule(alpha=0.4),
            "wsam": msam.core.WSAMRule(gamma=0.9), "friendlysam": "friendlysam",
            "gcsam": "gcsam"}[kind]
    opt = msam.MSAM(model.parameters(), torch.optim.SGD, rho=rho, rule=rule, model=model,
                    lr=0.1, momentum=0.9)

    def step(x, y):
        opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), (x, y))

    return step


def _peer(kind: str, model: nn.Module, rho: float):
    import pytorch_optimizer as po

    if kind == "gsam":
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(base, lambda s: 1.0)
        rho_sched = po.ProportionScheduler(sched, max_lr=0.1, min_lr=0.0, max_value=rho,
                                           min_value=rho)
        opt = po.GSAM(model.parameters(), base, model, rho_sched, alpha=0.4)

        def gsam_step(x, y):
            opt.set_closure(F.cross_entropy, x, y)
            opt.step()
            opt.update_rho_t()

        return gsam_step
    if kind == "wsam":
        opt = po.WSAM(model, model.parameters(), torch.optim.SGD, rho=rho, gamma=0.9,
                      decouple=True, lr=0.1, momentum=0.9)
    elif kind == "friendlysam":
        opt = po.FriendlySAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1, momentum=0.9)
    else:
        opt = po.SAM(model.parameters(), torch.optim.SGD, rho=rho, use_gc=kind == "gcsam",
                     lr=0.1, momentum=0.9)

    def step(x, y):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if kind == "wsam":
            opt.step(closure)
        else:
            closure()
            opt.step(closure)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=5, help="steps per timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rho", type=float, default=0.05)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinds = args.variants.split(",")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    runners = {}
    for kind in kinds:
        runners[(kind, "msam")] = _msam(kind, _mlp(1), args.rho)
        runners[(kind, "peer")] = _peer(kind, _mlp(1), args.rho)
    for run in runners.values():   # warm-up
        for _ in range(3):
            run(x, y)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(runners)
        rng.shuffle(order)
        for key in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                runners[key](x, y)
            times[key].append((time.perf_counter() - t0) / args.steps)
    print(f"torch {torch.__version__}, {args.threads} thread(s), MLP 784-512-256-10, batch 128, "
          f"{args.rounds} rounds x {args.steps} steps")
    print("| variant | msam (ms) | peer (ms) | msam / peer |")
    print("|---|---:|---:|---:|")
    for kind in kinds:
        a, b = times[(kind, "msam")], times[(kind, "peer")]
        ratio = statistics.median(p / q for p, q in zip(a, b))
        print(f"| {kind} | {1e3 * statistics.median(a):.2f} | {1e3 * statistics.median(b):.2f} "
              f"| {ratio:.3f} |")


if __name__ == "__main__":
    main()
