#!/usr/bin/env bash
# The main command: sets up .venv (idempotent), then runs the demo on the embedded default.
# Arguments go to `python -m tools.demo` (see `bash scripts/demo.sh --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
exec .venv/bin/python -m tools.demo "$@"
