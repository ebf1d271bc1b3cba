#!/usr/bin/env bash
# Issue 26 (cheaper mSAM): the step-time side of the gain-vs-cost table, one `msam bench` run
# per model, every method interleaved in that run: SGD, SAM, full mSAM m = 4 (loop and the
# other strategies), Momentum-SAM (one pass), and the schedules (every 5 / 10, LookSAM reuse
# every 5 / 10) with their perturbation steps on the loop and on the best strategy.
# One thread, as the studies train; pause any background study while it runs.
# The table itself: python scripts/cheaper_table.py (reads these and the studies' runs.csv).
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a MSAM <<< "${MSAM:-msam}"
OUT=${OUT:-benchmarks/results/cheaper}
common=(--m 4 --variants momentumsam --schedules every5,every10,looksam5,looksam10
        --schedule-m 4 --threads 1 --no-accum --no-memory --rho 0.2 --quiet)
"${MSAM[@]}" bench --models mlp --strategies loop,lowrank,auto --schedule-strategy loop,lowrank \
  --steps "${STEPS:-40}" --warmup 5 "${common[@]}" --out "$OUT/mlp"
"${MSAM[@]}" bench --models small_cnn --strategies loop,batched,lowrank,auto \
  --schedule-strategy loop,lowrank --steps "${STEPS:-15}" --warmup 3 "${common[@]}" \
  --out "$OUT/small_cnn"
