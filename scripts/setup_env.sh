#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs what the project needs.
# Idempotent: when pyproject.toml and this script are unchanged since the last successful run, it does nothing.
# torch: an importable torch is used as is; without an NVIDIA GPU the CPU build is installed (never a multi-GB CUDA build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CASCADE_VENV:-$root/.venv}"
stamp_src="$(cat "$root/pyproject.toml" "$root/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.setup-stamp" 2>/dev/null)" = "$stamp_src" ]; then
  exit 0
fi

pick_python() {
  for p in "${PYTHON:-}" python3.11 python3.12 python3.10 python3; do
    [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 10))' && { echo "$p"; return; }
  done
  echo "error: Python >= 3.10 not found (set PYTHON=/path/to/python3.11)" >&2; exit 1
}
py="$(pick_python)"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv with $py"
  if "$py" -c 'import torch' >/dev/null 2>&1; then
    # A torch is already installed for this interpreter: use it as is.
    "$py" -m venv --system-site-packages "$venv"
  else
    "$py" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip -q)
"${pip[@]}" install --upgrade pip >/dev/null 2>&1 || true

if ! "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
  tv="${TORCH_VERSION:-2.13.0}"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing torch==$tv (CUDA build)"
    "${pip[@]}" install "torch==$tv"
  else
    echo "[setup] no GPU: installing the CPU build of torch $tv"
    # A local CPU wheel (pip's find-links) first; else PyTorch's CPU index. Never the CUDA build from PyPI.
    "${pip[@]}" install "torch==$tv+cpu" 2>/dev/null \
      || "${pip[@]}" install "torch==$tv+cpu" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

echo "[setup] installing the project and its dependencies"
"${pip[@]}" install -e "$root[dev]"
echo "$stamp_src" > "$venv/.setup-stamp"
