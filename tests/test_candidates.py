"""C2 (dilated stage-1 foreground), organ flags and the fallback, and label masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from parameterized import parameterized
from scipy import ndimage

import custom.body_mask
import custom.candidates
from custom.candidates import CandidateRegiond, MaskLabel, MaskLabeld, candidate_region, organ_flags
from custom.loss import IGNORE_INDEX


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


def test_c1_names_are_still_importable_from_candidates():
    """Configs written before C1 moved to custom.body_mask name custom.candidates.BodyMaskd: the same objects."""
    for name in ("BodyMask", "BodyMaskd", "body_mask", "opening_radii"):
        assert getattr(custom.candidates, name) is getattr(custom.body_mask, name)
