"""Candidate regions: C1 (body mask), C2 (dilated stage-1 foreground), organ flags and label masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Flipd, LoadImaged, Orientationd
from parameterized import parameterized
from scipy import ndimage

from custom.candidates import (
    BodyMask,
    BodyMaskd,
    CandidateRegiond,
    MaskLabel,
    MaskLabeld,
    body_mask,
    candidate_region,
    opening_radii,
    organ_flags,
)
from custom.loss import IGNORE_INDEX

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


# ---------------------------------------------------------------- C2


def _ball(r: int) -> np.ndarray:
    g = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return (g**2).sum(0) <= r * r


def _random_pred(seed: int, shape=(24, 20, 18), k: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pred = np.zeros(shape, np.int64)
    for c in range(1, k):
        for _ in range(3):
            lo = [int(rng.integers(0, n - 2)) for n in shape]
            size = [int(rng.integers(1, 5)) for _ in shape]
            pred[tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))] = c
    pred[0, 5, 5] = 1  # foreground on the border
    pred[-1, -1, -1] = 2
    return pred


DILATION_CASES = (
    [(f"ball_r{r}_seed{s}", "ball", r, s) for r in (1, 2, 3, 4) for s in (0, 1)]
    + [("ball_r12_uint16", "ball", 12, 2)]
    + [(f"cube_r{r}_seed{s}", "cube", r, s) for r in (1, 2, 3, 5) for s in (0, 1)]
)


class TestCandidateRegion:
    @parameterized.expand(DILATION_CASES)
    def test_equals_binary_dilation(self, _name, element, r, seed):
        pred = _random_pred(seed)
        if element == "ball":
            expected = ndimage.binary_dilation(pred > 0, structure=_ball(r))
        else:
            expected = ndimage.binary_dilation(pred > 0, structure=np.ones((3, 3, 3), bool), iterations=r)
        np.testing.assert_array_equal(candidate_region(pred, r, element), expected)

    def test_ball_radius_counts(self):
        p = np.zeros((15, 15, 15), int)
        p[7, 7, 7] = 1
        assert [int(candidate_region(p, r).sum()) for r in (0, 1, 2, 3)] == [1, 7, 33, 123]
        assert [int(candidate_region(p, r, "cube").sum()) for r in (0, 1, 2)] == [1, 27, 125]

    def test_r0_is_foreground_and_channel_first(self):
        pred = _random_pred(3)
        np.testing.assert_array_equal(candidate_region(pred, 0), pred > 0)
        np.testing.assert_array_equal(
            candidate_region(torch.from_numpy(pred)[None].float(), 2), candidate_region(pred, 2)
        )

    def test_class_scores_are_argmaxed(self):
        pred = _random_pred(4)
        scores = np.eye(4, dtype=np.float32)[pred].transpose(3, 0, 1, 2) + 0.1
        np.testing.assert_array_equal(candidate_region(scores, 2), candidate_region(pred, 2))

    def test_body_intersection(self):
        pred = _random_pred(5)
        body = np.zeros(pred.shape, bool)
        body[4:20] = True
        c2 = candidate_region(pred, 3, body=body)
        np.testing.assert_array_equal(c2, candidate_region(pred, 3) & body)
        assert not c2[~body].any() and c2.any()
        with pytest.raises(ValueError, match="differs"):
            candidate_region(pred, 3, body=body[1:])

    def test_empty(self):
        assert not candidate_region(np.zeros((8, 8, 8), int), 3).any()

    def test_per_class_radius(self):
        pred = _random_pred(6)
        got = candidate_region(pred, 1, per_class_radius={"2": 3, 3: 0})  # string keys, as from JSON
        expected = candidate_region(np.where(pred == 1, 1, 0), 1)
        expected |= candidate_region(np.where(pred == 2, 1, 0), 3) | (pred == 3)
        np.testing.assert_array_equal(got, expected)

    @parameterized.expand([({"element": "sphere"},), ({"radius": -1},)])
    def test_bad_arguments(self, kwargs):
        with pytest.raises(ValueError):
            candidate_region(_random_pred(0), **kwargs)


LABELS = {"liver": 1, "spleen": 2, "pancreas": 3}


class TestOrganFlags:
    @parameterized.expand(
        [
            ("all_present", {1: 100, 2: 50, 3: 20}, 0.0, {}),
            ("one_missing", {1: 100, 2: 50}, 0.0, {"pancreas": 0.0}),
            ("too_small_float", {1: 100, 2: 50, 3: 20}, 0.3, {"pancreas": 0.16}),
            ("too_small_dict", {1: 100, 2: 50, 3: 20}, {"spleen": 0.5}, {"spleen": 0.4}),
            ("empty", {}, 0.0, {"liver": 0.0, "spleen": 0.0, "pancreas": 0.0}),
        ]
    )
    def test_flags(self, _name, counts, min_ml, expected):
        pred = np.zeros(1000, np.int64)
        i = 0
        for c, n in counts.items():
            pred[i : i + n] = c
            i += n
        flags = organ_flags(pred.reshape(10, 10, 10), LABELS, voxel_volume_ml=0.008, min_ml=min_ml)
        assert list(flags) == list(expected)
        for k, v in expected.items():
            assert flags[k] == pytest.approx(v)

    def test_label_set_name(self):
        assert list(organ_flags(np.zeros((4, 4, 4), int), "paper", 1.0))[:2] == ["artery", "portal_vein"]


def _meta(arr: np.ndarray, spacing: float = 1.0) -> MetaTensor:
    return MetaTensor(torch.from_numpy(arr)[None], affine=torch.diag(torch.tensor([spacing] * 3 + [1.0])))


class TestCandidateRegiond:
    def setup_method(self):
        pred = np.zeros((20, 20, 20), np.int64)
        pred[4:8, 4:8, 4:8] = 1  # 64 voxels
        pred[12:14, 12:14, 12:14] = 2  # 8 voxels
        pred[15, 15, 15] = 3  # 1 voxel
        body = np.zeros_like(pred, dtype=np.uint8)
        body[2:18] = 1
        self.pred, self.body = pred, body

    def _run(self, pred, **kwargs):
        d = {"pred": _meta(pred, 2.0), "c1": _meta(self.body, 2.0)}
        return CandidateRegiond("pred", **kwargs)(d)["c2"]

    def test_no_flags(self):
        c2 = self._run(self.pred, radius=2, labels=LABELS)
        expected = candidate_region(self.pred, 2, body=self.body)
        np.testing.assert_array_equal(c2[0].numpy().astype(bool), expected)
        assert c2.dtype == torch.uint8 and c2.shape == (1, 20, 20, 20)
        assert c2.meta["c2_flags"] == "" and c2.meta["c2_fallback"] is False
        assert c2.meta["c2_fraction"] == pytest.approx(expected.mean())
        torch.testing.assert_close(c2.affine, torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)))

    def test_volume_from_affine(self):
        # voxel 8 mm^3 = 0.008 ml: pancreas (1 voxel) 0.008 ml, spleen 0.064 ml
        c2 = self._run(self.pred, labels=LABELS, min_ml={"pancreas": 0.01, "spleen": 0.05}, fallback="none")
        assert c2.meta["c2_flags"] == "pancreas" and c2.meta["c2_fallback"] is False
        np.testing.assert_array_equal(c2[0].numpy().astype(bool), candidate_region(self.pred, 3, body=self.body))
        c2 = self._run(self.pred, labels=LABELS, min_ml=0.01, voxel_volume_ml=1.0)
        assert c2.meta["c2_flags"] == ""

    def test_fallback_c1(self):
        pred = np.where(self.pred == 3, 0, self.pred)
        c2 = self._run(pred, labels=LABELS)
        assert c2.meta["c2_flags"] == "pancreas" and c2.meta["c2_fallback"] is True
        np.testing.assert_array_equal(c2[0].numpy(), self.body)

    def test_fallback_wider(self):
        pred = np.where(self.pred == 3, 0, self.pred)
        c2 = self._run(pred, labels=LABELS, fallback="wider", fallback_radius=6)
        np.testing.assert_array_equal(c2[0].numpy().astype(bool), candidate_region(pred, 6, body=self.body))

    def test_empty_prediction(self):
        empty = np.zeros_like(self.pred)
        c2 = self._run(empty, fallback="none")
        assert not c2.any() and c2.meta["c2_flags"] == "foreground"
        c2 = self._run(empty, labels=LABELS, fallback="none")
        assert not c2.any() and c2.meta["c2_flags"] == "liver,spleen,pancreas"
        c2 = self._run(empty)
        np.testing.assert_array_equal(c2[0].numpy(), self.body)
        c2 = CandidateRegiond("pred", body_key=None)({"pred": _meta(empty)})["c2"]
        assert c2.all()  # no C1: the whole volume

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="fallback"):
            CandidateRegiond("pred", fallback="c3")
        with pytest.raises(ValueError, match="element"):
            CandidateRegiond("pred", element="diamond")


# ---------------------------------------------------------------- label masking


class TestMaskLabel:
    @parameterized.expand([(torch.float32,), (torch.uint8,), (torch.int64,), (torch.int8,)])
    def test_dtypes(self, dtype):
        label = torch.tensor([[[[0, 1], [2, 1]]]], dtype=dtype)
        mask = torch.tensor([[[[1, 0], [1, 0]]]], dtype=torch.uint8)
        out = MaskLabel()(label, mask)
        assert out.tolist() == [[[[0, 255], [2, 255]]]]
        assert label.tolist() == [[[[0, 1], [2, 1]]]]  # input untouched

    def test_dict_keys_and_meta(self):
        label = MetaTensor(torch.tensor([[[[0, 1], [2, 1]]]]).float(), meta={"filename_or_obj": "x"})
        mask = MetaTensor(torch.tensor([[[[1, 1], [0, 1]]]], dtype=torch.uint8))
        d = MaskLabeld("label", mask_key="c2", original_key="label_full")({"label": label, "c2": mask})
        assert d["label"].tolist() == [[[[0, 1], [IGNORE_INDEX, 1]]]]
        assert d["label_full"] is label and label.tolist() == [[[[0, 1], [2, 1]]]]
        assert isinstance(d["label"], MetaTensor) and d["label"].meta["filename_or_obj"] == "x"
        d = MaskLabeld("label", mask_key="c2", output_key="masked")({"label": label, "c2": mask})
        assert d["label"] is label and d["masked"].tolist() == [[[[0, 1], [255, 1]]]]

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="does not match"):
            MaskLabel()(torch.zeros(1, 4, 4, 4), torch.ones(1, 4, 4, 5))


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
