"""C1, the body mask: synthetic CTs (table, bridge, air tube and pocket), fill modes, the opening in mm, the
transforms' metadata, the tiny phantoms and the real CTs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Flipd, LoadImaged, Orientationd
from parameterized import parameterized
from scipy import ndimage

from custom.body_mask import BodyMask, BodyMaskd, body_mask, opening_radii

SHAPE = (64, 64, 24)


def make_ct(
    seed: int = 0, bridge: bool = False, body_to_border: bool = False, fov_circle: bool = True
) -> dict[str, np.ndarray]:
    """Synthetic CT in HU, (x, y, z) with y anterior: an elliptic body cylinder at ~0 HU in -1000 air, an air tube
    through every slice (open at the first and last slice), a closed air pocket, a table plate below the body
    (posterior, small y), optionally a 1-voxel bridge from the table to the body, and -3024 outside the
    reconstruction circle."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    img = -1000.0 + rng.normal(0, 20, SHAPE)
    rx = 40 if body_to_border else 24
    body = ((x - 32) / rx) ** 2 + ((y - 38) / 16) ** 2 <= 1
    img[body] = rng.normal(20, 30, int(body.sum()))
    tube = ((x - 26) ** 2 + (y - 40) ** 2 <= 9) & body
    img[tube] = -950.0
    pocket = ((x - 40) ** 2 + (y - 36) ** 2 <= 9) & (np.arange(SHAPE[2]) >= 8) & (np.arange(SHAPE[2]) < 14)
    pocket &= body
    img[pocket] = -980.0
    table = (y >= 8) & (y < 13) & (x >= 12) & (x < 52)
    img[table] = 300.0
    if bridge:
        img[32, 13:23, :] = 100.0  # thin bridge from the table to the body (body's lowest y is 22)
    if fov_circle:
        img[(x - 31.5) ** 2 + (y - 31.5) ** 2 > 33**2] = -3024.0
    return {"image": img.astype(np.float32), "body": body, "tube": tube, "pocket": pocket, "table": table}


class TestBodyMask:
    @parameterized.expand([("plain", False, False), ("bridge", True, False), ("body_cut_by_fov", False, True)])
    def test_synthetic(self, _name, bridge, body_to_border):
        ct = make_ct(bridge=bridge, body_to_border=body_to_border, fov_circle=not body_to_border)
        m = body_mask(ct["image"])
        assert m.shape == SHAPE and m.dtype == bool
        assert m[ct["body"]].all()  # includes the tube and the closed pocket
        assert not m[ct["table"]].any()
        outside = ~ct["body"]
        if bridge:  # stubs of the bridge within n = 2 voxels of the body may stay, nothing else
            outside[32, 13:23] = False
        assert not m[outside].any()

    @parameterized.expand([("slicewise", True, True), ("3d", False, True), ("none", False, False)])
    def test_fill_modes(self, mode, tube_filled, pocket_filled):
        ct = make_ct()
        m = body_mask(ct["image"], fill_holes=mode)
        assert m[ct["tube"]].all() == tube_filled and m[ct["tube"]].any() == tube_filled
        assert m[ct["pocket"]].all() == pocket_filled and m[ct["pocket"]].any() == pocket_filled

    def test_without_opening_or_lcc_the_table_stays(self):
        ct = make_ct()
        assert body_mask(ct["image"], opening_iterations=0, largest_component=False)[ct["table"]].all()
        m = body_mask(ct["image"], opening_iterations=0)  # the table is separate: the largest component drops it
        assert not m[ct["table"]].any() and m[ct["body"]].all()

    def test_bridge_needs_opening(self):
        ct = make_ct(bridge=True)
        assert body_mask(ct["image"], opening_iterations=0)[ct["table"]].all()  # one component with the table

    def test_diagonal_contact_is_not_a_connection(self):
        ct = make_ct()
        img = ct["image"].copy()
        img[31, 13:21] = 100.0  # bridge from the table up to y = 20, touching the body (y >= 22) only diagonally
        img[32, 21] = 100.0
        m = body_mask(img)
        assert not m[ct["table"]].any() and m[ct["body"]].all()

    @parameterized.expand(
        [
            ("iterations", {"opening_iterations": 3}, (3, 3, 3)),
            ("mm_iso", {"opening_mm": 2.0, "spacing": (1.0, 1.0, 1.0)}, (2, 2, 2)),
            ("mm_half_up", {"opening_mm": 2.0, "spacing": (0.8, 0.8, 2.0)}, (3, 3, 1)),
            ("mm_coarse", {"opening_mm": 2.0, "spacing": (6.0, 6.0, 8.0)}, (0, 0, 0)),
        ]
    )
    def test_opening_radii(self, _name, kwargs, expected):
        assert opening_radii(**kwargs) == expected

    @parameterized.expand(
        [({"opening_mm": 2.0},), ({"opening_mm": -1.0, "spacing": (1, 1, 1)},), ({"opening_iterations": -1},)]
    )
    def test_opening_radii_errors(self, kwargs):
        with pytest.raises(ValueError):
            opening_radii(**kwargs)

    @parameterized.expand([((1.0, 1.0, 1.0),), ((0.8, 0.8, 3.0),), ((6.0, 6.0, 8.0),)])
    def test_transform_opening_follows_spacing(self, spacing):
        ct = make_ct(bridge=True)
        img = MetaTensor(torch.from_numpy(ct["image"])[None], affine=torch.diag(torch.tensor([*spacing, 1.0])))
        got = BodyMask()(img)[0].numpy().astype(bool)
        np.testing.assert_array_equal(got, body_mask(ct["image"], opening_mm=2.0, spacing=spacing))
        expected_iter = opening_radii(opening_mm=2.0, spacing=spacing)
        if len(set(expected_iter)) == 1:
            np.testing.assert_array_equal(got, body_mask(ct["image"], opening_iterations=expected_iter[0]))
        voxels = BodyMask(opening_mm=None, opening_iterations=1)(img)[0].numpy().astype(bool)
        np.testing.assert_array_equal(voxels, body_mask(ct["image"], opening_iterations=1))

    def test_torch_channel_first_and_empty(self):
        ct = make_ct()
        m = body_mask(torch.from_numpy(ct["image"])[None])
        np.testing.assert_array_equal(m, body_mask(ct["image"]))
        assert not body_mask(np.full(SHAPE, -1000.0)).any()
        assert not body_mask(np.full(SHAPE, np.nan)).any()

    @parameterized.expand([({"fill_holes": "2d"},), ({"opening_iterations": -1},)])
    def test_bad_arguments(self, kwargs):
        with pytest.raises(ValueError):
            body_mask(np.zeros(SHAPE), **kwargs)

    def test_bad_shape(self):
        with pytest.raises(ValueError, match="must be"):
            body_mask(np.zeros((2, 8, 8, 8)))

    def test_dict_transform_meta_and_geometry(self):
        ct = make_ct()
        affine = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0], dtype=torch.float64))
        img = MetaTensor(torch.from_numpy(ct["image"])[None], affine=affine, meta={"filename_or_obj": "case.nii.gz"})
        d = Flipd(keys="image", spatial_axis=0)({"image": img})
        d = BodyMaskd("image")(d)
        c1 = d["c1"]
        assert isinstance(c1, MetaTensor) and c1.dtype == torch.uint8 and c1.shape == (1, *SHAPE)
        torch.testing.assert_close(c1.affine, d["image"].affine)
        assert len(c1.applied_operations) == len(d["image"].applied_operations) == 1
        expected = body_mask(d["image"])
        np.testing.assert_array_equal(c1[0].numpy().astype(bool), expected)
        assert c1.meta["c1_fraction"] == pytest.approx(expected.mean())
        assert 0.25 < c1.meta["c1_fraction"] < 0.5
        assert "c1_fraction" not in d["image"].meta
        np.testing.assert_array_equal(BodyMask()(d["image"]).numpy(), c1.numpy())  # array transform agrees

    def test_dict_transform_one_key(self):
        with pytest.raises(ValueError, match="one image key"):
            BodyMaskd(["a", "b"])


def test_real_ct_body_mask(real_dir):
    load = Compose(
        [
            LoadImaged(["image", "label"], image_only=True),
            EnsureChannelFirstd(["image", "label"]),
            Orientationd(["image", "label"], axcodes="RAS"),
            BodyMaskd("image"),
        ]
    )
    cases = sorted(p for p in real_dir.iterdir() if (p / "label_abdo.nii.gz").is_file())
    if not cases:
        pytest.skip("no labelled real CT found")
    for case in cases:
        d = load({"image": str(case / "image.nii.gz"), "label": str(case / "label_abdo.nii.gz")})
        c1 = d["c1"][0].numpy().astype(bool)
        coverage = c1[d["label"][0].numpy() > 0].mean()
        # measured on cases 01 / 02 / 03: coverage 1.0 each, C1 fraction 0.645 / 0.658 / 0.311 (03: one arm included)
        assert coverage >= 0.999, (case.name, coverage)
        assert 0.25 < d["c1"].meta["c1_fraction"] < 0.7, (case.name, d["c1"].meta["c1_fraction"])
        for corner in c1[0, 0], c1[0, -1], c1[-1, 0], c1[-1, -1]:  # outside air, every slice
            assert not corner.any(), case.name
        torch.testing.assert_close(d["c1"].affine, d["image"].affine)


@parameterized.expand([(0,), (3,)])
def test_phantom_body_mask(seed):
    phantom = pytest.importorskip("tools.phantom")
    ph = phantom.generate_phantom(seed, labels="paper", preset="tiny")
    image = MetaTensor(torch.from_numpy(ph.image.astype(np.float32))[None], affine=torch.as_tensor(ph.affine))
    c1 = BodyMask()(image)[0].numpy().astype(bool)  # 2 mm opening: none at the tiny phantoms' ~6 mm voxels
    assert c1[ph.label > 0].all()
    # bright voxels not connected to any organ: the table shell (and specks of noise); C1 takes none of them
    lab, n = ndimage.label(ph.image >= -500)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    organ = np.bincount(lab[ph.label > 0], minlength=n + 1) > 0
    table = np.isin(lab, np.nonzero((sizes >= 30) & ~organ)[0])
    assert table.sum() > 300 and not c1[table].any()
    assert 0.3 < c1.mean() < 0.6
