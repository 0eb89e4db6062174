#!/usr/bin/env bash
# The prepared GPU run (benchmarks/gpu_run.py's docstring): on the device machine, from the repository root, bash benchmarks/gpu_run.sh --out $OUT --budget-s 540
cd "$(dirname "$0")/.." && PYTHONUNBUFFERED=1 exec python3 benchmarks/gpu_run.py "$@"
