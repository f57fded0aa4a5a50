"""Smoke tests of ``scripts/bench_cascade.py`` in ``--quick`` mode (tiny phantom, 2-feature networks)."""

from __future__ import annotations

import json
import sys

import pytest
from bundle_utils import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import bench_cascade  # noqa: E402


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
