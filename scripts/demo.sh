#!/usr/bin/env bash
# The main job: bash scripts/demo.sh [demo args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh run
.venv/bin/python recipes/demo.py "$@"
