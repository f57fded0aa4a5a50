"""Smoke tests of ``scripts/bench_cascade.py`` in ``--quick`` mode (tiny phantom, 2-feature networks)."""

from __future__ import annotations

import json
import sys

import pytest
from bundle_utils import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import bench_cascade  # noqa: E402


@pytest.mark.slow  # a smoke run of a benchmark / evidence script (~10-20 s): -m slow
def test_quick_cascade_rows(tmp_path):
    out = tmp_path / "bench.json"
    res = bench_cascade.main(
        ["--quick", "--variants", "project,paper", "--workdir", str(tmp_path), "--json", str(out)]
        + ["--skip-monai", "--skip-train", "--skip-levers", "--skip-large"]
    )
    saved = json.loads(out.read_text())
    assert [r["variant"] for r in saved["cascade"]] == ["project", "paper"]
    for r in res["cascade"]:
        steps = ("reading", "preprocessing", "stage1", "c2", "stage2", "resample_back", "write")
        assert all(r[k] >= 0 for k in steps) and r["total"] >= sum(r[k] for k in steps) - 1e-6
        assert r["stages"]["stage1"]["tiles_run"] >= 1 and r["stages"]["stage2"]["flops"] > 0
        assert 0 < r["c2_fraction"] < r["c1_fraction"] < 1
    project, paper = res["cascade"]
    assert project["stages"]["stage2"]["passes"] == 4 and project["stages"]["stage2"]["encoder_tiles"] >= 1
    assert paper["stages"]["stage1"]["tile_size"] == [44, 44, 28]
    assert "| project |" in res["markdown"] and "paper tiling / project" in res["markdown"]


@pytest.mark.slow
def test_quick_everything(tmp_path):
    res = bench_cascade.main(["--quick", "--workdir", str(tmp_path), "--paper-extrapolate", "--train-iters", "1"])
    assert {"cascade", "monai", "train", "levers", "large"} <= set(res)
    assert len(res["monai"]) == 2 and len(res["train"]) == 3
    choice = {(r["stage"], r["choice"]): r for r in res["levers"]["tile_choice"]}
    aware = choice[("stage2 (C2)", "mask-aware + shared encoder")]
    assert aware["tflop"] <= choice[("stage2 (C2)", "budget only")]["tflop"]
    assert res["large"]["case"]["shape"][2] == 100


def test_quick_precision_rows_record_the_machine(tmp_path):
    res = bench_cascade.main(
        ["--quick", "--workdir", str(tmp_path), "--precision-repeats", "1", "--precision-case-amps", "false,auto"]
        + ["--skip-cascade", "--skip-monai", "--skip-train", "--skip-levers", "--skip-large"]
    )
    pm = res["precision"]
    machine = pm["machine"]
    assert {"model", "isa_flags", "mkldnn_bf16_supported", "usable_cpus", "torch_threads"} <= set(machine)
    assert res["machine"]["usable_cpus"] >= 1 and isinstance(machine["mkldnn_bf16_supported"], bool)
    assert [r["amp"] for r in pm["case"]] == ["False", "auto"]
    forced, auto = pm["case"]
    assert forced["chosen"]["stage1"]["dtype"] == "float32" and forced["chosen"]["stage1"]["source"] == "forced"
    assert auto["chosen"]["stage1"]["source"] in ("probe", "capability") and auto["total"]["min"] > 0
    assert [(r["features"], r["amp"]) for r in pm["tile"]] == [(2, "False"), (2, "True"), (2, "auto")]
    assert pm["tile"][1]["chosen"]["dtype"] == "bfloat16" and all(len(r["seconds"]["runs"]) == 2 for r in pm["tile"])
    assert "### Precision: float32 vs bfloat16 vs auto" in res["markdown"] and "| auto |" in res["markdown"]


GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_script_syntax():
    import subprocess

    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0


def test_gpu_check_without_cuda_says_so_and_writes_nothing(tmp_path):
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run the GPU checks")
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(GPU_CHECK), str(out)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
        "PYTHON": sys.executable}, timeout=120,
    )  # fmt: skip
    assert run.returncode == 3, run.stderr
    assert "gpu_check: no CUDA device" in run.stderr and not out.exists()
    missing = subprocess.run(
        ["bash", str(GPU_CHECK), str(out)], capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "no-python")}, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "no Python at" in missing.stderr
