"""``msam sharpness CHECKPOINT``: measure a trained run's sharpness; print a table, write JSON.

    msam sharpness runs/demo/msam_m4_rho0.05_seed0 --metrics lambda_max,trace,m_sharpness \
        --examples 2048 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run folder (final.pt / last.pt inside) or a .pt file")
    p.add_argument("--metrics", default="lambda_max,trace,m_sharpness",
                   help="comma-separated: loss, grad_norm, lambda_max, top_eigenvalues, trace, "
                        "m_sharpness, average_sharpness, spectral_density")
    p.add_argument("--examples", type=int, default=2048, help="training examples (seeded)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rho", type=float, default=None,
                   help="m-sharpness radius (default 0.05 for every run, so runs compare)")
    p.add_argument("--m", type=int, default=None,
                   help="m-sharpness: micro-batches per batch, a count as for training (default "
                        "1); must divide --batch-size")
    p.add_argument("--probes", type=int, default=None, help="Hutchinson probes for trace")
    p.add_argument("--max-iter", type=int, default=None, help="Lanczos iteration cap")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", default=None,
                   help="output JSON path (default: sharpness-<seed>.json beside the checkpoint)")


def run(args: argparse.Namespace) -> int:
    import torch

    from msam.analysis import format_table
    from msam.training.checkpoint import atomic_write_text
    from msam.training.config import ConfigError
    from msam.training.measure import measure_checkpoint, resolve_checkpoint

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    metrics = [s.strip() for s in args.metrics.split(",") if s.strip()]
    options = {}
    if args.probes is not None:
        options["num_probes"] = args.probes
    if args.max_iter is not None:
        options["max_iter"] = args.max_iter
    t0 = time.perf_counter()
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        result = measure_checkpoint(
            ckpt, metrics=metrics, examples=args.examples, batch_size=args.batch_size,
            seed=args.seed, rho=args.rho, m=args.m, options=options)
    except (FileNotFoundError, ValueError, ConfigError) as err:
        print(f"msam: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.json) if args.json else ckpt.parent / f"sharpness-{args.seed}.json"
    atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True))
    print(format_table(result))
    print(f"examples: {result['examples']}  time: {time.perf_counter() - t0:.1f}s  json: {out}")
    return 0
