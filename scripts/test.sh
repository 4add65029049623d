#!/usr/bin/env bash
# The test suite: bash scripts/test.sh [pytest args]
#
# Two pytest runs, each given the pytest args: the main run, without the tests marked
# `interpret` or `aot` (tests/conftest.py deselects them), then the `interpret` tests alone
# under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so
# in a process of its own).  A run the args leave empty (pytest exit 5) is not an error unless
# both are.  Without arguments (CI) scripts/aot_check.sh follows: every Triton kernel compiled
# for GPU targets (sm_80 ... sm_120) with the pinned triton and the GPU machine's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
.venv/bin/ruff check lowrank_optim trainer_callbacks recipes benchmarks tests
main=0
env -u TRITON_INTERPRET .venv/bin/python -m pytest -q -n 2 "$@" || main=$?
interp=0
TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -n 2 "$@" -m interpret || interp=$?
# with no arguments (the whole suite, as CI runs it): every kernel compiled for GPU targets
aot=0
if [ "$#" -eq 0 ]; then bash scripts/aot_check.sh || aot=$?; fi
for rc in "$main" "$interp" "$aot"; do
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
done
if [ "$main" -eq 5 ] && [ "$interp" -eq 5 ]; then exit 5; fi
