#!/usr/bin/env bash
# The teacher-regime sweep of the Fashion-MNIST study (docs/results.md): the MoCo-v2 teacher
# of configs/study_fashion_mnist.py for SWEEP_STEPS steps at several learning rates (x the
# recipe's 0.03, linearly scaled by batch / 256) and with MoCo's per-GPU BN + shuffle-BN
# (bn_groups 4: 32 images a group, MoCo-v2's per-GPU batch), each point evaluated like the
# study's models (its results.md). Resumable: finished points are skipped.
#
#   bash scripts/study_sweep.sh [ROOT]      (default runs/study_sweep; ~5 min a point, idle)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="${1:-runs/study_sweep}"
python="${RETRO_JAX_PYTHON:-.venv/bin/python}"
point() {  # NAME OVERRIDES...
  local name="$1"
  shift
  "$python" -m retro_jax.main --config configs/study_fashion_mnist.py:sweep \
    --workdir "$root/$name" "$@" > "$root/$name.log" 2>&1 || {
      echo "sweep point $name failed; see $root/$name.log" >&2; return 1; }
  echo "== $name"
  sed -n '/^| model/,/^$/p' "$root/$name/results.md"
}
mkdir -p "$root"
point lr_x4 --config.teacher.optimizer.lr=0.12
point lr_x1 --config.teacher.optimizer.lr=0.03
point lr_x1_bn4 --config.teacher.optimizer.lr=0.03 --config.teacher.student.bn_groups=4
