"""``msam bench``: step time and peak memory of SGD, SAM and mSAM (loop / vmap) per model.

::

    msam bench                                   # the quick plan (about 10 minutes, 2 cores)
    msam bench --full --threads 1 --out benchmarks/results     # the committed results
    msam bench --models small_cnn --m 4,8 --steps 60
    msam bench --models mlp,resnet20 --m 1,4 --strategies loop --variants gsam,wsam
    python -m msam.bench --models mlp --steps 5 --out /tmp/bench

Writes ``bench.json`` (every step time, statistics, memory, machine and command),
``bench.md`` (tables, targets) and ``bench.png`` into ``--out`` (rewritten after each model,
so an interrupted run keeps what it finished). See :mod:`msam.bench.runner` for the protocol
and :mod:`msam.bench.memory` for what "peak memory" means.

Plans (``--m``, ``--strategies``, ``--steps`` and ``--warmup`` override them for every model):

* **quick** (default): the full grid (m = 1..32, loop and vmap) on ``mlp`` and ``small_cnn``;
  m in {1, 4, 8} on ``resnet20``; SGD, SAM and mSAM-loop m = 8 on ``wrn16_4`` and ``minilm``;
  few timed rounds for the big models. About 10 minutes on 2 CPU cores.
* **full** (``--full``): m = 1, 2, 4, 8, 16, 32 with loop and vmap on every model, more
  rounds. Over an hour on 2 CPU cores.

The memory pass (two profiled steps per method) also serves as warm-up, so the plans add no
warm-up round unless ``--no-memory`` is given (then one).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["DEFAULT_MODELS", "FULL_PLAN", "QUICK_PLAN", "add_arguments", "main", "run"]

DEFAULT_MODELS = ("mlp", "small_cnn", "resnet20", "wrn16_4", "minilm")
DEFAULT_M = (1, 2, 4, 8, 16, 32)
BOTH = ("loop", "vmap")
DEFAULT_OUT = "runs/bench"


class PlanDefaults(NamedTuple):
    rounds: int
    warmup: int
    m_values: tuple[int, ...]
    strategies: tuple[str, ...]


#: The default plan: about 10 minutes on 2 CPU cores.
QUICK_PLAN: dict[str, PlanDefaults] = {
    "mlp": PlanDefaults(15, 1, DEFAULT_M, BOTH),
    "small_cnn": PlanDefaults(4, 0, DEFAULT_M, BOTH),
    "resnet20": PlanDefaults(2, 0, (1, 4, 8), BOTH),
    "wrn16_4": PlanDefaults(1, 0, (1, 8), ("loop",)),
    "minilm": PlanDefaults(1, 0, (1, 8), ("loop",)),
    "transformer": PlanDefaults(4, 0, (1, 4, 8), BOTH),
}
#: ``--full``: the committed results (benchmarks/README.md).
FULL_PLAN: dict[str, PlanDefaults] = {
    "mlp": PlanDefaults(40, 1, DEFAULT_M, BOTH),
    "small_cnn": PlanDefaults(20, 0, DEFAULT_M, BOTH),
    "resnet20": PlanDefaults(8, 0, DEFAULT_M, BOTH),
    "wrn16_4": PlanDefaults(4, 0, DEFAULT_M, BOTH),
    "minilm": PlanDefaults(3, 0, DEFAULT_M, BOTH),
    "transformer": PlanDefaults(4, 0, (1, 4, 8), BOTH),
}
FALLBACK = PlanDefaults(3, 0, (1, 4, 8), BOTH)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``msam bench`` options to ``parser``."""
    parser.description = (
        "Per-step wall time (median, IQR, p10/p90 over interleaved rounds) and peak memory of "
        "SGD, SAM and mSAM (loop / vmap strategies, several m) on each model; ratios to SGD and "
        "SAM from the same run. Writes bench.json, bench.md and bench.png.")
    parser.add_argument("--models", type=_str_list, default=list(DEFAULT_MODELS),
                        metavar="A,B", help=f"models (default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--full", action="store_true",
                        help="the full plan: m = 1..32, loop and vmap, on every model (> 1 hour)")
    parser.add_argument("--m", dest="m_values", type=_int_list, default=None, metavar="1,2,..",
                        help="micro-batch counts (default: per model and plan, see above)")
    parser.add_argument("--strategies", type=_str_list, default=None, metavar="S,..",
                        help="mSAM strategies among loop, vmap, batched, lowrank, auto "
                             "(default: per model)")
    parser.add_argument("--variants", type=_str_list, default=None, metavar="V,..",
                        help="also time SAM-family rules with their default hyperparameters, "
                             "for every --m and strategy: gsam, friendlysam, wsam, gcsam "
                             "(docs/variants.md)")
    parser.add_argument("--no-accum", action="store_true",
                        help="leave out the 'SGD with m accumulated micro-batches' baselines")
    parser.add_argument("--batch-size", type=int, default=128, metavar="N",
                        help="examples per batch (default 128)")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="timed rounds per model (default: per model, see module doc)")
    parser.add_argument("--warmup", type=int, default=None, metavar="N",
                        help="untimed warm-up rounds per model (default: per model)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="stop timing a model after this many seconds (>= 3 rounds kept)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch intra-op threads (default: torch's default, "
                             "torch.get_num_threads())")
    parser.add_argument("--device", default="cpu", metavar="DEV",
                        help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--text-length", type=int, default=32, metavar="L",
                        help="tokens per example for minilm (default 32)")
    parser.add_argument("--schedules", default=None, metavar="every5,late0.75,..",
                        help="also time mSAM loop schedules (docs/schedules.md): everyK, lateF "
                             "(the last 1-F of the steps), looksamK; per step, the mean over "
                             "one window of the schedule")
    parser.add_argument("--schedule-m", type=int, default=8, metavar="M",
                        help="micro-batches of the --schedules methods (default 8)")
    parser.add_argument("--schedule-strategy", type=_str_list, default=["loop"], metavar="S,..",
                        help="strategies of the --schedules methods' perturbation steps, each "
                             "timed: loop (default), vmap, batched, lowrank, auto")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM radius (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="model init / data / order seed")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--no-plot", action="store_true", help="do not write bench.png")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="only rewrite bench.md / bench.png from an existing bench.json "
                             "(into --out, default: the JSON's folder); runs nothing")


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def _command(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(shlex.quote(a) for a in ["msam", *args]) if args and args[0] == "bench" \
        else " ".join(shlex.quote(a) for a in ["msam", "bench", *args])


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run the benchmark described by ``args`` (from :func:`add_arguments`); exit code."""
    import torch

    from msam.bench.report import write_reports
    from msam.bench.runner import ModelPlan, run_model
    from msam.bench.workloads import build_workload, make_methods, parse_schedules
    from msam.models import MODELS

    def err(msg: str) -> int:
        print(f"msam bench: error: {msg}", file=sys.stderr, flush=True)
        return EXIT_USAGE

    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    if args.render:
        return _render(args, err, log)
    from msam.bench.workloads import BENCH_ONLY_MODELS

    unknown = [m for m in args.models if m not in MODELS and m not in BENCH_ONLY_MODELS]
    if unknown:
        return err(f"unknown model(s) {', '.join(unknown)}; valid: "
                   f"{', '.join([*MODELS, *BENCH_ONLY_MODELS])}")
    known = ("loop", "vmap", "batched", "lowrank", "auto")
    bad = [s for s in args.strategies or () if s not in known]
    if bad:
        return err(f"unknown strategy {', '.join(bad)}; valid: loop, vmap, batched, lowrank, auto")
    from msam.bench.workloads import variant_names

    names = variant_names()  # the rule registry
    bad = [v for v in args.variants or () if v not in names]
    if bad:
        return err(f"unknown variant {', '.join(bad)}; valid: {', '.join(names)}")
    if args.batch_size < 1:
        return err("--batch-size must be >= 1")
    for flag in ("steps", "warmup"):
        v = getattr(args, flag)
        if v is not None and v < (1 if flag == "steps" else 0):
            return err(f"--{flag} must be >= {1 if flag == 'steps' else 0}")
    if args.m_values and max(args.m_values) > args.batch_size:
        return err(f"--m {max(args.m_values)} exceeds the batch size {args.batch_size}")
    bad = [s for s in args.schedule_strategy
           if s not in ("loop", "vmap", "batched", "lowrank", "auto")]
    if bad or not args.schedule_strategy:
        return err(f"--schedule-strategy: unknown strategy {(bad or [''])[0]!r}; valid: "
                   "loop, vmap, batched, lowrank, auto")
    try:
        schedules = [meth for s in dict.fromkeys(args.schedule_strategy)
                     for meth in parse_schedules(args.schedules or "", args.schedule_m, s)]
    except ValueError as e:
        return err(str(e))
    if schedules and not 1 <= args.schedule_m <= args.batch_size:
        return err(f"--schedule-m must be in [1, --batch-size={args.batch_size}]")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            return err(f"--device {args.device!r}: {e}")
        if device.type == "cuda" and not torch.cuda.is_available():
            return err("--device cuda: CUDA is not available")
    if args.threads is not None:
        if args.threads < 1:
            return err("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from msam.training.study import cpu_name

    meta: dict[str, Any] = {
        "command": _command(argv),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": threads,
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "batch_size": args.batch_size, "rho": args.rho,
        "seed": args.seed, "loadavg_start": _loadavg(),
    }
    from msam.bench.memory import MEMORY_METHOD

    meta["memory_method"] = MEMORY_METHOD if not args.no_memory else "not measured"
    out_dir = Path(args.out or DEFAULT_OUT)
    data: dict[str, Any] = {"meta": meta, "models": []}
    failed = False
    t0 = time.perf_counter()
    log(f"msam bench: {', '.join(args.models)} on {meta['device']}, {threads} thread(s), "
        f"batch {args.batch_size}; output {out_dir}")
    plans = FULL_PLAN if args.full else QUICK_PLAN
    meta["plan"] = "full" if args.full else "quick"
    for name in args.models:
        defaults = plans.get(name, FALLBACK)
        m_values = [m for m in (args.m_values or defaults.m_values) if m <= args.batch_size]
        warmup = args.warmup if args.warmup is not None else (
            defaults.warmup if not args.no_memory else max(1, defaults.warmup))
        plan = ModelPlan(
            model=name,
            methods=make_methods(m_values, args.strategies or defaults.strategies,
                                 accum=not args.no_accum, variants=args.variants or ()) + schedules,
            steps=args.steps if args.steps is not None else defaults.rounds,
            warmup=warmup, budget_s=args.budget, memory=not args.no_memory,
            text_length=args.text_length,
        )
        log(f"{name}: {len(plan.methods)} methods, m in {m_values}, {plan.steps} timed "
            f"round(s) after {plan.warmup} warm-up")
        try:
            wl = build_workload(name, args.batch_size, device=device, seed=args.seed,
                                text_length=args.text_length)
            result = run_model(wl, plan, device=device, seed=args.seed, rho=args.rho, log=log)
        except Exception as e:  # noqa: BLE001 - one model failing must not lose the others
            failed = True
            log(f"{name}: FAILED: {type(e).__name__}: {e}")
            data["models"].append({"model": name, "error": f"{type(e).__name__}: {e}",
                                   "results": [], "rounds": 0, "warmup_rounds": 0,
                                   "params": 0, "param_bytes": 0, "input": "-",
                                   "batch_size": args.batch_size, "batchnorm": False})
            continue
        finally:
            meta["loadavg_end"] = _loadavg()
            meta["total_seconds"] = round(time.perf_counter() - t0, 1)
        data["models"].append(result)
        # A strategy the model cannot run (vmap on a model it cannot trace) is a result, not a
        # failure of the benchmark; any other method failing is.
        if any(r.get("error") and r.get("strategy") not in ("vmap", "batched", "lowrank", "auto")
               for r in result["results"]):
            failed = True
        paths = write_reports(data, out_dir, plot=not args.no_plot)
        written = ", ".join(map(str, paths.values()))
        log(f"{name}: done in {result['seconds']:.0f}s; wrote {written}")
        if not args.quiet:
            _print_summary(result)
    paths = write_reports(data, out_dir, plot=not args.no_plot)
    log(f"msam bench: finished in {time.perf_counter() - t0:.0f}s")
    return EXIT_FAILED if failed else EXIT_OK


def _render(args: argparse.Namespace, err: Any, log: Any) -> int:
    import json

    from msam.bench.report import write_reports

    src = Path(args.render)
    try:
        data = json.loads(src.read_text())
    except (OSError, ValueError) as e:
        return err(f"--render {src}: {e}")
    if not isinstance(data, dict) or "meta" not in data or "models" not in data:
        return err(f"--render {src}: not a bench.json (no 'meta' / 'models')")
    out = src.parent if args.out is None else Path(args.out)
    paths = write_reports(data, out, plot=not args.no_plot, stem=src.stem)
    log(f"wrote {', '.join(map(str, paths.values()))}")
    return EXIT_OK


def _print_summary(result: dict[str, Any]) -> None:
    def ratio(x: float | None) -> str:
        return "    -" if x is None else f"{x:5.2f}"

    for r in result["results"]:
        t = r.get("time_s")
        if not t:
            continue
        mem = r.get("memory", {}).get("peak_bytes")
        print(f"  {r['label']:<38} {1000 * t['median']:9.1f} ms  x SGD {ratio(r.get('ratio_sgd'))}"
              f"  x SAM {ratio(r.get('ratio_sam'))}"
              + (f"  peak {mem / 2**20:8.1f} MiB" if mem else ""), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m msam.bench [options]``."""
    parser = argparse.ArgumentParser(prog="python -m msam.bench")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    return run(args, argv)
