"""Tests for custom.verify: dataset verification before training (errors and warnings, each naming its file)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from parameterized import parameterized
from test_data import AFFINE, _write, label_array, make_case, make_dataset, truncate

from custom.data import DatasetError, load_datalist
from custom.labels import PAPER_LABELS
from custom.verify import verify_dataset


def test_verify_good_dataset(tmp_path):
    js = make_dataset(tmp_path, n=7)
    report = verify_dataset(js, PAPER_LABELS, num_classes=8)
    assert report.ok and report.n_cases == report.n_checked == 7 and report.warnings == []
    assert report.cases_with_label["liver"] == 7 and report.cases_with_label["artery"] == 1
    assert list(report.cases_with_label) == list(PAPER_LABELS)
    assert "checked 7 of 7 cases: 0 error(s), 0 warning(s)" in report.summary()
    assert verify_dataset(js).labels == PAPER_LABELS  # the label set read from dataset.json (MSD form)
    assert verify_dataset(load_datalist(js), "paper", max_cases=2).n_checked == 2


def _outside(root):
    return make_case(root, "x", values=(3, 9, 12))


def _float_labels(root):
    return make_case(root, "x", label=label_array((1, 3), dtype=np.float32) * 0.5)


def _too_many_classes(root):
    return make_case(root, "x", values=(3, 7))


def _shape(root):
    return make_case(root, "x", label=label_array(shape=(10, 9, 7)))


def _spacing(root):
    return make_case(root, "x", label_affine=AFFINE @ np.diag([1, 1, 0.5, 1]))


def _missing(root):
    entry = make_case(root, "x")
    (root / "labelsTr" / "x.nii.gz").unlink()
    return entry


def _unreadable(root):
    entry = make_case(root, "x")
    truncate(root / "imagesTr" / "x.nii.gz")
    return entry


def _label_4d(root):
    return make_case(root, "x", label=np.stack([label_array()] * 2, axis=-1))


VERIFY_ERRORS = [
    ("outside_label_set", _outside, "labelsTr/x.nii.gz: label values [9, 12] are not in the label set"),
    ("float_labels", _float_labels, "labelsTr/x.nii.gz: float label with non-integer values [0.5, 1.5]"),
    ("more_classes_than_net", _too_many_classes, "label value 7 needs more classes than the network has"),
    ("shape_mismatch", _shape, "labelsTr/x.nii.gz: label shape (10, 9, 7) differs from image shape (10, 9, 8)"),
    ("spacing_mismatch", _spacing, "label spacing [0.8, 0.8, 1.25] differs from image spacing [0.8, 0.8, 2.5]"),
    ("missing_label", _missing, "labelsTr/x.nii.gz: label file not found"),
    ("unreadable_image", _unreadable, "imagesTr/x.nii.gz: unreadable image (truncated gzip"),
    ("label_4d", _label_4d, "labelsTr/x.nii.gz: label is a 4D series"),
]


@parameterized.expand(VERIFY_ERRORS)
def test_verify_errors(_, breaker, phrase):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        good = make_case(root, "good")
        datalist = load_datalist(_write(root, {"training": [good, breaker(root)]}))
        with pytest.raises(DatasetError) as e:
            verify_dataset(datalist, PAPER_LABELS, num_classes=7 if "classes" in _ else None)
        assert any(phrase in p for p in e.value.problems), e.value.problems
        assert not any("good.nii.gz" in p for p in e.value.problems)
        assert e.value.report is not None and e.value.report.n_checked == 2


def test_verify_reports_all_problems_at_once(tmp_path):
    entries = [make_case(tmp_path, "ok"), _outside(tmp_path)]
    entries.append(make_case(tmp_path, "y", label=label_array(shape=(10, 9, 7))))
    entries.append({"image": "./imagesTr/none.nii.gz", "label": "./labelsTr/none.nii.gz"})
    with pytest.raises(DatasetError) as e:
        verify_dataset(load_datalist(_write(tmp_path, {"training": entries})), PAPER_LABELS)
    text = str(e.value)
    assert text.startswith("4 dataset problem(s):")
    for part in ["x.nii.gz: label values [9, 12]", "y.nii.gz: label shape", "none.nii.gz: image file not found"]:
        assert part in text, text
    report = verify_dataset(load_datalist(tmp_path / "dataset.json"), PAPER_LABELS, raise_on_error=False)
    assert not report.ok and len(report.errors) == 4


WARNINGS = [
    ("origin", dict(label_affine=AFFINE + np.array([[0, 0, 0, 1.5]] + [[0] * 4] * 3)), "label origin"),
    ("empty_label", dict(values=()), "label has no foreground voxel"),
    ("names_differ", dict(image_name="img0002.nii.gz", label_name="label0003.nii.gz"), "case numbers differ"),
]


@parameterized.expand(WARNINGS)
def test_verify_warnings(_, kwargs, phrase):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        entries = [make_case(root, "good"), make_case(root, "w", **kwargs)]
        report = verify_dataset(load_datalist(_write(root, {"training": entries})), PAPER_LABELS)
        assert report.ok and any(phrase in w for w in report.warnings), report.warnings


def test_verify_btcv_style_names_do_not_warn(tmp_path):
    entry = make_case(tmp_path, "x", image_name="img0001.nii.gz", label_name="label0001.nii.gz")
    report = verify_dataset(load_datalist(_write(tmp_path, {"training": [entry]})), {"liver": 3, "artery": 1})
    assert report.ok and report.warnings == []


def test_verify_label_never_present_and_label_set_mismatch(tmp_path):
    js = make_dataset(tmp_path, n=2, labels={"background": 0, "liver": 1})  # nnU-Net v2 form
    report = verify_dataset(js, PAPER_LABELS, raise_on_error=False)
    assert any(
        "present in no checked case: spleen (4), stomach (5), gallbladder (6), pancreas (7)" in w
        for w in report.warnings
    )
    # liver is 1 in dataset.json but 3 in the label set: an error, not a warning (tests/test_robustness_inputs.py)
    assert any("disagrees with dataset.json's labels {'liver': 1}" in e for e in report.errors), report.errors
    report = verify_dataset(js, PAPER_LABELS, check_json_labels=False)
    assert any("differs from dataset.json's labels {'liver': 1}" in w for w in report.warnings)
    with pytest.raises(DatasetError, match=r"label values \[3\] are not in the label set \[0, 1\]"):
        verify_dataset(js)  # dataset.json's own label set: value 3 is not in it


def test_verify_num_classes_smaller_than_label_set(tmp_path):
    with pytest.raises(DatasetError, match="needs 8 classes but num_classes=5"):
        verify_dataset(make_dataset(tmp_path, n=1), PAPER_LABELS, num_classes=5)


def test_verify_real_cases(real_dir, tmp_path):
    cases = sorted(p for p in real_dir.iterdir() if (p / "label_abdo.nii.gz").is_file())
    entries = [{"image": str(p / "image.nii.gz"), "label": str(p / "label_abdo.nii.gz")} for p in cases]
    meta = json.loads((cases[0] / "meta.json").read_text())["label_abdo_classes"]
    all_labels = {name: int(i) for i, name in meta.items()}
    with pytest.raises(DatasetError, match=r"duplicate case ids in 'training': \['image'\]"):
        load_datalist(_write(tmp_path, {"training": entries}))  # one folder per case, same file names
    datalist = load_datalist(_write(tmp_path, {"training": entries_with_ids(entries)}))  # explicit ids are kept
    assert [d["case_id"] for d in datalist] == [p.name for p in cases]
    report = verify_dataset(datalist, all_labels, num_classes=19, check_images=True)
    assert report.ok and report.cases_with_label["liver"] == len(cases)
    with pytest.raises(DatasetError) as e:  # the bundle's "real" map omits adrenals, bowel, ...: all listed
        verify_dataset(entries_with_ids(entries), "real")
    assert len(e.value.problems) == len(cases)
    assert all("label_abdo.nii.gz: label values [8, " in p and p.startswith(str(real_dir)) for p in e.value.problems)
    assert "label values [8, 9, 14, 15, 16, 17] are not in the label set [0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 13]" in str(
        e.value
    )


def entries_with_ids(entries):
    return [{**e, "case_id": Path(e["image"]).parent.name} for e in entries]
