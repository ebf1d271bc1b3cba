#!/usr/bin/env bash
# Issue 27 (does mSAM's claim survive BatchNorm?): stage 1 of the CNN equal-budget study, the rho
# grid at seed 0, first with 40% label noise, then on clean labels. Two `msam study` processes
# per config share its runs; afterwards the summary is exported to results/<study>/.
# Resumable: finished runs are skipped, interrupted ones continue from their last epoch, so
# after an interruption run the same command again:
#   nice -n 19 nohup scripts/fashion_mnist_cnn_study.sh > runs/logs/cnn_study.log 2>&1 &
# MSAM overrides the command, e.g. MSAM="python -m msam.cli.main" with PYTHONPATH=src.
set -u
cd "$(dirname "$0")/.."
read -r -a MSAM <<< "${MSAM:-msam}"
mkdir -p runs/logs
for cfg in configs/fashion_mnist_cnn_noisy_equal_budget.yaml configs/fashion_mnist_cnn_equal_budget.yaml; do
  name=$(basename "$cfg" .yaml)
  "${MSAM[@]}" study "$cfg" -q > "runs/logs/${name}_1.log" 2>&1 & p1=$!
  sleep 10
  "${MSAM[@]}" study "$cfg" -q > "runs/logs/${name}_2.log" 2>&1 & p2=$!
  wait "$p1" "$p2"
  "${MSAM[@]}" study "$cfg" -q --export "results/$name" > "runs/logs/${name}_export.log" 2>&1
done
