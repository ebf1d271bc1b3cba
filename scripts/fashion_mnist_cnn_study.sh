#!/usr/bin/env bash
# Issue 27 (does mSAM's claim survive BatchNorm?): the CNN equal-budget study, resumable.
#   stage 1, 40% label noise: the rho grid at seed 0 (configs/fashion_mnist_cnn_noisy_equal_budget.yaml;
#     done: the first machine's SGD/SAM/SAM-ON runs are only in results/.../runs_session1.csv)
#   stage 2, 40% label noise: the selected cells at seeds 0-2 with sharpness
#     (configs/fashion_mnist_cnn_noisy_selected.yaml; done)
#   stage 1, clean labels (configs/fashion_mnist_cnn_equal_budget.yaml; done, 55 runs)
#   stage 2, clean labels (configs/fashion_mnist_cnn_selected.yaml; done)
#   control: mSAM at rho 0 on the BatchNorm CNN, "ghost" BatchNorm
#     (configs/fashion_mnist_cnn_ghostbn_control.yaml)
#   probe: ResNet-20, 40% noise, BatchNorm (configs/fashion_mnist_resnet20_noisy_probe.yaml)
# Default: the clean-label stage 1. Other configs as arguments, in order.
# Two `msam study` processes per config share its runs; afterwards the summary is exported to
# results/<study>/. Finished runs are skipped, interrupted ones continue from their last epoch;
# run records exported to results/<study>/runs/ (another machine, an earlier session) are copied
# back first, so their runs are skipped too. After an interruption run the same command again:
#   nice -n 19 nohup scripts/fashion_mnist_cnn_study.sh > runs/logs/cnn_study.log 2>&1 &
# MSAM overrides the command, e.g. MSAM="python -m msam.cli.main" with PYTHONPATH=src.
set -u
cd "$(dirname "$0")/.."
read -r -a MSAM <<< "${MSAM:-msam}"
mkdir -p runs/logs
[ $# -gt 0 ] || set -- configs/fashion_mnist_cnn_equal_budget.yaml
for cfg in "$@"; do
  name=$(basename "$cfg" .yaml)
  # restore finished run records (done.json and metrics.jsonl: enough to skip the run)
  for rec in results/"$name"/runs/*/; do
    [ -f "$rec/done.json" ] && [ -f "$rec/metrics.jsonl" ] || continue
    dst=runs/$name/runs/$(basename "$rec")
    [ -e "$dst" ] || { mkdir -p "runs/$name/runs" && cp -a "$rec" "$dst"; }
  done
  "${MSAM[@]}" study "$cfg" -q > "runs/logs/${name}_1.log" 2>&1 & p1=$!
  sleep 10
  "${MSAM[@]}" study "$cfg" -q > "runs/logs/${name}_2.log" 2>&1 & p2=$!
  wait "$p1" "$p2"
  "${MSAM[@]}" study "$cfg" -q --export "results/$name" > "runs/logs/${name}_export.log" 2>&1
done
