"""Label sets of public datasets (``custom.label_presets``): every preset on a label map written with that dataset's
ids and mapped by the shared preprocessing of ``common.json``; absent structures in the losses and metrics; the
mapping report of ``custom.data verify``; training on a BTCV-layout dataset with only ``--source_labels btcv``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import ROOT, SUBPROCESS_TIMEOUT, TINY, bundle_cli, config_files, save_tiny_weights, write_tiny_dataset
from monai.bundle import ConfigParser
from monai.metrics import DiceMetric
from monai.transforms import Compose

from custom.label_presets import PRESETS, dataset_labels, get_preset, label_mapping
from custom.labels import EXTENDED_LABELS, PAPER_LABELS
from custom.loss import CandidateDiceCELoss, CandidateWeightedCELoss, merge_absent_logits
from custom.metrics import dice_per_class, summarize
from custom.verify import verify, verify_dataset

SEVEN = list(PAPER_LABELS)  # artery 1, portal_vein 2, liver 3, spleen 4, stomach 5, gallbladder 6, pancreas 7

# Written from each dataset's own documentation (see custom/label_presets.py for the sources), independently of the
# preset tables: source id -> the paper structure it must become; every other id of the dataset becomes background.
EXPECTED = {
    "btcv": (13, {1: "spleen", 4: "gallbladder", 6: "liver", 7: "stomach", 8: "artery", 10: "portal_vein",
                  11: "pancreas"}),
    "amos": (15, {1: "spleen", 4: "gallbladder", 6: "liver", 7: "stomach", 8: "artery", 10: "pancreas"}),
    "totalsegmentator": (117, {1: "spleen", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
                               52: "artery", 64: "portal_vein"}),
    "word": (16, {1: "liver", 2: "spleen", 5: "stomach", 6: "gallbladder", 8: "pancreas"}),
    "flare22": (13, {1: "liver", 3: "spleen", 4: "pancreas", 5: "artery", 9: "gallbladder", 11: "stomach"}),
    "msd_task03_liver": (2, {1: "liver", 2: "liver"}),
    "msd_task07_pancreas": (2, {1: "pancreas", 2: "pancreas"}),
    "msd_task09_spleen": (1, {1: "spleen"}),
    "real_ct": (18, {1: "spleen", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas", 11: "artery",
                     13: "portal_vein"}),
}  # fmt: skip


def _write_slabs(folder: Path, ids: list[int], name: str = "case_0") -> tuple[Path, Path]:
    """A CT (0 HU body in -1000 HU air) and a label whose axial slice z holds source id ids[z], 1.6 mm grid (padded
    with background slices to the 8 slices that the CT check needs)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = list(ids) + [0] * max(0, 8 - len(ids))
    lab = np.zeros((10, 10, len(ids)), np.uint8 if max(ids) < 256 else np.uint16)
    img = np.full(lab.shape, -1000.0, np.float32)
    img[2:8, 2:8] = 0.0
    for z, v in enumerate(ids):
        lab[3:7, 3:7, z] = v
    aff = np.diag([1.6, 1.6, 1.6, 1.0])
    ip, lp = folder / f"{name}_img.nii.gz", folder / f"{name}_lab.nii.gz"
    nib.save(nib.Nifti1Image(img, aff), ip)
    nib.save(nib.Nifti1Image(lab, aff), lp)
    return ip, lp


def _parser(**over) -> ConfigParser:
    p = ConfigParser()
    p.read_config(config_files("common.json"))
    p["load_keys"], p["load_modes"] = ["image", "label"], ["bilinear", "nearest"]
    for k, v in over.items():
        p[k] = v
    return p


def test_every_dataset_named_in_the_issue_has_a_tested_preset():
    assert set(EXPECTED) == set(PRESETS)
    for name, (n, _) in EXPECTED.items():
        assert sorted(PRESETS[name].labels) == list(range(1, n + 1)), name
        assert PRESETS[name].source and ("http" in PRESETS[name].source or "/" in PRESETS[name].source), name


def test_preset_names_match_the_published_lists_at_key_ids():
    assert get_preset("totalsegmentator").labels[117] == "costal_cartilages"
    assert get_preset("TotalSeg").labels[63] == "inferior_vena_cava"
    assert (
        get_preset("amos").labels[9] == "inferior_vena_cava" and get_preset("amos").labels[15] == "prostate_or_uterus"
    )
    assert get_preset("word").labels[16] == "femur_head_right" and get_preset("flare22").labels[13] == "kidney_left"
    assert get_preset("btcv").labels[13] == "adrenal_gland_left" and get_preset("task09").name == "msd_task09_spleen"


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_maps_a_synthetic_label_map_through_the_shared_preprocessing(preset, tmp_path):
    n, expected = EXPECTED[preset]
    ids = [0, *range(1, n + 1)]
    ip, lp = _write_slabs(tmp_path, ids)
    p = _parser(source_labels=preset)
    out = Compose(p.get_parsed_content("preprocessing_transforms"))({"image": str(ip), "label": str(lp)})
    lab = out["label"][0].numpy()
    assert lab.shape[-1] == max(8, len(ids))
    for z, sid in enumerate(ids):
        want = PAPER_LABELS[expected[sid]] if sid in expected else 0
        got = np.unique(lab[3:7, 3:7, z])
        assert got.tolist() == [want], f"{preset}: source id {sid} became {got.tolist()}, expected {want}"
    absent = sorted(set(SEVEN) - set(expected.values()), key=SEVEN.index)
    m = p.get_parsed_content("label_mapping")
    assert m.absent == absent
    assert p.get_parsed_content("absent_classes") == [PAPER_LABELS[a] for a in absent]
    assert p.get_parsed_content("num_classes") == 8  # the head stays sized by `labels`


def test_mapping_apply_equals_the_config_step_on_arrays():
    m = label_mapping("flare22", PAPER_LABELS)
    src = np.arange(0, 16).reshape(2, 2, 4)  # 14 and 15 are not FLARE22 ids: kept, as MapLabelValued keeps them
    out = m.apply(src)
    assert out.ravel().tolist() == [0, 3, 0, 4, 7, 1, 0, 0, 0, 6, 0, 5, 0, 0, 14, 15]
    assert label_mapping(None, PAPER_LABELS).apply(src).tolist() == src.tolist()


def test_absent_sets_of_the_datasets():
    def absent(name):
        return label_mapping(name, PAPER_LABELS).absent

    assert absent("btcv") == [] and absent("totalsegmentator") == []
    assert absent("amos") == ["portal_vein"] and absent("flare22") == ["portal_vein"]
    assert absent("word") == ["artery", "portal_vein"]
    assert absent("msd_task09_spleen") == ["artery", "portal_vein", "liver", "stomach", "gallbladder", "pancreas"]


def test_without_source_labels_the_preprocessing_has_no_mapping_step():
    p = _parser()
    names = [type(t).__name__ for t in p.get_parsed_content("preprocessing_transforms")]
    assert "MapLabelValued" not in names and p.get_parsed_content("absent_classes") == []
    mapped = [type(t).__name__ for t in _parser(source_labels="btcv").get_parsed_content("preprocessing_transforms")]
    assert mapped[:2] == ["CheckedLoadImaged", "MapLabelValued"] and mapped[2:] == names[1:]
    assert [type(t).__name__ for t in _parser(source_labels="none").get_parsed_content("preprocessing_transforms")] == (
        names
    )


def test_explicit_mapping_through_the_config(tmp_path):
    ip, lp = _write_slabs(tmp_path, [0, 3, 7, 9])
    p = _parser(source_labels={"3": "liver", "7": "spleen", "9": "kidney_left"})
    lab = Compose(p.get_parsed_content("preprocessing_transforms"))({"image": str(ip), "label": str(lp)})["label"][0]
    assert [int(lab[4, 4, z]) for z in range(4)] == [0, 3, 4, 0]
    assert p.get_parsed_content("label_mapping").absent == [
        "artery",
        "portal_vein",
        "stomach",
        "gallbladder",
        "pancreas",
    ]


@pytest.mark.parametrize(
    "source, message",
    [
        ("btvc", "unknown source_labels preset 'btvc'"),
        ({"1": "livr"}, "unknown structure name(s) ['livr']"),
        ({"one": "liver"}, "key 'one' is not an integer label id"),
        ({"0": "liver"}, "id 0 is background"),
        ({"2": 5}, "expected a structure name"),
        ([1, 2], "must be a preset name"),
    ],
)
def test_bad_source_labels_are_refused_by_name(source, message):
    with pytest.raises(ValueError, match=None) as e:
        label_mapping(source, PAPER_LABELS)
    assert message in str(e.value)


def test_dataset_labels_trains_on_the_datasets_own_label_set():
    own = dataset_labels("btcv")
    assert own == {name: i for i, name in get_preset("btcv").labels.items()} and len(own) == 13
    p = _parser(source_labels="btcv", labels="@dataset_labels")
    assert p.get_parsed_content("num_classes") == 14
    m = p.get_parsed_content("label_mapping")
    assert m.orig_labels == m.target_labels == list(range(14)) and m.absent == []
    assert dataset_labels({"4": "liver", "2": "spleen"}) == {"spleen": 1, "liver": 2}
    assert label_mapping({"4": "liver", "2": "spleen"}, dataset_labels({"4": "liver", "2": "spleen"})).mapping == {
        0: 0,
        2: 1,
        4: 2,
    }
    with pytest.raises(ValueError, match="needs source_labels"):
        dataset_labels(None)


# ----------------------------------------------------------------------------------------------------------------------
# Loss and metrics with absent structures
# ----------------------------------------------------------------------------------------------------------------------


def _remap_merged(tgt: torch.Tensor, keep: list[int]) -> torch.Tensor:
    out = tgt.clone()
    for new, old in enumerate(keep, start=1):
        out[tgt == old] = new
    return out


@pytest.mark.parametrize("absent", [(2,), (1, 2), (2, 5, 6)])
def test_marginal_ce_equals_plain_ce_on_the_merged_problem(absent):
    torch.manual_seed(0)
    k = 8
    logits = torch.randn(2, k, 5, 4, 3)
    present = [c for c in range(k) if c not in absent]
    tgt = torch.tensor(present)[torch.randint(0, len(present), (2, 5, 4, 3))]
    tgt[0, 0] = 255  # outside the candidate region
    loss = CandidateWeightedCELoss(k, weighting="none", absent_classes=absent)(logits, tgt)
    merged, keep = merge_absent_logits(logits, tuple(absent))
    ref = CandidateWeightedCELoss(k - len(absent), weighting="none")(merged, _remap_merged(tgt, keep))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, CandidateWeightedCELoss(k, weighting="none")(logits, tgt))


def test_background_voxel_predicted_as_an_absent_class_costs_nothing_a_labelled_one_does():
    k, big = 4, 20.0
    logits = torch.zeros(1, k, 2, 1, 1)
    logits[0, 2] = big  # every voxel predicted as class 2, which the dataset does not label
    tgt = torch.tensor([[[[0]], [[3]]]])  # voxel 0: background, voxel 1: class 3
    marginal = CandidateWeightedCELoss(k, weighting="none", reduction="none", absent_classes=[2])(logits, tgt)
    plain = CandidateWeightedCELoss(k, weighting="none", reduction="none")(logits, tgt)
    assert marginal[0, 0, 0].item() < 1e-6 and plain[0, 0, 0].item() > big - 1  # no push towards background
    assert marginal[0, 0, 1].item() > big - 1  # a labelled class-3 voxel still pushes class 2 down
    # gradient: the background voxel does not lower the absent logit
    logits.requires_grad_(True)
    CandidateWeightedCELoss(k, weighting="none", absent_classes=[2])(logits[:, :, :1], tgt[:, :1]).backward()
    assert logits.grad[0, 2, 0].abs().max().item() < 1e-6


def test_dice_ce_with_absent_classes_equals_the_merged_problem():
    torch.manual_seed(1)
    k, absent = 6, (2, 4)
    logits = torch.randn(2, k, 6, 5, 4)
    present = [0, 1, 3, 5]
    tgt = torch.tensor(present)[torch.randint(0, 4, (2, 1, 6, 5, 4))]
    tgt[:, :, :2] = 255
    loss = CandidateDiceCELoss(k, weighting="none", absent_classes=absent)(logits, tgt)
    merged, keep = merge_absent_logits(logits, absent)
    ref = CandidateDiceCELoss(k - 2, weighting="none")(merged, _remap_merged(tgt, keep))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    # and without absent classes nothing changes
    torch.testing.assert_close(
        CandidateDiceCELoss(k, weighting="sample", absent_classes=[])(logits, torch.where(tgt == 2, 0, tgt)),
        CandidateDiceCELoss(k, weighting="sample")(logits, torch.where(tgt == 2, 0, tgt)),
    )


def test_volume_weighting_with_absent_classes_runs_and_is_finite():
    k = 8
    logits = torch.randn(1, k, 4, 4, 4, requires_grad=True)
    tgt = torch.randint(0, 2, (1, 1, 4, 4, 4)) * 3  # background and liver only
    w = torch.full((1, k), 1.0 / (k - 1))
    loss = CandidateDiceCELoss(k, weighting="volume", absent_classes=[2])(logits, tgt, class_weights=w)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    "absent, message",
    [([0], "foreground class ids"), ([8], "foreground class ids"), (list(range(1, 8)), "no labelled foreground")],
)
def test_bad_absent_classes_are_refused(absent, message):
    with pytest.raises(ValueError, match=message):
        CandidateWeightedCELoss(8, absent_classes=absent)


def test_a_label_map_with_an_absent_class_is_an_error():
    with pytest.raises(ValueError, match="label value 2 is marked absent"):
        CandidateWeightedCELoss(4, weighting="none", absent_classes=[2])(
            torch.zeros(1, 4, 2, 1, 1), torch.full((1, 2, 1, 1), 2)
        )


def test_metrics_leave_absent_structures_out_of_the_mean():
    gt = np.array([0, 3, 3, 4, 4, 0, 0, 0])
    pred = np.array([2, 3, 3, 4, 0, 2, 2, 0])  # predicts the absent class 2 in the dataset's background
    d = dice_per_class(pred, gt, {"portal_vein": 2, "liver": 3, "spleen": 4}, absent=["portal_vein"])
    assert np.isnan(d["portal_vein"]) and d["liver"] == 1.0 and d["spleen"] == pytest.approx(2 / 3)
    assert summarize(list(d.values()))["mean"] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="not in the label set"):
        dice_per_class(pred, gt, {"liver": 3}, absent=["portal_vein"])
    # the validation metric (MONAI DiceMetric, as MeanDice in train.json): NaN for a class the ground truth never has,
    # excluded from the mean
    onehot = torch.nn.functional.one_hot
    y = onehot(torch.as_tensor(gt).view(1, 8, 1, 1), 5).permute(0, 4, 1, 2, 3).float()
    yp = onehot(torch.as_tensor(pred).view(1, 8, 1, 1), 5).permute(0, 4, 1, 2, 3).float()
    per_class = DiceMetric(include_background=False, reduction="none")(yp, y)[0]
    assert torch.isnan(per_class[1]) and per_class[2].item() == 1.0  # class 2 absent; liver perfect
    mean = DiceMetric(include_background=False, reduction="mean")
    mean(yp, y)
    assert mean.aggregate().item() == pytest.approx((1 + 2 / 3) / 2)


# ----------------------------------------------------------------------------------------------------------------------
# custom.data verify knows the mapping
# ----------------------------------------------------------------------------------------------------------------------


def _msd(folder: Path, cases: dict[str, list[int]], labels: dict[str, str]) -> Path:
    entries = []
    for case, ids in cases.items():
        ip, lp = _write_slabs(folder, ids, case)
        entries.append({"image": ip.name, "label": lp.name})
    doc = {"name": "ids", "labels": labels, "training": entries}
    (folder / "dataset.json").write_text(json.dumps(doc))
    return folder / "dataset.json"


def test_verify_reports_unmapped_values_and_absent_structures(tmp_path, capsys):
    btcv_json = {"0": "background", **{str(i): n for i, n in get_preset("btcv").labels.items()}}
    ds = _msd(tmp_path / "btcv", {"a": [0, 1, 6, 8, 10], "b": [0, 6, 11, 14]}, btcv_json)
    # without the mapping BTCV's ids are wrong for the paper's label set
    raw = verify_dataset(ds, "paper", num_classes=8, raise_on_error=False)
    assert any("needs more classes" in e for e in raw.errors)
    rep = verify_dataset(ds, "paper", num_classes=8, raise_on_error=False, source_labels="btcv")
    assert rep.unmapped == {14: 1}
    assert len(rep.errors) == 1 and "b_lab.nii.gz" in rep.errors[0] and "[14]" in rep.errors[0]
    assert "not mapped by source_labels 'btcv'" in rep.errors[0]
    # structures of the label set that no case has: stomach (7) and gallbladder (4) are labelled by BTCV but missing
    assert rep.absent == ["stomach", "gallbladder"]
    assert rep.cases_with_label == {"artery": 1, "portal_vein": 1, "liver": 2, "spleen": 1, "stomach": 0,
                                    "gallbladder": 0, "pancreas": 1}  # fmt: skip
    text = rep.summary()
    assert (
        "3 liver <- 6 liver" in text
        and "1 artery <- 8 aorta" in text
        and "unmapped values found: 14 (1 case(s))" in text
    )
    with pytest.raises(SystemExit):
        verify(str(ds), labels="paper", num_classes=8, source_labels="btcv")
    assert "ERROR" in capsys.readouterr().out

    own = verify_dataset(ds, "dataset", num_classes=14, raise_on_error=False, source_labels="btcv")
    assert own.labels == dataset_labels("btcv") and own.unmapped == {14: 1} and "6 liver <- 6 liver" in own.summary()
    assert own.cases_with_label["aorta"] == 1 and own.cases_with_label["liver"] == 2

    amos = _msd(tmp_path / "amos", {"c": [0, 1, 4, 6, 7, 8, 10, 13]}, {"0": "background", "1": "spleen"})
    rep = verify_dataset(amos, "paper", num_classes=8, raise_on_error=False, source_labels="amos")
    assert rep.ok and rep.absent == ["portal_vein"]
    assert any("not labelled by source_labels 'amos': portal_vein" in w for w in rep.warnings)
    assert "2 portal_vein <- ABSENT" in rep.summary()
    verify(str(amos), labels="paper", num_classes=8, source_labels="amos")  # no error: exit code 0
    out = capsys.readouterr().out
    assert "source_labels 'amos'" in out and "portal_vein <- ABSENT" in out


# ----------------------------------------------------------------------------------------------------------------------
# A BTCV-layout dataset trains through the README commands with only --source_labels btcv
# ----------------------------------------------------------------------------------------------------------------------

#: phantom structure (extended labels) -> BTCV id
TO_BTCV = {"artery": 8, "portal_vein": 10, "liver": 6, "spleen": 1, "stomach": 7, "gallbladder": 4, "pancreas": 11,
           "kidney_right": 2, "kidney_left": 3, "inferior_vena_cava": 9}  # fmt: skip


@pytest.fixture(scope="module")
def btcv_dataset(tmp_path_factory) -> Path:
    """Tiny phantoms in the MSD layout whose label files carry BTCV's ids (and a BTCV dataset.json)."""
    root = tmp_path_factory.mktemp("btcv")
    ds = write_tiny_dataset(root / "data", n_train=3, n_test=1, labels="extended")
    lut = np.zeros(256, np.uint8)
    for name, i in EXTENDED_LABELS.items():
        lut[i] = TO_BTCV[name]
    doc = json.loads(ds.read_text())
    for e in doc["training"] + doc["test"]:
        path = ds.parent / e["label"]
        img = nib.load(path)
        arr = np.asarray(img.dataobj).astype(np.int64)
        nib.save(nib.Nifti1Image(lut[arr], img.affine, img.header), path)
    doc["labels"] = {"0": "background", **{str(i): n for i, n in get_preset("btcv").labels.items()}}
    ds.write_text(json.dumps(doc, indent=1))
    return ds.parent


def test_btcv_layout_trains_with_only_source_labels_btcv(btcv_dataset, tmp_path):
    over = {**TINY, "dataset_dir": str(btcv_dataset), "epoch_length": 1, "val_interval": 1}
    res = subprocess.run(
        bundle_cli(["common.json", "train.json"], {**over, "output_dir": str(tmp_path / "plain")}),
        cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert res.returncode != 0 and "needs more classes" in res.stdout + res.stderr  # BTCV ids without the mapping
    out = tmp_path / "run"
    res = subprocess.run(
        bundle_cli(["common.json", "train.json"], {**over, "output_dir": str(out), "source_labels": "btcv"}),
        cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = torch.load(out / "checkpoints" / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 1
    head = [v for k, v in last["network"].items() if k.endswith("weight")][-1]
    assert head.shape[0] == 8  # the paper's seven structures + background
    assert "dataset verification: checked 3 of 3 cases: 0 error(s)" in res.stdout + res.stderr


def test_btcv_own_label_set_sizes_the_head(btcv_dataset, tmp_path):
    out = tmp_path / "own"
    over = {**TINY, "dataset_dir": str(btcv_dataset), "epoch_length": 1, "output_dir": str(out)}
    res = subprocess.run(
        bundle_cli(["common.json", "train.json"], {**over, "source_labels": "btcv", "labels": "@dataset_labels"}),
        cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    final = torch.load(out / "checkpoints" / "model_final.pt", weights_only=True)
    head = [v for k, v in final["network"].items() if k.endswith("weight")][-1]
    assert head.shape[0] == 14  # BTCV's 13 organs + background


@pytest.mark.slow
def test_btcv_layout_runs_the_whole_readme_chain(btcv_dataset, tmp_path):
    """verify -> stage 1 -> candidates -> stage 2 -> evaluate, each with only --source_labels btcv added."""
    import sys

    ds_json = str(btcv_dataset / "dataset.json")
    res = subprocess.run(
        [sys.executable, "-m", "custom.data", "verify", "--dataset_json", ds_json, "--labels", "paper",
         "--source_labels", "btcv"], cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "source_labels 'btcv'" in res.stdout
    tiny = {**TINY, "dataset_dir": str(btcv_dataset), "source_labels": "btcv"}
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"

    def run(configs, **over):
        base = tiny if "train.json" in configs else {k: v for k, v in tiny.items() if k not in TINY or "#" not in k}
        r = subprocess.run(
            bundle_cli(configs, {**base, **over}), cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    run(["common.json", "train.json"], output_dir=str(s1))
    run(["common.json", "inference.json", "candidates.json"], stage1_dir=str(s1), c2_source="label")
    run(["common.json", "train.json", "stage2.json"], output_dir=str(s2), candidates_dir=str(s1 / "candidates"))
    ev = tmp_path / "eval"
    run(
        ["common.json", "inference.json", "evaluate.json"],
        output_dir=str(ev),
        stage1_weights=str(s1 / "checkpoints" / "model_final.pt"),
        stage2_weights=str(s2 / "checkpoints" / "model_final.pt"),
    )
    assert (ev / "report.md").is_file()


def test_evaluation_dice_uses_the_mapped_labels(btcv_dataset, tmp_path):
    w = save_tiny_weights(tmp_path / "w.pt", kaiming=False)
    ev = tmp_path / "eval"
    over = {k: TINY[k] for k in ("features", "patch_size", "target_spacing")}
    res = subprocess.run(
        bundle_cli(
            ["common.json", "inference.json", "evaluate.json"],
            {**over, "dataset_dir": str(btcv_dataset), "source_labels": "btcv", "output_dir": str(ev),
             "stage1_weights": str(w), "stage2_weights": str(w)},
        ),
        cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = (ev / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    # every phantom has a stomach (paper id 5); read raw, id 5 is BTCV's oesophagus, which the phantoms never label
    stomach = [r.split(",")[header.index("stomach")] for r in rows[1:]]
    assert stomach and all(v not in ("", "nan") for v in stomach), stomach


def test_real_ct_preset_agrees_with_the_shared_data_and_maps_it(real_dir):
    """The ``real_ct`` preset against the shared CTs' own metadata (class names and volumes)."""
    case = real_dir / "01_totalseg_example_ct_abdomen_pelvis"
    meta = json.loads((case / "meta.json").read_text())
    assert {int(k): v for k, v in meta["label_abdo_classes"].items()} == get_preset("real_ct").labels
    img = nib.load(case / "label_abdo.nii.gz")
    lab = np.asarray(img.dataobj).astype(np.int64)
    mapped = label_mapping("real_ct", PAPER_LABELS).apply(lab)
    vox_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
    for name, src in (("liver", "liver"), ("artery", "aorta"), ("portal_vein", "portal_vein_and_splenic_vein")):
        assert (mapped == PAPER_LABELS[name]).sum() * vox_ml == pytest.approx(
            meta["label_abdo_volumes_ml"][src], abs=0.1
        )
    assert set(np.unique(mapped).tolist()) <= set(range(8))
