"""What a schedule's off-step costs against a plain SGD step, before/after, side by side.

    python benchmarks/compare_core.py --make-copy /tmp/before/src/msam --into /tmp/pkgs
    python benchmarks/offstep.py --before /tmp/pkgs --models mlp,small_cnn --rounds 40

An off-step (docs/schedules.md) is one pass over the whole batch at ``w`` and the base step;
with ``reuse="looksam"`` the gradient also gets ``alpha ||g|| / ||g_v|| g_v`` added. Each
optimizer takes one perturbation step first (so ``g_v`` exists), then every timed step is an
off-step (``every`` larger than the run). Per round every configuration takes one step, in a
shuffled order; the figure is the median over rounds of the per-round ratio to SGD's step.

``--window 5`` also times whole windows of ``every=5, reuse="looksam"`` (one perturbation step
and four reuse off-steps, per step), and ``--strategy lowrank`` runs the perturbation steps on
that strategy: before/after figures for a change to the perturbation step of a reuse schedule,
e.g. ``python benchmarks/offstep.py --before /tmp/pkgs --models mlp --strategy lowrank
--window 5``.
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", type=Path, default=None,
                    help="folder holding an earlier msam renamed msam_before (compare_core.py)")
    ap.add_argument("--models", default="mlp,small_cnn")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--strategy", default="loop", help="strategy of the perturbation steps")
    ap.add_argument("--window", type=int, default=0,
                    help="also time windows of every=K with LookSAM reuse (K >= 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import msam
    from msam.bench.workloads import build_workload

    libs = [("after", msam)]
    if args.before is not None:
        sys.path.insert(0, str(args.before))
        libs.insert(0, ("before", importlib.import_module("msam_before")))
    print(f"torch {torch.__version__}, {args.threads} thread(s), m = {args.m} on perturbation "
          f"steps ({args.strategy}), {args.rounds} rounds; x SGD = median of per-round ratios")
    print("| model | off-step | version | ms | x SGD |")
    print("|---|---|---|---:|---:|")
    for name in args.models.split(","):
        wl = build_workload(name, 128)
        sgd = torch.optim.SGD(wl.model.parameters(), lr=1e-3, momentum=0.9)

        def sgd_step(sgd=sgd, wl=wl):
            sgd.zero_grad()
            wl.loss_fn(wl.batch).backward()
            sgd.step()

        runs = {("sgd", "-"): sgd_step}
        for tag, lib in libs:
            for kind, reuse in (("plain", None), ("reuse", "looksam")):
                opt = lib.MSAM(wl.model.parameters(), torch.optim.SGD, rho=0.05,
                               micro_batches=args.m, lr=1e-3, momentum=0.9, model=wl.model,
                               every=10 ** 9, reuse=reuse, strategy=args.strategy)
                opt.step(wl.loss_fn, wl.batch)   # the perturbation step (makes g_v)

                def step(opt=opt, wl=wl):
                    opt.step(wl.loss_fn, wl.batch)

                runs[(kind, tag)] = step
            if args.window >= 2:
                opt = lib.MSAM(wl.model.parameters(), torch.optim.SGD, rho=0.05,
                               micro_batches=args.m, lr=1e-3, momentum=0.9, model=wl.model,
                               every=args.window, reuse="looksam", strategy=args.strategy)

                def window(opt=opt, wl=wl, k=args.window):
                    for _ in range(k):
                        opt.step(wl.loss_fn, wl.batch)

                runs[(f"looksam{args.window} window, per step", tag)] = window
        times: dict = {k: [] for k in runs}
        keys = list(runs)
        for r in range(args.rounds + 2):
            random.Random(r).shuffle(keys)
            for k in keys:
                t0 = time.perf_counter()
                runs[k]()
                if r >= 2:
                    times[k].append(time.perf_counter() - t0)
        base = times[("sgd", "-")]
        for k in runs:
            per = args.window if k[0].startswith("looksam") else 1
            times[k] = [t / per for t in times[k]]
            ratio = statistics.median(a / b for a, b in zip(times[k], base))
            print(f"| {name} | {k[0]} | {k[1]} | {1e3 * statistics.median(times[k]):.2f} | "
                  f"{ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
