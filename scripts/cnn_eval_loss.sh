#!/usr/bin/env bash
# Issue 27: the training loss of finished runs' final weights, measured alike for every method
# (eval mode, BatchNorm's running statistics, the run's 1,000 training examples), into
# results/<study>/eval_loss/<run>.json; scripts/cnn_study_tables.py reads them for its table of
# how strongly a radius acts by m.
#   scripts/cnn_eval_loss.sh <study> RUN_DIR...   (skips runs already measured)
# MSAM overrides the command, e.g. MSAM="python -m msam.cli.main" with PYTHONPATH=src.
set -eu
cd "$(dirname "$0")/.."
read -r -a MSAM <<< "${MSAM:-msam}"
out=results/$1/eval_loss
shift
mkdir -p "$out"
for run in "$@"; do
  dst=$out/$(basename "$run").json
  [ -f "$dst" ] && continue
  "${MSAM[@]}" sharpness "$run" --metrics loss --examples 1000 --batch-size 500 --threads 1 \
    --json "$dst" > /dev/null
  echo "$dst"
done
