#!/usr/bin/env bash
# The README's run command: set up the environment (Python packages, and Debian's
# dataset-fashion-mnist where apt is available), then run the Fashion-MNIST quickstart:
# MoCo-v2 teacher -> Retro student -> evaluation -> export, with a table at the end.
#
#   bash scripts/run.sh [WORKDIR] [--config.KEY=VALUE ...]
#
# WORKDIR defaults to runs/quickstart; running the same command again resumes (or skips the
# finished stages). Extra arguments go to `python -m retro_jax.main`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
workdir="runs/quickstart"
if [[ $# -gt 0 && "$1" != --* ]]; then
  workdir="$1"
  shift
fi
bash scripts/setup.sh
venv="${RETRO_JAX_VENV:-.venv}"
exec "$venv/bin/python" -m retro_jax.main --config configs/quickstart.py --workdir "$workdir" "$@"
