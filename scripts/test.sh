#!/usr/bin/env bash
# The README's test command: set up the environment with the test extra, then run the whole
# test suite. Arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"` for the quick
# subset, `bash scripts/test.sh tests/test_cli.py`). CI runs exactly this script.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --test
venv="${RETRO_JAX_VENV:-.venv}"

printf '\n== pytest %s\n' "$*"
status=0
"$venv/bin/python" -m pytest "$@" || status=$?
if [[ "$status" == 5 ]]; then
  echo "test.sh: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
