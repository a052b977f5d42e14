#!/usr/bin/env bash
# The accelerator check: train step, long forwards, forward scaling to 1M tokens and
# generation, ours and megalodon-jax in the same run (benchmarks/gpu_check.py).
# Writes benchmarks/results/gpu_check.json and prints the tables. On a machine without an
# accelerator it runs the same code at small sizes (a smoke test).
#
#   bash benchmarks/gpu_check.sh                 # sizes by backend
#   bash benchmarks/gpu_check.sh --out /tmp/g.json --skip-peer
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then
  PY=.venv/bin/python
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
exec "$PY" -m benchmarks.gpu_check "$@"
