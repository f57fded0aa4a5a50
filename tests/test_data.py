"""Tests for custom.data: MSD datalists, fold splits, the command line (verification: test_verify.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_utils import SUBPROCESS_TIMEOUT
from parameterized import parameterized

from custom.data import (
    DatasetError,
    case_id_from_path,
    load_datalist,
    main,
    split_folds,
    train_val_split,
)
from custom.labels import PAPER_LABELS

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.array([[-0.8, 0, 0, 100.0], [0, 0.8, 0, -50.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
SHAPE = (10, 9, 8)


# ----------------------------------------------------------------------------------------------------------------------
# helpers: a tiny MSD dataset and ways to break it
# ----------------------------------------------------------------------------------------------------------------------


def save(path: Path, data: np.ndarray, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def label_array(values=(1, 3), shape=SHAPE, dtype=np.uint8) -> np.ndarray:
    lab = np.zeros(shape, dtype=dtype)
    for i, v in enumerate(values):
        lab[1 + 2 * i : 3 + 2 * i, 2:5, 2:6] = v
    return lab


def make_case(root: Path, cid: str, values=(1, 3), image_name=None, label_name=None, **kw) -> dict:
    img = np.full(kw.get("image_shape", SHAPE), -1000, np.int16)
    img[2:-2, 2:-2, 2:-2] = 40
    ip = save(root / "imagesTr" / (image_name or f"{cid}.nii.gz"), img, kw.get("image_affine", AFFINE))
    lab = kw.get("label", label_array(values))
    lp = save(root / "labelsTr" / (label_name or f"{cid}.nii.gz"), lab, kw.get("label_affine", AFFINE))
    return {"image": f"./imagesTr/{ip.name}", "label": f"./labelsTr/{lp.name}"}


def make_dataset(root: Path, n: int = 4, labels=None, test=("./imagesTs/t1.nii.gz",)) -> Path:
    entries = [make_case(root, f"case_{i:03d}", values=(1 + i % 7, 3)) for i in range(n)]
    labels = labels if labels is not None else {"0": "background", **{str(v): k for k, v in PAPER_LABELS.items()}}
    doc = {"name": "tiny", "labels": labels, "training": entries, "test": list(test), "numTraining": n}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


# ----------------------------------------------------------------------------------------------------------------------
# load_datalist
# ----------------------------------------------------------------------------------------------------------------------


def test_load_datalist_resolves_paths_and_case_ids(tmp_path):
    js = make_dataset(tmp_path, n=3)
    items = load_datalist(js)
    assert [d["case_id"] for d in items] == ["case_000", "case_001", "case_002"]
    assert items[1]["image"] == str(tmp_path / "imagesTr" / "case_001.nii.gz")
    assert items[1]["label"] == str(tmp_path / "labelsTr" / "case_001.nii.gz")
    assert load_datalist(tmp_path) == items  # the dataset folder works too
    [test] = load_datalist(js, key="test")
    assert test == {"image": str(tmp_path / "imagesTs" / "t1.nii.gz"), "case_id": "t1"}
    moved = load_datalist(js, base_dir="/elsewhere")
    assert moved[0]["image"] == "/elsewhere/imagesTr/case_000.nii.gz"


@pytest.mark.parametrize("key", ["training", "test"])
def test_load_datalist_gives_monais_paths_plus_case_ids(tmp_path, key):
    """On a clean dataset.json, the same image/label paths as MONAI's load_decathlon_datalist, with base_dir too."""
    from monai.data import load_decathlon_datalist

    js = make_dataset(tmp_path, n=3)
    for base in (None, "/elsewhere"):
        ours = load_datalist(js, key=key, base_dir=base)
        monai = load_decathlon_datalist(js, data_list_key=key, base_dir=base)
        assert [{k: d[k] for k in ("image", "label") if k in d} for d in ours] == monai
        assert all(d["case_id"] for d in ours)


def test_load_datalist_test_entries_as_dicts(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"test": [{"image": "imagesTs/a_0000.nii.gz"}]}))
    assert load_datalist(tmp_path / "dataset.json", key="test")[0]["case_id"] == "a"


def _write(tmp: Path, doc) -> Path:
    p = tmp / "dataset.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


LOAD_ERRORS = [
    ("missing_file", None, "training", "file not found"),
    ("bad_json", "{not json", "training", "not valid JSON"),
    ("no_key", {"test": ["a.nii.gz"]}, "training", "no 'training' list"),
    ("empty", {"training": []}, "training", "the 'training' list is empty"),
    ("no_label", {"training": [{"image": "a.nii.gz"}]}, "training", "training entry without 'label'"),
    ("bad_entry", {"training": [42]}, "training", "expected a path or a dict"),
    ("two_channels", {"test": [{"image": ["a.nii.gz", "b.nii.gz"]}]}, "test", "2 image files for one case"),
    (
        "duplicate",
        {"training": [{"image": "x/a.nii.gz", "label": "l/a.nii.gz"}, {"image": "y/a.nii.gz", "label": "l/b.nii.gz"}]},
        "training",
        "duplicate case ids",
    ),
]


@parameterized.expand(LOAD_ERRORS)
def test_load_datalist_errors(_, doc, key, phrase):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "dataset.json" if doc is None else _write(Path(d), doc)
        with pytest.raises(DatasetError) as e:
            load_datalist(path, key=key)
        assert str(path) in str(e.value) and phrase in str(e.value), str(e.value)


def test_from_folders_pairs_by_id_with_channel_suffix(tmp_path):
    for cid in ["b", "a", "c"]:
        make_case(tmp_path, cid, image_name=f"{cid}_0000.nii.gz")
    (tmp_path / "imagesTr" / "._a_0000.nii.gz").write_bytes(b"resource fork")  # MSD archives ship these
    items = load_datalist(tmp_path, from_folders=True)
    assert [(d["case_id"], Path(d["image"]).name, Path(d["label"]).name) for d in items] == [
        ("a", "a_0000.nii.gz", "a.nii.gz"),
        ("b", "b_0000.nii.gz", "b.nii.gz"),
        ("c", "c_0000.nii.gz", "c.nii.gz"),
    ]


def test_from_folders_keeps_four_digit_case_numbers(tmp_path):
    for cid in ["amos_0001", "amos_0002", "amos_0004"]:  # AMOS names end in four digits: not a channel suffix
        make_case(tmp_path, cid)
    assert [d["case_id"] for d in load_datalist(tmp_path / "dataset.json", from_folders=True)] == [
        "amos_0001",
        "amos_0002",
        "amos_0004",
    ]


def test_from_folders_mismatch_lists_all_ids(tmp_path):
    for cid in ["a", "b", "c"]:
        make_case(tmp_path, cid)
    (tmp_path / "labelsTr" / "b.nii.gz").rename(tmp_path / "labelsTr" / "b2.nii.gz")
    (tmp_path / "labelsTr" / "c.nii.gz").unlink()
    with pytest.raises(DatasetError) as e:
        load_datalist(tmp_path, from_folders=True)
    assert len(e.value.problems) == 2
    assert "labelsTr: no label for image case ids ['b', 'c']" in str(e.value)
    assert "imagesTr: no image for label case ids ['b2']" in str(e.value)


def test_from_folders_multichannel_and_missing_folder(tmp_path):
    make_case(tmp_path, "a", image_name="a_0000.nii.gz")
    save(tmp_path / "imagesTr" / "a_0001.nii.gz", np.zeros(SHAPE, np.int16))
    with pytest.raises(DatasetError, match=r"case 'a' has 2 channel files"):
        load_datalist(tmp_path, from_folders=True)
    with pytest.raises(DatasetError, match=r"imagesTs: folder not found"):
        load_datalist(tmp_path, key="test", from_folders=True)


def test_case_id_from_path():
    assert case_id_from_path("x/amos_0001.nii.gz", strip_channel=False) == "amos_0001"
    assert case_id_from_path("x/ct_0001.nii.gz") == "ct_0001"  # only _0000 is a channel suffix here
    assert case_id_from_path("x/ct_7_0000.nii") == "ct_7"


# ----------------------------------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------------------------------


def cases(n):
    return [{"case_id": f"c{i:02d}", "image": f"/d/c{i:02d}.nii.gz"} for i in range(n)]


@pytest.mark.parametrize("n, k", [(10, 5), (11, 5), (7, 3), (5, 5)])
def test_split_folds_partition(n, k):
    data = cases(n)
    result = split_folds(data, n_folds=k, seed=3)
    assert len(result) == k
    vals = [d["case_id"] for _, val in result for d in val]
    assert sorted(vals) == sorted(d["case_id"] for d in data)  # every case validated exactly once
    for train, val in result:
        ids_t, ids_v = {d["case_id"] for d in train}, {d["case_id"] for d in val}
        assert not ids_t & ids_v and len(ids_t | ids_v) == n
        assert len(val) in (n // k, -(-n // k))
        assert [d["case_id"] for d in val] == sorted(ids_v)  # datalist order kept


def test_split_folds_deterministic_and_order_independent():
    data = cases(12)
    a = split_folds(data, 4, seed=0)
    shuffled = [data[i] for i in np.random.default_rng(1).permutation(12)]
    b = split_folds(shuffled, 4, seed=0)
    assert [{d["case_id"] for d in v} for _, v in a] == [{d["case_id"] for d in v} for _, v in b]
    assert [{d["case_id"] for d in v} for _, v in a] != [{d["case_id"] for d in v} for _, v in split_folds(data, 4, 1)]
    assert split_folds(data, 4, seed=0) == a


def test_split_folds_groups_stay_together():
    data = [{"case_id": f"s{i}", "patient": f"p{i // 2}"} for i in range(12)]  # two scans per patient
    for train, val in split_folds(data, 3, group_key="patient"):
        assert not {d["patient"] for d in train} & {d["patient"] for d in val}
        assert len(val) == 4


@pytest.mark.parametrize(
    "call, phrase",
    [
        (lambda: split_folds(cases(3), n_folds=5), "3 case groups cannot fill 5 folds"),
        (lambda: split_folds(cases(3), n_folds=1), "at least 2"),
        (lambda: split_folds([{"label": "x"}]), "neither 'case_id' nor 'image'"),
        (lambda: split_folds(cases(4), group_key="patient"), "no 'patient'"),
        (lambda: train_val_split(cases(1)), "cannot be split"),
        (lambda: train_val_split(cases(5), val_fraction=1.0), "val_fraction"),
    ],
)
def test_split_errors(call, phrase):
    with pytest.raises(ValueError, match=phrase):
        call()


@pytest.mark.parametrize("n, frac, n_val", [(10, 0.2, 2), (3, 0.1, 1), (2, 0.9, 1), (25, 0.2, 5)])
def test_train_val_split(n, frac, n_val):
    train, val = train_val_split(cases(n), val_fraction=frac, seed=0)
    assert len(val) == n_val and len(train) == n - n_val
    assert not {d["case_id"] for d in train} & {d["case_id"] for d in val}
    assert train_val_split(cases(n)[::-1], val_fraction=frac, seed=0)[1] == val[::-1]


# ----------------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------------


def test_cli_verify_and_folds(tmp_path, monkeypatch, capsys):
    js = make_dataset(tmp_path, n=5)
    monkeypatch.setattr(sys, "argv", ["data", "verify", "--dataset_json", str(js), "--labels", "paper"])
    main()
    assert "checked 5 of 5 cases: 0 error(s)" in capsys.readouterr().out
    out = tmp_path / "folds.json"
    monkeypatch.setattr(
        sys, "argv", ["data", "folds", "--dataset_json", str(js), "--n_folds", "5", "--output", str(out)]
    )
    main()
    folds = json.loads(out.read_text())
    assert sorted(sum(folds.values(), [])) == [f"case_{i:03d}" for i in range(5)]


def test_cli_exits_nonzero_on_problems(tmp_path):
    js = make_dataset(tmp_path, n=2)
    save(tmp_path / "labelsTr" / "case_001.nii.gz", label_array((1, 9)))
    proc = subprocess.run(
        [sys.executable, "-m", "custom.data", "verify", "--dataset_json", str(js), "--labels", "paper"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "case_001.nii.gz: label values [9] are not in the label set" in proc.stdout
    assert "1 error(s)" in proc.stdout


def test_dataset_error_survives_pickling():
    import pickle

    from custom.data import DatasetError

    back = pickle.loads(pickle.dumps(DatasetError(["a.nii: bad", "b.nii: worse"])))
    assert back.problems == ["a.nii: bad", "b.nii: worse"]
    assert str(back) == "2 dataset problem(s):\n  - a.nii: bad\n  - b.nii: worse"
