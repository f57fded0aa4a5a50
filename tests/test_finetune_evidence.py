"""``scripts/finetune_evidence.py`` end to end on tiny phantoms: both arms train, segment the test case and are
compared in a table with the extended label set."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from bundle_utils import ROOT, TINY

sys.path.insert(0, str(ROOT / "scripts"))

import finetune_evidence  # noqa: E402

from custom.labels import EXTENDED_LABELS  # noqa: E402
from custom.network import ValidUNet3D  # noqa: E402


@pytest.mark.slow  # a smoke run of a benchmark / evidence script (~10-20 s): -m slow
def test_finetune_evidence_tiny(tmp_path):
    pretrained = tmp_path / "stage1_paper_labels.pt"
    torch.manual_seed(0)
    torch.save(ValidUNet3D(1, 8, features=2).state_dict(), pretrained)
    extra = {k: TINY[k] for k in ("features", "patch_size", "target_spacing", "epoch_length", "num_workers")}
    extra.update({"cache_rate": 0.0, "val_max_cases": 1})
    work = tmp_path / "work"
    argv = ["--pretrained", str(pretrained), "--workdir", str(work), "--n_train", "3", "--n_test", "2"]
    argv += ["--epochs", "1", "--preset", "tiny", "--extra", json.dumps(extra)]
    assert finetune_evidence.main(argv) == 0

    rows = list(csv.DictReader((work / "finetune_vs_scratch.csv").open()))
    assert [r["run"] for r in rows] == ["finetuned", "scratch"]
    for r in rows:
        dice = [float(r[o]) for o in EXTENDED_LABELS]
        assert all(0.0 <= d <= 100.0 for d in dice)
        assert float(r["train_seconds"]) > 0
    md = (work / "finetune_vs_scratch.md").read_text()
    assert "| finetuned |" in md and "inferior_vena_cava" in md and "p (Wilcoxon, paired)" in md
    # the fine-tuned run started from the pretrained body with a new 11-class head; scratch did not
    ft = torch.load(work / "finetuned" / "checkpoints" / "model_final.pt", weights_only=True)["network"]
    head = [k for k, v in ft.items() if v.ndim == 5 and v.shape[0] == 11]
    assert head, "the fine-tuned network has an 11-class head"
    logs = (work / "logs" / "finetuned.log").read_text()
    assert "pretrained" in logs.lower() or str(pretrained) in logs
    # the evaluation scored both test cases with the 10 extended structures
    for arm in ("finetuned", "scratch"):
        m = list(csv.DictReader((work / f"eval_{arm}" / "metrics.csv").open()))
        assert {r["case_id"] for r in m if r["stage"] == "stage1"} == {"phantom_0003", "phantom_0004"}
        assert set(EXTENDED_LABELS) <= set(m[0])
