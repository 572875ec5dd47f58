#!/usr/bin/env bash
# The README's test command: set up the environment with the test extra, then run the whole
# test suite. Arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"` for the quick
# subset, `bash scripts/test.sh tests/test_cli.py`). CI runs exactly this script.
#
# Tests run in RETRO_JAX_TEST_WORKERS parallel pytest-xdist workers (default 2, which pays
# even on 2 cores: XLA compiles on one thread); 0 runs them in this process.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --test
venv="${RETRO_JAX_VENV:-.venv}"

printf '\n== pytest %s\n' "$*"
status=0
workers="${RETRO_JAX_TEST_WORKERS:-2}"
parallel=()
# One test at a time per worker (--maxschedchunk=1): xdist's default hands each worker a
# chunk of consecutive tests at the start, and with the slow tests sorted first
# (tests/conftest.py) one worker got all of them while the other ran out of work.
[[ "$workers" != 0 ]] && parallel=(-n "$workers" --maxschedchunk=1)
"$venv/bin/python" -m pytest "${parallel[@]}" "$@" || status=$?
if [[ "$status" == 5 ]]; then
  echo "test.sh: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
