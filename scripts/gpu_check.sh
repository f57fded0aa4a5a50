#!/usr/bin/env bash
# GPU readiness in one prepared run (issue 14): the quick GPU tests (`pytest -m gpu`) and the benchmark's GPU rows,
# in under 8 minutes on one GPU, with a JSON of the numbers. Builds and installs nothing: it uses the Python given by
# $PYTHON, else the repo's .venv, else python3, and stops with a clear message when a package or CUDA is missing.
#
#   scripts/gpu_check.sh [OUTDIR]      # OUTDIR default: $OUT if set, else ./gpu_check_out
#
# Writes OUTDIR/gpu_check.json (summary: device, test counts, per-stage seconds, precision rows), plus
# gpu_tests.xml / gpu_tests.log and bench_gpu.json / bench_gpu.log. Exit status: 0 all passed, 1 a test or the
# benchmark failed, 2 a package is missing, 3 no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out="${1:-${OUT:-gpu_check_out}}"
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if ! command -v "$py" >/dev/null 2>&1; then
    echo "gpu_check: no Python at '$py' (set PYTHON or run scripts/setup_env.sh)" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1

"$py" - <<'EOF'
import sys

try:
    import ignite  # noqa: F401
    import monai  # noqa: F401
    import nibabel  # noqa: F401
    import torch
except ImportError as e:
    print(f"gpu_check: a required package is missing ({e}); install the bundle's requirements first "
          "(scripts/setup_env.sh) or point PYTHON at an environment that has them", file=sys.stderr)
    sys.exit(2)
if not torch.cuda.is_available():
    print(f"gpu_check: no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees none. "
          "This script measures the GPU path only; run it on a machine with an NVIDIA GPU.", file=sys.stderr)
    sys.exit(3)
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
rc=$?
[ "$rc" -ne 0 ] && exit "$rc"
mkdir -p "$out" || exit 2
t0=$(date +%s)

# 1. the quick GPU tests (about 1-2 minutes)
timeout 150 "$py" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml "$out/gpu_tests.xml" 2>&1 \
    | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# 2. the benchmark's GPU rows: project vs paper tiling on the 512x512x400 phantom, MONAI reference, levers and the
#    precision rows (fp32 vs bf16 vs auto); no training rows and no 1000-slice case, to stay within the time
bench_dir="${TMPDIR:-/tmp}/gpu_check_bench"
timeout 300 "$py" scripts/bench_cascade.py --device cuda --variants project,paper --skip-train --skip-large \
    --repeats 3 --precision-repeats 2 --workdir "$bench_dir" --json "$out/bench_gpu.json" 2>&1 \
    | tee "$out/bench_gpu.log"
bench_rc=${PIPESTATUS[0]}

"$py" - "$out" "$tests_rc" "$bench_rc" "$t0" <<'EOF'
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

out, tests_rc, bench_rc, t0 = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
summary = {"tests_rc": tests_rc, "bench_rc": bench_rc, "seconds": time.time() - t0}
try:
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, AttributeError) as e:
    summary["tests"] = f"no junit report ({e})"
try:
    bench = json.loads((out / "bench_gpu.json").read_text())
    summary["device_name"] = bench.get("device_name")
    summary["torch"] = bench.get("torch")
    summary["date"] = bench.get("date")
    keys = ("reading", "preprocessing", "stage1", "c2", "stage2", "resample_back", "write", "total", "peak_gpu_gb")
    summary["cascade"] = [{"variant": r["variant"], **{k: r.get(k) for k in keys}} for r in bench.get("cascade", [])]
    summary["monai"] = bench.get("monai")
    summary["precision_levers"] = (bench.get("levers") or {}).get("precision")
    summary["precision"] = bench.get("precision")
except (OSError, ValueError) as e:
    summary["bench"] = f"no benchmark JSON ({e})"
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
print(json.dumps({k: summary[k] for k in ("tests_rc", "bench_rc", "seconds", "tests") if k in summary}))
EOF
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] || exit 1
