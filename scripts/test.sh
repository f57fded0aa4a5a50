#!/usr/bin/env bash
# The test command: sets up .venv (idempotent), checks formatting and lint, runs the quick test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
py=.venv/bin/python
$py -m ruff format --check custom tools tests scripts
$py -m ruff check custom tools tests scripts
$py -m pytest -q -p no:cacheprovider --durations=15 "$@"
