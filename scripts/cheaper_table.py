"""Issue 26's answer: test-accuracy gain kept against step cost, per model.

For each model (the noisy Fashion-MNIST MLP and the BatchNorm small CNN) and each method, the
mean test accuracy over the seeds of its study, the share of full mSAM's gain over SGD it keeps,
``(acc - acc_SGD) / (acc_mSAM - acc_SGD)``, and its step time as a multiple of SGD's from one
``msam bench`` run per model (benchmarks/cheaper.sh), with the perturbation steps on the loop
strategy and on the best one. A method meets the goal when it keeps >= 80% of the gain at
<= 1.3x SGD.

    python scripts/cheaper_table.py            # writes results/cheaper_msam/table.md

Runs missing from a study (not finished yet) are shown as such, never guessed.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, study dir, row filter, bench key on the loop strategy, bench key prefix for "best")
MLP = [
    ("SGD", "fashion_mnist_noisy_schedules", {"method": "sgd"}, "sgd", None),
    ("full mSAM (m 4, rho 0.2)", "fashion_mnist_noisy_schedules",
     {"method": "msam", "every": "", "start_fraction": "", "reuse": ""}, "msam-loop-m4",
     "msam-*-m4"),
    ("SAM (rho 0.4)", "fashion_mnist_noisy_equal_budget", {"method": "sam", "rho": "0.4"},
     "sam", None),
    ("mSAM every 5", "fashion_mnist_noisy_schedules", {"every": "5", "reuse": ""},
     "msam-m4-every5", "msam-m4-every5-lowrank"),
    ("mSAM every 10", "fashion_mnist_noisy_schedules", {"every": "10", "reuse": ""},
     "msam-m4-every10", "msam-m4-every10-lowrank"),
    ("mSAM every 5, LookSAM reuse (alpha 0.7)", "fashion_mnist_noisy_schedules",
     {"every": "5", "reuse": "looksam"}, "msam-m4-every5-looksam",
     "msam-m4-every5-looksam-lowrank"),
    ("mSAM every 10, LookSAM reuse (alpha 0.7)", "fashion_mnist_noisy_schedules",
     {"every": "10", "reuse": "looksam"}, "msam-m4-every10-looksam",
     "msam-m4-every10-looksam-lowrank"),
    ("Momentum-SAM (rho on validation)", "fashion_mnist_noisy_cheaper",
     {"method": "momentumsam", "selected": "True"}, "momentumsam-loop-m1", None),
    ("mSAM every 5, LookSAM reuse alpha 0.2", "fashion_mnist_noisy_reuse_alpha",
     {"every": "5", "reuse": "looksam"}, "msam-m4-every5-looksam",
     "msam-m4-every5-looksam-lowrank"),
    ("mSAM every 10, LookSAM reuse alpha 0.2", "fashion_mnist_noisy_reuse_alpha",
     {"every": "10", "reuse": "looksam"}, "msam-m4-every10-looksam",
     "msam-m4-every10-looksam-lowrank"),
]
CNN = [
    ("SGD", "fashion_mnist_cnn_noisy_selected", {"method": "sgd", "model_options": "batch"},
     "sgd", None),
    ("full mSAM (m 4, rho 0.2, on validation)", "fashion_mnist_cnn_noisy_selected",
     {"method": "msam", "micro_batches": "4", "model_options": "batch"}, "msam-loop-m4",
     "msam-*-m4"),
    ("SAM (rho 0.4, on validation)", "fashion_mnist_cnn_noisy_selected",
     {"method": "sam", "perturb": "all", "model_options": "batch"}, "sam", None),
    ("mSAM every 5, LookSAM reuse (alpha 0.7)", "fashion_mnist_cnn_noisy_cheaper_selected",
     {"every": "5", "reuse": "looksam"}, "msam-m4-every5-looksam",
     "msam-m4-every5-looksam-lowrank"),
    ("mSAM every 10, LookSAM reuse (alpha 0.7)", "fashion_mnist_cnn_noisy_cheaper_selected",
     {"every": "10", "reuse": "looksam"}, "msam-m4-every10-looksam",
     "msam-m4-every10-looksam-lowrank"),
    ("Momentum-SAM (rho 1, on validation)", "fashion_mnist_cnn_noisy_cheaper_selected",
     {"method": "momentumsam"}, "momentumsam-loop-m1", None),
    # the probe (configs/fashion_mnist_cnn_noisy_reuse_probe.yaml): reuse alpha 0.2, plain
    ("mSAM every 5 (no reuse)", "fashion_mnist_cnn_noisy_reuse_probe",
     {"every": "5", "reuse": "none"}, "msam-m4-every5", "msam-m4-every5-lowrank"),
    ("mSAM every 5, LookSAM reuse alpha 0.2", "fashion_mnist_cnn_noisy_reuse_probe",
     {"every": "5", "reuse": "looksam"}, "msam-m4-every5-looksam",
     "msam-m4-every5-looksam-lowrank"),
    ("mSAM every 10, LookSAM reuse alpha 0.2", "fashion_mnist_cnn_noisy_reuse_probe",
     {"every": "10", "reuse": "looksam"}, "msam-m4-every10-looksam",
     "msam-m4-every10-looksam-lowrank"),
]
MODELS = {"mlp": ("MLP 784-512-256-10, 40% noise, 4,000 train images, 50 epochs", MLP),
          "small_cnn": ("small CNN with BatchNorm, 40% noise, 1,000 train images, 80 epochs",
                        CNN)}


def _rows(study: str, want: dict[str, str]) -> list[dict[str, str]]:
    path = ROOT / "results" / study / "runs.csv"
    if not path.exists():
        return []
    out = []
    for row in csv.DictReader(path.open()):
        if row.get("status") != "done":
            continue
        ok = True
        for k, v in want.items():
            have = row.get(k, "")
            ok &= (v in have) if k == "model_options" else have == v
        if ok:
            out.append(row)
    return out


def _ratio(results: dict[str, dict], key: str | None) -> tuple[float | None, str]:
    """``x SGD`` of bench key ``key`` (a ``*`` pattern: the fastest match) and its label."""
    if key is None:
        return None, ""
    if "*" not in key:
        r = results.get(key)
        return (r["ratio_sgd"], r.get("strategy") or "loop") if r and "ratio_sgd" in r \
            else (None, "")
    head, tail = key.split("*")
    found = [r for k, r in results.items()
             if k.startswith(head) and k.endswith(tail) and "ratio_sgd" in r]
    if not found:
        return None, ""
    best = min(found, key=lambda r: r["ratio_sgd"])
    return best["ratio_sgd"], best.get("strategy") or "loop"


def table(model: str, bench_dir: Path) -> list[str]:
    title, spec = MODELS[model]
    bench = json.loads((bench_dir / model / "bench.json").read_text())
    (entry,) = bench["models"]
    results = {r["key"]: r for r in entry["results"]}
    accs = {label: [float(r["test_acc"]) for r in _rows(study, want)]
            for label, study, want, _, _ in spec}
    sgd = statistics.fmean(accs["SGD"]) if accs["SGD"] else None
    full = next(v for k, v in accs.items() if k.startswith("full mSAM"))
    gain = (statistics.fmean(full) - sgd) if full and sgd is not None else None
    lines = [f"### {model}: {title}", "",
             "| method | seeds | test acc % (mean +/- std) | gain kept | x SGD, loop | "
             "x SGD, best strategy | meets goal (>= 80% at <= 1.3x) |",
             "|---|---:|---:|---:|---:|---|:-:|"]
    for label, _study, _, loop_key, best_key in spec:
        a = accs[label]
        if not a:
            lines.append(f"| {label} | 0 | not run yet | | | | |")
            continue
        mean = statistics.fmean(a)
        sd = statistics.stdev(a) if len(a) > 1 else 0.0
        kept = None if gain in (None, 0) or sgd is None else (mean - sgd) / gain
        loop, _ = _ratio(results, loop_key)
        best, best_label = _ratio(results, best_key) if best_key else (loop, "")
        if loop is not None and (best is None or loop <= best):
            best, best_label = loop, "loop" if best_key else ""
        cheapest = min(x for x in (loop, best) if x is not None) if (loop or best) else None
        meets = ("" if kept is None or cheapest is None or label in ("SGD",) else
                 "**yes**" if kept >= 0.8 and cheapest <= 1.3 else "no")
        lines.append(
            f"| {label} | {len(a)} | {100 * mean:.2f} +/- {100 * sd:.2f} | "
            f"{'' if kept is None else f'{100 * kept:.0f}%'} | "
            f"{'' if loop is None else f'{loop:.2f}'} | "
            f"{'' if best is None else f'{best:.2f}'}"
            f"{f' ({best_label})' if best_label and best_key else ''} | {meets} |")
    cmd = bench["meta"].get("command", "")
    lines += ["", f"Step times: `{cmd}` ({bench['meta'].get('cpu', '')}, "
              f"{bench['meta'].get('threads')} thread, {bench['meta'].get('date', '')}); "
              f"accuracies: `results/<study>/runs.csv` of the studies named in the script.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=Path, default=ROOT / "benchmarks/results/cheaper")
    parser.add_argument("--out", type=Path, default=ROOT / "results/cheaper_msam/table.md")
    args = parser.parse_args(argv)
    lines = ["# Cheaper mSAM: gain kept against step cost (issue 26)", "",
             "Generated by `python scripts/cheaper_table.py`. Gain kept = (method - SGD) / "
             "(full mSAM - SGD) in mean test accuracy over the seeds; x SGD = median step time "
             "over SGD's in one `msam bench` run per model (schedules: the mean step over one "
             "window of the schedule).", ""]
    for model in MODELS:
        lines += table(model, args.bench)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
