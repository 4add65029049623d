#!/usr/bin/env bash
# Create (or reuse) ./.venv and install pinned requirements: setup_env.sh run|dev
# Re-installs only when the requirement files changed (stamp file inside the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
set_name="${1:-dev}"
venv="${LOWRANK_VENV:-.venv}"
py="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
stamp="$venv/.installed-$set_name"
want="$(cat requirements/constraints.txt "requirements/$set_name.txt" setup.cfg | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  # deepspeed (dev): pure Python, no CUDA ops compiled at install time
  export DS_BUILD_OPS=0
  # torch pinned to 2.13.0 (CPU wheel); an unpinned torch pulls a multi-GB CUDA build
  "$venv/bin/python" -m pip install -q -c requirements/constraints.txt -r "requirements/$set_name.txt"
  "$venv/bin/python" -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
