#!/usr/bin/env bash
# The GPU check, ready to run on one CUDA GPU in at most ~5 minutes; writes
# benchmarks/results/gpu-<date>.md. With --dry-run it runs the same steps on the CPU with tiny
# sizes (the tests run that).
#
#   bash benchmarks/gpu.sh                 # on a GPU machine, from the repository root
#   bash benchmarks/gpu.sh --dry-run       # CPU smoke run (out: $OUT or /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
stamp=$(date -u +%Y-%m-%d)
if [ "$DRY" = 1 ]; then
  dev=cpu; out_dir=${OUT:-$(mktemp -d)}; models=mlp; ms=1,4; strategies=loop,batched
  steps=1; extra=(--dry-run); tests=(); bench_extra=(--no-memory --no-plot)
else
  dev=cuda; out_dir=benchmarks/results; models=mlp,small_cnn,resnet20,wrn16_4; ms=1,4,8,16
  strategies=loop,batched,lowrank,auto; steps=10; extra=(); bench_extra=()
  # the tests whose code paths run on whatever device the tensors are on
  tests=(tests/optim/test_reference_equations.py tests/core/test_usam.py tests/core/test_momentumsam.py)
fi
report="$out_dir/gpu-$stamp.md"
mkdir -p "$out_dir"
{
  echo "Command: bash benchmarks/gpu.sh ${1:-}"
  echo
  "$PY" benchmarks/gpu_checks.py --device "$dev" "${extra[@]}"
  echo
  echo "## msam bench ($models; m = $ms; $strategies)"
  echo
} > "$report"
"$PY" -m msam.cli.main bench --device "$dev" --models "$models" --m "$ms" \
  --strategies "$strategies" --steps "$steps" --no-accum --out "$out_dir/gpu-bench-$stamp" -q \
  "${bench_extra[@]}" >/dev/null 2>&1
cat "$out_dir/gpu-bench-$stamp/bench.md" >> "$report"
if [ "${#tests[@]}" -gt 0 ]; then
  { echo; echo "## Tests"; echo; "$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tail -3; } >> "$report"
fi
echo "$report"
