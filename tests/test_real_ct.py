"""The shipped demo weights on the two labelled real CTs of the workplace's shared data (issue 16; skipped where
``../shared`` is absent, e.g. in CI): the README inference command through ``evaluate.json`` with
``--source_labels real_ct``, scored against the TotalSegmentator-derived labels.

A regression guard, not a claim of accuracy: the floors are the Dice measured for release 0.4.0
(``bundle/docs/README.md``, "On real CT") minus a margin for floating-point differences between machines.
"""

from __future__ import annotations

import csv
import json

import pytest
from bundle_utils import ROOT, config_files

CASES = {"real01": "01_totalseg_example_ct_abdomen_pelvis", "real03": "03_totalseg_dicom_upper_abdomen"}
#: Cascade Dice (%) of the shipped weights measured for 0.4.0, per case; a floor 3 points below is asserted.
MEASURED = {
    "real01": {"artery": 64.1, "liver": 78.6, "spleen": 59.4, "stomach": 26.6, "gallbladder": 31.0},
    "real03": {"liver": 70.2},
}
MARGIN = 3.0


@pytest.mark.slow
def test_shipped_weights_on_real_ct(real_dir, tmp_path):
    from monai.bundle import ConfigWorkflow

    data = tmp_path / "real"
    (data / "imagesTs").mkdir(parents=True)
    (data / "labelsTs").mkdir()
    for cid, folder in CASES.items():  # links, never copies, of the shared data
        (data / "imagesTs" / f"{cid}.nii.gz").symlink_to(real_dir / folder / "image.nii.gz")
        (data / "labelsTs" / f"{cid}.nii.gz").symlink_to(real_dir / folder / "label_abdo.nii.gz")
    test = [{"image": f"imagesTs/{c}.nii.gz", "label": f"labelsTs/{c}.nii.gz"} for c in CASES]
    (data / "dataset.json").write_text(json.dumps({"labels": {"0": "background"}, "training": [], "test": test}))
    out = tmp_path / "eval"
    wf = ConfigWorkflow(
        config_file=config_files("common.json", "inference.json", "evaluate.json", "demo.json"),
        workflow_type=None,
        logging_file=False,
        dataset_dir=str(data),
        source_labels="real_ct",
        stage1_weights=str(ROOT / "bundle" / "models" / "stage1.pt"),
        stage2_weights=str(ROOT / "bundle" / "models" / "stage2.pt"),
        output_dir=str(out),
    )
    wf.initialize()
    wf.run()
    rows = {(r["case_id"], r["stage"]): r for r in csv.DictReader(open(out / "metrics.csv"))}
    for cid, floors in MEASURED.items():
        got = {k: 100 * float(v) for k, v in rows[(cid, "stage2")].items() if k in floors}
        for organ, measured in floors.items():
            assert got[organ] >= measured - MARGIN, (cid, organ, got[organ], measured)
