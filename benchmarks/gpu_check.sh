#!/usr/bin/env bash
# The GPU figures of the README in one run of at most 5 minutes on one H100/H200 (see benchmarks/gpu_check.py):
#   pip install -e ".[cuda12]" && bash benchmarks/gpu_check.sh --out gpu_check.json
# --dry-run checks the script on any machine with a tiny shape (CI runs it on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m benchmarks.gpu_check "$@"
