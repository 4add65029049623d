#!/usr/bin/env bash
# The test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
.venv/bin/ruff check lowrank_optim trainer_callbacks recipes benchmarks tests
.venv/bin/python -m pytest -q -n 2 "$@"
