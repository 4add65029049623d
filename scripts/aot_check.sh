#!/usr/bin/env bash
# Ahead-of-time compilation of every Triton kernel for GPU targets, on a machine without a GPU:
# bash scripts/aot_check.sh [pytest args]
#
# 1. the pinned triton (requirements/constraints.txt), every target it supports (sm_80, sm_86,
#    sm_89, sm_90, sm_120): tests/test_kernels_aot.py -m aot, one test per kernel, dtype and
#    target, named with its number of programs;
# 2. triton 3.6.0, the GPU machine's version (installed with --no-deps into the venv, put first
#    on PYTHONPATH), for that machine's target (sm_90, the H200).
# The table of shared memory, registers and spills is written by
# `python -m lowrank_optim.kernels.aot` (benchmarks/results/kernels_aot.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
export TRITON_DEFAULT_FP_FUSION=1  # triton >= 3.9 warns without it
env -u TRITON_INTERPRET .venv/bin/python -m lowrank_optim.kernels.aot --count
env -u TRITON_INTERPRET .venv/bin/python -m pytest -q -n 2 -m aot -v tests/test_kernels_aot.py "$@"
other=".venv/triton-gpu-machine"
want="$(cat requirements/triton-gpu-machine.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$other/.installed" 2>/dev/null)" != "$want" ]; then
  rm -rf "$other"
  .venv/bin/python -m pip install -q --no-deps --target "$other" -r requirements/triton-gpu-machine.txt
  echo "$want" > "$other/.installed"
fi
env -u TRITON_INTERPRET PYTHONPATH="$other" LOWRANK_AOT_TARGETS=sm_90 \
  .venv/bin/python -m lowrank_optim.kernels.aot --count
env -u TRITON_INTERPRET PYTHONPATH="$other" LOWRANK_AOT_TARGETS=sm_90 \
  .venv/bin/python -m pytest -q -n 2 -m aot tests/test_kernels_aot.py "$@"
