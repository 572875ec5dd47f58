#!/usr/bin/env bash
# The README's run command: set up the environment, then run the main job on the embedded
# default. Until the Fashion-MNIST quickstart lands this is the package's command overview.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
venv="${RETRO_JAX_VENV:-.venv}"
"$venv/bin/python" -m retro_jax --help
"$venv/bin/python" -m retro_jax info
