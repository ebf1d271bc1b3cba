"""Step time of two versions of the msam core side by side, in one process, interleaved.

The other version is a copy of an earlier ``src/msam`` renamed to ``msam_before`` (so both
import at once)::

    git worktree add --detach /tmp/before <rev>
    python benchmarks/compare_core.py --make-copy /tmp/before/src/msam --into /tmp/pkgs
    python benchmarks/compare_core.py --before /tmp/pkgs --models mlp,small_cnn,resnet20 --m 1,4,8

Each round times one optimizer step of every (version, m) pair on the same model object and
batch, in a shuffled order; the figure per pair is the median over rounds of the per-round
ratio after / before (paired, so machine noise that hits one round hits both versions).
"""

from __future__ import annotations

import argparse
import importlib
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch


def make_copy(src: Path, into: Path) -> None:
    dst = into / "msam_before"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for f in dst.rglob("*.py"):
        text = f.read_text()
        text = re.sub(r"\b(from|import) msam\b", r"\1 msam_before", text)
        text = re.sub(r"\bmsam\.(?=[a-z_]+)", "msam_before.", text)
        f.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--make-copy", type=Path)
    ap.add_argument("--into", type=Path)
    ap.add_argument("--before", type=Path, help="folder holding the msam_before package")
    ap.add_argument("--models", default="mlp,small_cnn,resnet20")
    ap.add_argument("--m", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--strategies", default="loop",
                    help="comma-separated; MODEL:STRATEGY limits one to a model (mlp:lowrank)")
    args = ap.parse_args()
    if args.make_copy:
        make_copy(args.make_copy, args.into)
        return
    sys.path.insert(0, str(args.before))
    before = importlib.import_module("msam_before")
    import msam
    from msam.bench.workloads import build_workload

    torch.set_num_threads(args.threads)
    ms = [int(x) for x in args.m.split(",")]
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, "
          f"{args.rounds} rounds; ratio = after / before (median of per-round ratios)")
    print("| model | strategy | m | before (ms) | after (ms) | after / before |")
    print("|---|---|---:|---:|---:|---:|")
    ratios = []
    for name in args.models.split(","):
        wl = build_workload(name, args.batch_size)
        strategies = [s.split(":")[-1] for s in args.strategies.split(",")
                      if ":" not in s or s.split(":")[0] == name]
        opts = {}
        for tag, lib in (("before", before), ("after", msam)):
            for m in ms:
                for st in strategies:
                    opts[(tag, m, st)] = lib.MSAM(
                        wl.model.parameters(), torch.optim.SGD, rho=0.05, micro_batches=m,
                        lr=1e-3, momentum=0.9, model=wl.model, strategy=st)
        times: dict = {k: [] for k in opts}
        keys = list(opts)
        for r in range(args.rounds + 1):
            random.Random(r).shuffle(keys)
            for k in keys:
                t0 = time.perf_counter()
                opts[k].step(wl.loss_fn, wl.batch)
                dt = time.perf_counter() - t0
                if r > 0:  # round 0 warms up
                    times[k].append(dt)
        for st in strategies:
            for m in ms:
                b, a = times[("before", m, st)], times[("after", m, st)]
                ratio = statistics.median(x / y for x, y in zip(a, b))
                ratios.append(ratio)
                print(f"| {name} | {st} | {m} | {1e3 * statistics.median(b):.1f} | "
                      f"{1e3 * statistics.median(a):.1f} | {ratio:.3f} |", flush=True)
    print(f"median of the ratios: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
