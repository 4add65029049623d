#!/usr/bin/env bash
# The main job: bash scripts/demo.sh [demo args]
# Runs the recipe (accelerate launch -m recipes.pretrain, tiny LLaMA, offline stdlib corpus) for
# several optimizers one after another and prints the final table, all written into a new
# runs/demo/<YYYYmmdd-HHMMSS>/ (printed); see recipes/demo.py for the args.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh run
.venv/bin/python -m recipes.demo "$@"
