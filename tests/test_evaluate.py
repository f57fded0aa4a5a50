import csv
import math

import pytest

from custom.evaluate import dice_tables, wilcoxon_vs_stage1, write_report

ORGANS = ["liver", "pancreas"]


def _rows():
    rows = []
    for i in range(8):
        rows.append({"case_id": f"c{i}", "stage": "stage1", "liver": 0.90 + 0.005 * i, "pancreas": 0.50 + 0.01 * i})
        rows.append({"case_id": f"c{i}", "stage": "stage2", "liver": 0.93 + 0.004 * i, "pancreas": 0.70 + 0.011 * i})
    rows.append({"case_id": "c8", "stage": "stage1", "liver": 0.9, "pancreas": float("nan")})  # absent organ
    rows.append({"case_id": "c8", "stage": "stage2", "liver": 0.95, "pancreas": float("nan")})
    return rows


def test_tables_and_wilcoxon():
    rows = [{k: str(v) for k, v in r.items()} for r in _rows()]
    t = dice_tables(rows, ORGANS)
    assert t["stage1"]["pancreas"]["n"] == 8 and t["stage1"]["liver"]["n"] == 9
    assert t["stage2"]["pancreas"]["mean"] == pytest.approx(sum(0.70 + 0.011 * i for i in range(8)) / 8)
    p = wilcoxon_vs_stage1(rows, ORGANS)
    # stage 2 is better on every case: the exact two-sided p for n = 8 is 2 / 2^8
    assert p["pancreas"] == pytest.approx(2 / 2**8)
    assert p["liver"] < 0.01


def test_write_report(tmp_path):
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "stage", *ORGANS])
        w.writeheader()
        w.writerows(_rows())
    with open(tmp_path / "c2_recall_fpr.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "organ", "r", "recall", "fpr", "c2_fraction"])
        w.writeheader()
        for r in range(4):
            w.writerow(
                {"case_id": "c0", "organ": "liver", "r": r, "recall": 0.9 + r / 40, "fpr": r / 20, "c2_fraction": 0.1}
            )
    report = write_report(str(tmp_path), {"liver": 1, "pancreas": 2})
    text = report.read_text()
    assert "Stage 1" in text and "Wilcoxon" in text and "| mean |" in text
    assert (tmp_path / "c2_curve.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(tmp_path / "dice_summary.csv")))
    liver2 = next(r for r in rows if r["stage"] == "stage2" and r["organ"] == "liver")
    assert math.isclose(float(liver2["max"]), 0.93 + 0.004 * 7)
