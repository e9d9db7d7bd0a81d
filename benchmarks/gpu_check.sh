#!/usr/bin/env bash
# GPU check of Two-Stage VAR-ST: both stages of the seed preset on HER2ST-sized synthetic data
# (13,000 spots x 200 genes, 1024-d histology), a few hundred bf16 steps each; prints the card, the measured bf16
# matmul rate, spots/s and achieved TFLOP/s (pipeline through Lightning, and the bare module).
#
#   benchmarks/gpu_check.sh                      # on a GPU machine (a few minutes)
#   benchmarks/gpu_check.sh --steps 100          # any benchmarks/gpu_check.py option passes through
#   benchmarks/gpu_check.sh --smoke              # toy size on the CPU: checks that the script runs
#
# Results also go to benchmarks/results/gpu_check.json (smoke: $TMPDIR; or --out PATH). PYTHON=... picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
out=benchmarks/results/gpu_check.json
for arg in "$@"; do
  if [ "$arg" = "--smoke" ]; then out="${TMPDIR:-/tmp}/varst_gpu_check_smoke.json"; fi
done
exec "$PY" benchmarks/gpu_check.py --out "$out" "$@"
