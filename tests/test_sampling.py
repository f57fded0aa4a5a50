"""Tests of custom/sampling.py: patches inside the candidate region, full size at borders, lazy padding, determinism."""

from __future__ import annotations

import unittest
import warnings

import numpy as np
import torch
from monai.data import MetaTensor
from parameterized import parameterized

from custom.sampling import RandCandidateCropd, crop_box, draw_candidate_voxels

SHAPE = (30, 26, 22)  # volume smaller than the box: every patch touches a border
PATCH, MARGIN, AUG = (100, 100, 92), 44, (3, 2, 1)
BOX = tuple(p + 2 * a for p, a in zip(PATCH, AUG, strict=True))  # (106, 104, 94)
# index in the box of the drawn voxel: aug margin + net margin + output centre (output 12 x 12 x 4)
CENTRE_IN_BOX = tuple(a + MARGIN + (p - 2 * MARGIN) // 2 for p, a in zip(PATCH, AUG, strict=True))


def make_data(voxels, shape=SHAPE, affine=None):
    image = MetaTensor(torch.arange(np.prod(shape), dtype=torch.float32).reshape(1, *shape), affine=affine)
    label = MetaTensor((torch.arange(np.prod(shape)) % 7).to(torch.uint8).reshape(1, *shape), affine=affine)
    c1 = torch.zeros(1, *shape, dtype=torch.bool)
    for v in voxels:
        c1[(0, *v)] = True
    return {"image": image, "label": label, "c1": MetaTensor(c1, affine=affine), "class_weights": torch.ones(8)}


def cropper(**kwargs):
    args = {"patch_size": PATCH, "margin": MARGIN, "aug_margin": AUG, "image_pad_value": -1.0}
    args.update(kwargs)
    return RandCandidateCropd(**args)


BORDER_CASES = [
    ("origin_corner", (0, 0, 0)),
    ("far_corner", (SHAPE[0] - 1, SHAPE[1] - 1, SHAPE[2] - 1)),
    ("middle", (15, 13, 11)),
    ("mixed", (0, SHAPE[1] - 1, 5)),
]


class TestRandCandidateCropd(unittest.TestCase):
    @parameterized.expand(BORDER_CASES)
    def test_full_size_and_centre_on_single_candidate(self, _, voxel):
        data = make_data([voxel])
        out = cropper(num_samples=3).set_random_state(0)(data)
        self.assertEqual(len(out), 3)
        flat = int(np.ravel_multi_index(voxel, SHAPE))
        for s in out:
            for k in ("image", "label", "c1"):
                self.assertEqual(tuple(s[k].shape), (1, *BOX), k)
            # the only candidate voxel lands on the output centre, in image, label and mask alike
            self.assertEqual(float(s["image"][(0, *CENTRE_IN_BOX)]), float(flat))
            self.assertEqual(int(s["label"][(0, *CENTRE_IN_BOX)]), flat % 7)
            self.assertTrue(bool(s["c1"][(0, *CENTRE_IN_BOX)]))
            self.assertEqual(int(s["c1"].sum()), 1)
            self.assertEqual(s["image"].meta["crop_center"], list(voxel))
            # outside the volume: the pad values (the volume is smaller than the box, so there is always some)
            outside = s["image"] == -1.0
            self.assertEqual(int(outside.sum()), int(np.prod(BOX)) - int(np.prod(SHAPE)))
            self.assertTrue(bool((s["label"][outside] == 255).all()))
            self.assertEqual(s["label"].dtype, torch.uint8)
            self.assertIs(s["class_weights"], data["class_weights"])

    def test_crop_matches_volume_where_inside(self):
        data = make_data([(4, 20, 3)])
        s = cropper().set_random_state(1)(data)[0]
        start = [c - o for c, o in zip((4, 20, 3), CENTRE_IN_BOX, strict=True)]
        img = s["image"].as_tensor()[0]
        for v in [(0, 0, 0), (29, 25, 21), (10, 3, 17)]:
            b = tuple(x - st for x, st in zip(v, start, strict=True))
            self.assertEqual(float(img[b]), float(data["image"][(0, *v)]))

    def test_centres_inside_random_mask(self):
        rng = np.random.RandomState(3)
        voxels = [tuple(int(rng.randint(0, n)) for n in SHAPE) for _ in range(5)]
        out = cropper(num_samples=40).set_random_state(5)(make_data(voxels))
        seen = {tuple(s["c1"].meta["crop_center"]) for s in out}
        self.assertTrue(seen <= set(voxels))
        self.assertGreater(len(seen), 2)
        for s in out:
            self.assertTrue(bool(s["c1"][(0, *CENTRE_IN_BOX)]))

    def test_determinism(self):
        data = make_data([(1, 2, 3), (20, 5, 7), (29, 25, 0), (8, 8, 8)])
        t = cropper(num_samples=6)
        a = [s["image"].meta["crop_center"] for s in t.set_random_state(7)(data)]
        b = [s["image"].meta["crop_center"] for s in t.set_random_state(7)(data)]
        c = [s["image"].meta["crop_center"] for s in t.set_random_state(8)(data)]
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    def test_affine_follows_crop(self):
        affine = torch.tensor([[2.0, 0, 0, -10], [0, 0, 3.0, 5], [0, -1.5, 0, 7], [0, 0, 0, 1]], dtype=torch.float64)
        s = cropper().set_random_state(0)(make_data([(5, 6, 7)], affine=affine))[0]
        start = torch.tensor([c - o for c, o in zip((5, 6, 7), CENTRE_IN_BOX, strict=True)] + [1], dtype=torch.float64)
        for k in ("image", "label", "c1"):
            self.assertTrue(torch.allclose(s[k].affine[:, 3], affine @ start), k)
            self.assertTrue(torch.allclose(s[k].affine[:3, :3], affine[:3, :3]), k)

    def test_empty_mask_warns_and_still_crops(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = cropper(num_samples=2).set_random_state(0)(make_data([]))
        self.assertTrue(any("empty" in str(w.message) for w in caught))
        self.assertEqual([tuple(s["image"].shape) for s in out], [(1, *BOX)] * 2)

    def test_missing_label_allowed(self):
        data = make_data([(3, 3, 3)])
        del data["label"]
        out = cropper(allow_missing_keys=True).set_random_state(0)(data)
        self.assertNotIn("label", out[0])
        with self.assertRaises(KeyError):
            cropper().set_random_state(0)(data)

    def test_drop_candidate(self):
        out = cropper(keep_candidate=False).set_random_state(0)(make_data([(3, 4, 5)]))
        self.assertEqual(set(out[0]), {"image", "label", "class_weights"})
        self.assertEqual(int(out[0]["label"][(0, *CENTRE_IN_BOX)]), int(np.ravel_multi_index((3, 4, 5), SHAPE)) % 7)

    def test_defaults(self):
        t = RandCandidateCropd()
        self.assertEqual((t.box_size, t.offset), ((132, 132, 116), (66, 66, 58)))

    @parameterized.expand(
        [
            ("no_output_region", {"patch_size": (88, 100, 100)}),
            ("negative_aug_margin", {"aug_margin": -1}),
            ("zero_samples", {"num_samples": 0}),
            ("two_margins", {"margin": (44, 44)}),
        ]
    )
    def test_bad_arguments(self, _, kwargs):
        with self.assertRaises(ValueError):
            cropper(**kwargs)

    def test_shape_mismatch_and_missing_candidate(self):
        data = make_data([(1, 1, 1)])
        data["label"] = data["label"][:, :-1]
        with self.assertRaises(ValueError):
            cropper()(data)
        data = make_data([(1, 1, 1)])
        del data["c1"]
        with self.assertRaises(KeyError):
            cropper()(data)


class TestHelpers(unittest.TestCase):
    @parameterized.expand([("torch", torch.as_tensor), ("numpy", np.asarray)])
    def test_crop_box_pads_lazily(self, _, conv):
        x = conv(np.arange(60, dtype=np.float32).reshape(1, 3, 4, 5))
        out = crop_box(x, (-2, 1, 3), (6, 2, 4), pad_value=-5)
        self.assertEqual(tuple(out.shape), (1, 6, 2, 4))
        ref = np.pad(
            np.arange(60, dtype=np.float32).reshape(1, 3, 4, 5),
            ((0, 0), (2, 1), (0, 0), (0, 2)),
            "constant",
            constant_values=-5,
        )
        np.testing.assert_array_equal(np.asarray(out), ref[:, :, 1:3, 3:7])
        far = crop_box(x, (10, 10, 10), (2, 2, 2), pad_value=7)  # entirely outside
        np.testing.assert_array_equal(np.asarray(far), np.full((1, 2, 2, 2), 7, np.float32))

    def test_draw_is_uniform_over_voxels_not_slices(self):
        m = np.zeros((1, 8, 4, 4), bool)
        m[0, 0, 0, 0] = True  # one voxel in slice 0
        m[0, 5, :3, 1] = True  # three voxels in slice 5
        vox, found = draw_candidate_voxels(torch.as_tensor(m), 4000, np.random.RandomState(0))
        self.assertTrue(found)
        self.assertTrue(bool(m[0][tuple(vox.T)].all()))
        frac0 = float(np.mean(vox[:, 0] == 0))
        self.assertAlmostEqual(frac0, 0.25, delta=0.03)  # binomial sd ~0.007
        self.assertEqual(len({tuple(v) for v in vox}), 4)

    def test_multichannel_and_float_mask(self):
        m = np.zeros((2, 5, 5, 5), np.float32)
        m[1, 4, 0, 2] = 1.0
        vox, found = draw_candidate_voxels(m, 3, np.random.RandomState(0))
        self.assertTrue(found)
        self.assertEqual(vox.tolist(), [[4, 0, 2]] * 3)


if __name__ == "__main__":
    unittest.main()
