#!/usr/bin/env bash
# The one command to run when a GPU is available:
#
#   bash scripts/gpu_check.sh                  # GPU tests, kernel / step / refresh benchmarks,
#                                              # a short bf16 recipe run; under 6 minutes
#   bash scripts/gpu_check.sh --cpu-dry-run [--out DIR]   # the same harness, tiny, on the CPU
#   bash scripts/gpu_check.sh --help           # stages, budgets and other options
#
# Uses the machine's own python3 ($PYTHON overrides it) and this working tree (PYTHONPATH is
# the repository root): nothing is installed, nothing is downloaded.  Writes
# benchmarks/results/gpu_check_<gpu>.md (versions, date, each stage's status, the targets as
# met / not met) and benchmarks/results/gpu_check_<gpu>/ (one JSON per stage, logs); the dry
# run writes to DIR or a temporary directory instead.  Exit status 1 if any stage failed
# (every stage still runs), 2 without a CUDA GPU (outside --cpu-dry-run).
# The stages themselves live in benchmarks/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m benchmarks.gpu_check "$@"
