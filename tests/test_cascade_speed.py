"""Resampling labels back to the input grid by index gathers (``nearest_to_input_grid``): the same voxels as MONAI's
``Invertd(nearest_interp=True)`` on axis-aligned grids (up to the choice at exact ties, where both neighbours are
nearest), None where it does not apply; the workflow resamples only what it writes or evaluates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged, Orientationd, Spacingd

from custom.cascade import nearest_to_input_grid
from tools.phantom import generate_phantom

# orientation, phantom spacing (None: drawn, ~5.5-7 mm), working-grid spacing (mm)
CASES = [
    ("RAS", (3.0, 3.0, 3.0), (6.0, 6.0, 6.0)),  # x2 as the bundle (0.8 -> 1.6 mm): ties are exact, no mismatch
    ("LPS", (3.0, 3.0, 3.0), (6.0, 6.0, 6.0)),
    ("LPS", None, (4.0, 5.0, 7.0)),  # anisotropic, finer and coarser
    ("LAS", None, (3.0, 3.0, 3.0)),  # upsampled
    ("RPI", None, (12.0, 6.5, 9.0)),
]


def _prepared(tmp_path, orientation, spacing, seed=3, phantom_spacing=None):
    kw = {} if phantom_spacing is None else {"spacing": phantom_spacing}
    p = generate_phantom(seed, preset="tiny", orientation=orientation, **kw)
    img, lab = tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz"
    p.save(img, lab)
    pre = Compose(
        [
            LoadImaged(("image", "label"), ensure_channel_first=True),
            Orientationd(("image", "label"), axcodes="RAS"),
            Spacingd(("image", "label"), pixdim=spacing, mode=("bilinear", "nearest")),
        ]
    )
    d = pre({"image": str(img), "label": str(lab)})
    return pre, d, p


@pytest.mark.parametrize("orientation, phantom_spacing, spacing", CASES)
def test_equals_invertd(tmp_path, orientation, phantom_spacing, spacing):
    pre, d, p = _prepared(tmp_path, orientation, spacing, phantom_spacing=phantom_spacing)
    img = d["image"]
    work = d["label"].round().to(torch.uint8)
    # a label map with structure everywhere: the working label plus a voxel-wise pattern
    rng = np.random.default_rng(0)
    work = work + torch.as_tensor(rng.integers(0, 2, work.shape, dtype=np.uint8)) * 10
    mt = MetaTensor(work.as_tensor(), meta=dict(img.meta), applied_operations=list(img.applied_operations))
    ref = Invertd(keys="x", transform=pre, orig_keys="image", nearest_interp=True)({"image": img, "x": mt})["x"]
    ref = np.asarray(ref[0].round().numpy(), dtype=np.uint8)
    got = nearest_to_input_grid(work, img)
    assert got is not None and got.dtype == np.uint8
    assert got.shape == p.image.shape == ref.shape
    # input voxels equidistant from two working voxels on some axis: either neighbour is the nearest one
    m = np.linalg.inv(np.asarray(img.affine)) @ np.asarray(img.meta["original_affine"])
    tie = np.zeros(got.shape, bool)
    for a in range(3):
        src = int(np.argmax(np.abs(m[a, :3])))
        v = m[a, src] * np.arange(got.shape[src]) + m[a, 3]
        t = np.abs(v - np.floor(v) - 0.5) < 1e-4
        tie |= t.reshape([-1 if i == src else 1 for i in range(3)])
    diff = got != ref
    assert not (diff & ~tie).any(), f"{int((diff & ~tie).sum())} voxels differ away from ties"
    if phantom_spacing is not None:  # x2: half of the indices per axis are ties
        assert tie.mean() > 0.5
        assert np.mean(got % 10 == p.label) > 0.6  # the label comes back (x2 down and up loses thin parts)


def test_not_applicable_returns_none(tmp_path):
    pre, d, _ = _prepared(tmp_path, "RAS", (6.0, 6.0, 6.0))
    img = d["image"]
    lab = torch.zeros(1, *img.shape[1:], dtype=torch.uint8)
    oblique = MetaTensor(img.as_tensor(), meta=dict(img.meta))
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.eye(4)
    rot[:2, :2] = [[c, -s], [s, c]]
    oblique.meta["original_affine"] = rot @ np.asarray(img.meta["original_affine"])
    assert nearest_to_input_grid(lab, oblique) is None  # rotated grids: Invertd
    shrunk = MetaTensor(img.as_tensor(), meta=dict(img.meta))
    shrunk.meta["spatial_shape"] = np.asarray(img.meta["spatial_shape"]) * 3  # input voxels beyond the working grid
    assert nearest_to_input_grid(lab, shrunk) is None
    assert nearest_to_input_grid(lab, MetaTensor(img.as_tensor())) is None  # no metadata


RESAMPLED = [
    ({"save_outputs": ["qc"]}, ["inference.json"], ["pred"]),
    ({"save_outputs": ["qc", "c2"]}, ["inference.json"], ["pred", "c2"]),
    ({"save_outputs": ["c1", "stage1"]}, ["inference.json"], ["pred", "c1", "stage1"]),
    ({"save_outputs": ["qc"], "stage1_only": "true"}, ["inference.json"], ["pred", "stage1", "c2"]),
    ({}, ["inference.json", "evaluate.json"], ["pred", "stage1", "stage2_nol"]),  # what the metrics compare
]


@pytest.mark.parametrize("over, files, expected", RESAMPLED)
def test_workflow_resamples_only_what_it_writes(over, files, expected):
    """Each map back on the input grid is a full-resolution resampling: ``inference.json`` asks ``ToInputGridd``
    only for the label map, the optional outputs that are written and what the evaluation compares."""
    from bundle_utils import config_files
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files("common.json", *files))
    parser.update(over)
    assert sorted(parser.get_parsed_content("back_to_input_keys")) == sorted(expected)
    post = parser.get_parsed_content("postprocessing").transforms
    names = [type(t).__name__ for t in post]
    assert names[:3] == ["AsDiscreted", "Compose", "ToInputGridd"], names  # argmax, label_postprocessing, back
    written = sorted(t.output_postfix for t in post if type(t).__name__ == "SaveCased")
    stage1_only = over.get("stage1_only") == "true"
    assert written == sorted(
        ["c2", "stage1"]
        if stage1_only
        else ["seg", *[k for k in ("c1", "stage1", "c2") if k in over.get("save_outputs", [])]]
    )
