#!/usr/bin/env bash
# The test suite: bash scripts/test.sh [pytest args]
#
# Two pytest runs, each given the pytest args: the main run, without the tests marked
# `interpret` (tests/conftest.py deselects them unless TRITON_INTERPRET is on), then those
# tests alone under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton is
# imported, so in a process of its own).  A run the args leave empty (pytest exit 5) is not an
# error unless both are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
.venv/bin/ruff check lowrank_optim trainer_callbacks recipes benchmarks tests
main=0
env -u TRITON_INTERPRET .venv/bin/python -m pytest -q -n 2 "$@" || main=$?
interp=0
TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -n 2 "$@" -m interpret || interp=$?
for rc in "$main" "$interp"; do
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
done
if [ "$main" -eq 5 ] && [ "$interp" -eq 5 ]; then exit 5; fi
