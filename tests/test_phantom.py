"""Synthetic CT phantoms: geometry, labels, volumes and HU against real-CT ranges, determinism, the MSD writer."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache

import nibabel as nib
import numpy as np
import pytest
from bundle_utils import SUBPROCESS_TIMEOUT
from parameterized import parameterized
from scipy import ndimage

from custom.labels import EXTENDED_LABELS, PAPER_LABELS
from tools.phantom import PRESETS, generate_phantom, write_dataset

# Organ volumes (ml) seen on real CTs (REFERENCE.md / the issue); artery = aorta and branches in an abdominal FOV.
VOLUME_ML = {
    "liver": (1000, 1800),
    "spleen": (120, 260),
    "kidney_right": (75, 190),
    "kidney_left": (75, 190),
    "stomach": (130, 360),
    "gallbladder": (35, 55),
    "pancreas": (60, 115),
    "artery": (50, 190),
}
# Median HU per phase (the tables). Bile is checked inside the wall.
HU = {
    "portal_venous": {
        "liver": (90, 110),
        "spleen": (100, 120),
        "pancreas": (80, 100),
        "kidney_right": (150, 200),
        "kidney_left": (150, 200),
        "artery": (130, 180),
        "portal_vein": (140, 180),
        "gallbladder": (0, 20),
    },
    "arterial": {"artery": (250, 350), "liver": (60, 80), "pancreas": (100, 130), "gallbladder": (0, 20)},
    "native": {
        "liver": (50, 65),
        "spleen": (40, 50),
        "pancreas": (35, 45),
        "kidney_right": (30, 40),
        "kidney_left": (30, 40),
        "artery": (35, 45),
        "portal_vein": (35, 45),
        "gallbladder": (0, 20),
    },
}
HU_TOL = 6.0  # partial volume and noise at the demo preset's 2.4-3.6 mm voxels


@cache
def _phantom(seed: int, preset: str = "tiny", labels: str = "paper", **kw):
    return generate_phantom(seed, labels=labels, preset=preset, **kw)


def _world_centroid(p, label_id: int) -> np.ndarray:
    ijk = np.argwhere(p.label == label_id).mean(0)
    return p.affine[:3, :3] @ ijk + p.affine[:3, 3]


def _interior(mask: np.ndarray) -> np.ndarray:
    inner = ndimage.binary_erosion(mask)
    return inner if inner.sum() >= 20 else mask


# ---------------------------------------------------------------------------------------------------- geometry

ORIENTATION_CASES = [("RAS",), ("LPS",), ("LAS",)]


@parameterized.expand(ORIENTATION_CASES)
def test_shape_dtype_and_affine(orientation):
    p = _phantom(1, orientation=orientation)
    assert p.image.dtype == np.int16 and p.label.dtype == np.uint8
    assert p.image.shape == p.label.shape == tuple(p.params["shape"])
    assert p.image.shape[:2] == (PRESETS["tiny"]["matrix"],) * 2
    assert 20 <= p.image.shape[2] <= PRESETS["tiny"]["max_slices"]
    assert "".join(nib.aff2axcodes(p.affine)) == orientation == p.params["orientation"]
    spacing = np.sqrt((p.affine[:3, :3] ** 2).sum(0))
    np.testing.assert_allclose(spacing, p.params["spacing"], rtol=1e-4)
    lo, hi = PRESETS["tiny"]["spacing"]
    assert lo - 1e-6 <= spacing[0] <= hi + 1e-6 and spacing[0] == pytest.approx(spacing[1])
    assert spacing[2] in PRESETS["tiny"]["slice_spacing"]


def test_same_anatomy_in_world_coordinates_whatever_the_orientation():
    ras, lps = _phantom(2, orientation="RAS"), _phantom(2, orientation="LPS")
    # the voxel array is really flipped ...
    np.testing.assert_array_equal(lps.image, ras.image[::-1, ::-1, :])
    np.testing.assert_array_equal(lps.label, ras.label[::-1, ::-1, :])
    assert not np.array_equal(lps.image, ras.image)
    # ... and the affine says so: every organ sits at the same world position
    for name, i in ras.labels.items():
        np.testing.assert_allclose(_world_centroid(ras, i), _world_centroid(lps, i), atol=1e-6, err_msg=name)


def test_anatomy_sits_where_it_belongs():
    """Liver right (+x in RAS world) and anterior of the spleen; spleen left; aorta left of the IVC."""
    p = _phantom(3, labels="extended", orientation="LPS")
    c = {name: _world_centroid(p, i) for name, i in p.labels.items()}
    assert c["liver"][0] > c["spleen"][0] + 100
    assert c["liver"][1] > c["spleen"][1]
    assert c["kidney_right"][0] > c["inferior_vena_cava"][0] > c["artery"][0] > c["kidney_left"][0]
    assert c["stomach"][0] < c["liver"][0] and c["stomach"][1] > c["kidney_left"][1]
    assert c["pancreas"][1] > c["artery"][1]  # pancreas in front of the aorta
    assert c["gallbladder"][0] > c["artery"][0] + 20  # right of the midline


def test_overrides_change_the_grid_and_nothing_else():
    base = _phantom(4)
    p = generate_phantom(4, preset="tiny", matrix=48, spacing=(7.0, 7.0, 9.0), n_slices=20, orientation="RAS")
    assert p.image.shape == (48, 48, 20)
    np.testing.assert_allclose(np.sqrt((p.affine[:3, :3] ** 2).sum(0)), [7.0, 7.0, 9.0])
    assert p.params["phase"] == base.params["phase"]
    assert p.params["body"] == base.params["body"]
    q = generate_phantom(4, preset="tiny", phase="native", noise_std=5.0)
    assert q.params["phase"] == "native" and q.params["noise_std"] == 5.0
    assert q.params["target_volumes_ml"] == base.params["target_volumes_ml"]


BAD_CALLS = [
    ({"preset": "huge"}, ValueError),
    ({"colour": 1}, TypeError),
    ({"orientation": "ASR"}, ValueError),
    ({"orientation": "RAX"}, ValueError),
    ({"phase": "venous"}, ValueError),
    ({"labels": ["liver", "brain"]}, ValueError),
    ({"n_slices": 0}, ValueError),
]


@parameterized.expand([(str(kw), kw, err) for kw, err in BAD_CALLS])
def test_bad_arguments_raise(_, kw, err):
    kw = {"preset": "tiny", **kw}
    with pytest.raises(err):
        generate_phantom(0, **kw)


def test_reconstruction_circle_option():
    p = generate_phantom(5, preset="tiny", recon_circle=True)
    assert p.image[0, 0, 0] == -2048 and p.image[-1, -1, -1] == -2048
    assert p.image.min() == -2048 and (p.image > -1100).mean() > 0.5


# ------------------------------------------------------------------------------------------------------ labels


def test_default_labels_are_the_papers_seven():
    p = _phantom(6)
    assert p.labels == PAPER_LABELS and len(p.labels) == 7
    assert set(np.unique(p.label)) == set(range(8))  # every structure present, nothing else


def test_structures_outside_the_label_set_are_drawn_but_unlabelled():
    paper = _phantom(7, preset="tiny", labels="paper", phase="portal_venous")
    ext = _phantom(7, preset="tiny", labels="extended", phase="portal_venous")
    np.testing.assert_array_equal(paper.image, ext.image)  # the label set changes labels only
    assert set(np.unique(ext.label)) == set(range(11)) and ext.labels == EXTENDED_LABELS
    for name in ("kidney_right", "kidney_left", "inferior_vena_cava"):
        m = ext.label == ext.labels[name]
        assert m.sum() > 10, name
        assert (paper.label[m] == 0).all(), name
        if name.startswith("kidney"):
            assert np.median(paper.image[m]) > 100, name  # enhancing kidney, still label 0 in the paper set
    both = ext.label <= 7
    np.testing.assert_array_equal(paper.label[both], ext.label[both])


def test_custom_label_list():
    p = generate_phantom(8, labels=["liver", "kidney_left"], preset="tiny")
    assert p.labels == {"liver": 1, "kidney_left": 2}
    assert set(np.unique(p.label)) == {0, 1, 2}


# ------------------------------------------------------------------------------------- volumes and intensities

PHASE_CASES = [("portal_venous", 11), ("arterial", 12), ("native", 13)]


@parameterized.expand(PHASE_CASES)
def test_demo_volumes_and_hu_in_real_ranges(phase, seed):
    p = _phantom(seed, preset="demo", labels="extended", phase=phase)
    vox_ml = float(np.prod(p.params["spacing"])) / 1000.0
    for name, (lo, hi) in VOLUME_ML.items():
        ml = float((p.label == p.labels[name]).sum()) * vox_ml
        assert lo <= ml <= hi, f"{name}: {ml:.1f} ml outside [{lo}, {hi}]"
        assert ml == pytest.approx(p.params["volumes_ml"][name], abs=0.1)
    med = {}
    for name, (lo, hi) in HU[phase].items():
        m = p.label == p.labels[name]
        med[name] = float(np.median(p.image[_interior(m) if name == "gallbladder" else m]))
        assert lo - HU_TOL <= med[name] <= hi + HU_TOL, f"{phase} {name}: median {med[name]} HU outside [{lo}, {hi}]"
    if phase == "arterial":
        pv = float(np.median(p.image[p.label == p.labels["portal_vein"]]))
        assert pv < med["artery"] - 100  # portal vein lags behind in the arterial phase


def test_tissues_and_body_fraction():
    p = _phantom(14, preset="demo")
    img = p.image
    assert np.median(img[:4, :4, :]) < -950  # air outside the body
    assert img.max() > 400  # cortical bone
    frac = float((img > -500).mean())
    assert 0.25 <= frac <= 0.7, frac  # real CTs: 0.35-0.64 depending on the field of view
    # subcutaneous fat and muscle exist: a histogram peak near -100 HU and one near +50 HU
    hist, edges = np.histogram(img[img > -500], bins=np.arange(-200, 201, 10))
    centers = edges[:-1] + 5
    assert hist[(centers > -130) & (centers < -70)].max() > 0.3 * hist.max()
    assert hist[(centers > 20) & (centers < 120)].max() > 0.3 * hist.max()


def test_phantoms_vary_between_seeds():
    ps = [_phantom(s) for s in (20, 21, 22, 23)]
    for key in ("body", "target_volumes_ml"):
        assert len({json.dumps(p.params[key], sort_keys=True) for p in ps}) == 4
    assert len({p.image.shape for p in ps} | {tuple(p.params["spacing"]) for p in ps}) > 1
    assert not np.array_equal(ps[0].image[:, :, :10], ps[1].image[:, :, :10])


def test_same_seed_gives_identical_bytes():
    a = generate_phantom(30, preset="tiny")
    b = generate_phantom(30, preset="tiny")
    assert a.image.tobytes() == b.image.tobytes() and a.label.tobytes() == b.label.tobytes()
    np.testing.assert_array_equal(a.affine, b.affine)
    assert json.dumps(a.params, sort_keys=True) == json.dumps(b.params, sort_keys=True)


# ---------------------------------------------------------------------------------------------------- writing


def test_save_writes_nifti_with_qform_and_sform(tmp_path):
    p = _phantom(1, orientation="LAS")
    ip, lp = p.save(tmp_path / "a" / "img.nii.gz", tmp_path / "lbl.nii.gz")
    img, lbl = nib.load(ip), nib.load(lp)
    assert img.get_data_dtype() == np.int16 and lbl.get_data_dtype() == np.uint8
    for x in (img, lbl):
        assert int(x.header["qform_code"]) == 1 and int(x.header["sform_code"]) == 1
        np.testing.assert_allclose(x.get_qform(), p.affine, atol=1e-4)
        np.testing.assert_allclose(x.get_sform(), p.affine, atol=1e-4)
        assert "".join(nib.aff2axcodes(x.affine)) == "LAS"
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), p.image)
    np.testing.assert_array_equal(np.asanyarray(lbl.dataobj), p.label)


def test_write_dataset_msd_layout(tmp_path):
    from monai.data import load_decathlon_datalist

    out = tmp_path / "ds"
    path = write_dataset(out, n_train=2, n_test=1, seed=3, preset="tiny", labels="extended")
    meta = json.loads(path.read_text())
    assert path == out / "dataset.json"
    assert meta["tensorImageSize"] == "3D" and meta["modality"] == {"0": "CT"}
    assert meta["labels"]["0"] == "background" and meta["labels"]["1"] == "artery" and len(meta["labels"]) == 11
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    cases = meta["phantom"]["cases"]
    assert [c["case_id"] for c in cases] == ["phantom_0000", "phantom_0001", "phantom_0002"]
    seeds = [c["seed"] for c in cases]
    assert len(set(seeds)) == 3  # train and test never share a seed
    for key, n, img_dir, lbl_dir in (("training", 2, "imagesTr", "labelsTr"), ("test", 1, "imagesTs", "labelsTs")):
        items = load_decathlon_datalist(str(path), data_list_key=key)
        assert len(items) == n
        for item in items:
            cid = item["case_id"]
            assert item["image"] == str(out / img_dir / f"{cid}.nii.gz")
            assert item["label"] == str(out / lbl_dir / f"{cid}.nii.gz")
            img, lbl = nib.load(item["image"]), nib.load(item["label"])
            assert img.shape == lbl.shape
            np.testing.assert_allclose(img.affine, lbl.affine)
            params = next(c["params"] for c in cases if c["case_id"] == cid)
            assert list(img.shape) == params["shape"]
    # the recorded seed regenerates the case
    again = generate_phantom(seeds[2], labels="extended", preset="tiny")
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(out / "labelsTs" / "phantom_0002.nii.gz").dataobj), again.label
    )
    # the same dataset seed gives the same case seeds; another gives others
    assert write_dataset(tmp_path / "b", n_train=2, n_test=1, seed=3, preset="tiny").exists()
    meta_b = json.loads((tmp_path / "b" / "dataset.json").read_text())
    assert [c["seed"] for c in meta_b["phantom"]["cases"]] == seeds


def test_write_dataset_refuses_to_overwrite(tmp_path):
    out = tmp_path / "ds"
    write_dataset(out, n_train=1, n_test=0, preset="tiny")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(out)):
        write_dataset(out, n_train=1, n_test=0, preset="tiny")
    path = write_dataset(out, n_train=1, n_test=1, seed=9, preset="tiny", overwrite=True)
    meta = json.loads(path.read_text())
    assert meta["numTest"] == 1 and meta["phantom"]["seed"] == 9
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["phantom_0000.nii.gz"]


def test_command_line(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "tools.phantom", "write_dataset", "--out_dir", str(out), "--n_train", "1"]
    cmd += ["--n_test", "1", "--preset", "tiny", "--labels", "extended"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 1 and len(meta["labels"]) == 11


@pytest.mark.slow
def test_full_preset():
    p = generate_phantom(0, preset="full")
    assert p.image.shape[:2] == (512, 512)
    sp = np.sqrt((p.affine[:3, :3] ** 2).sum(0))
    assert 0.6 <= sp[0] <= 0.9 and 0.5 <= sp[2] <= 2.5
    assert 200 <= p.image.shape[2] * sp[2] <= 460
    vox_ml = float(np.prod(sp)) / 1000.0
    for name, (lo, hi) in VOLUME_ML.items():
        if name in p.labels:
            assert lo <= (p.label == p.labels[name]).sum() * vox_ml <= hi, name
