#!/usr/bin/env bash
# Sets up a virtual environment with retro_jax installed, from nothing but Python >= 3.11.
#
#   bash scripts/setup.sh [--test] [--fresh]
#
#   --test   also install the test extra (pytest, torch, torchvision for the parity tests;
#            nbclient and ipykernel to execute the Colab notebooks)
#   --fresh  delete the virtual environment first (CI does this; so does CI=true)
#
# Environment:
#   RETRO_JAX_VENV         where the virtual environment lives (default: .venv in the repo)
#   PYTHON                 the interpreter to build it from (default: python3)
#   RETRO_JAX_TORCH_INDEX  a pip index URL to take torch/torchvision from before the test
#                          extra is installed, e.g. PyTorch's CPU-only wheel index; without
#                          it pip takes them from PyPI, which on Linux x86_64 means CUDA builds
#
# As root on Debian/Ubuntu it also apt-installs what it needs: python3-venv where `venv` is
# missing, and `dataset-fashion-mnist` (the real Fashion-MNIST files the tests and the
# quickstart use offline). Without root it says what to install instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

with_test=0
fresh=0
[[ "${CI:-}" == "true" ]] && fresh=1
for arg in "$@"; do
  case "$arg" in
    --test) with_test=1 ;;
    --fresh) fresh=1 ;;
    *) echo "setup.sh: unknown option '$arg' (expected --test or --fresh)" >&2; exit 2 ;;
  esac
done

venv="${RETRO_JAX_VENV:-.venv}"
python="${PYTHON:-python3}"
say() { printf '\n== %s\n' "$*"; }

if ! command -v "$python" >/dev/null; then
  echo "setup.sh: '$python' not found; install Python >= 3.11 (Debian/Ubuntu: apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup.sh: retro_jax needs Python >= 3.11; '$python' is $("$python" -V 2>&1). Set PYTHON=python3.11 (or newer)." >&2
  exit 1
fi

apt_install() {  # apt_install PACKAGE...: as root with apt-get, else print the command.
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    say "apt-get install $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"; }
  else
    echo "setup.sh: not root (or no apt-get): install '$*' yourself, e.g. sudo apt-get install $*" >&2
    return 1
  fi
}

# Debian's Python ships venv's pip bootstrap in a separate package.
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  apt_install "python${pyver}-venv" || apt_install python3-venv
fi
fashion_mnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [[ ! -f "$fashion_mnist" ]]; then
  apt_install dataset-fashion-mnist ||
    echo "setup.sh: without dataset-fashion-mnist the Fashion-MNIST tests and the quickstart cannot run offline" >&2
fi

if [[ "$fresh" == 1 && -d "$venv" ]]; then
  say "removing $venv (fresh environment)"
  rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
  say "creating virtual environment $venv with $("$python" -V 2>&1)"
  "$python" -m venv "$venv"
fi
# This machine's pip configuration may name local package folders that do not exist; pip
# warns about each one on every lookup. Those lines are noise; everything else is shown.
pip() {
  "$venv/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
say "upgrading pip"
pip install -q --upgrade pip

if [[ "$with_test" == 1 && -n "${RETRO_JAX_TORCH_INDEX:-}" ]]; then
  say "installing torch/torchvision from $RETRO_JAX_TORCH_INDEX"
  pip install -q --index-url "$RETRO_JAX_TORCH_INDEX" torch==2.14.1 torchvision==0.29.1
fi
extra=""
[[ "$with_test" == 1 ]] && extra="[test]"
say "installing retro_jax${extra} (editable) and its dependencies"
pip install -q -e ".${extra}"
say "ready: $("$venv/bin/python" -m retro_jax --version) in $venv (activate with: . $venv/bin/activate)"
