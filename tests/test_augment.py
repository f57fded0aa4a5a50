"""Tests of custom/augment.py: geometry of the one-resampling augmentation, exact centre crop, determinism, batches."""

from __future__ import annotations

import math
import unittest

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from parameterized import parameterized

from custom.augment import AugmentParams, CascadeBatchPreparer, RandElasticRigid3D, centre_crop, rotation_matrix
from custom.sampling import RandCandidateCropd

PATCH, OUT = (20, 20, 20), (4, 4, 4)  # small sizes: the geometry does not depend on the network's margin


def aug(**kwargs):
    args = {"patch_size": PATCH, "output_size": OUT, "seed": 0}
    args.update(kwargs)
    return RandElasticRigid3D(**args)


def boxes(a=(3, 3, 3), batch=1, seed=0, labels=(0, 3, 7)):
    g = torch.Generator().manual_seed(seed)
    size = tuple(p + 2 * m for p, m in zip(PATCH, a, strict=True))
    image = torch.randn(batch, 1, *size, generator=g)
    idx = torch.randint(0, len(labels), (batch, 1, *size), generator=g)
    return image, torch.tensor(labels, dtype=torch.uint8)[idx]


def with_translation(t, batch=1):
    p = AugmentParams.identity(batch)
    p.translation = torch.tensor([t] * batch, dtype=torch.float32)
    return p


class TestGeometry(unittest.TestCase):
    @parameterized.expand([("margin3", (3, 3, 3)), ("margin0", (0, 0, 0)), ("uneven", (1, 4, 2))])
    def test_identity_resampling_is_the_centre_crop(self, _, a):
        image, label = boxes(a, batch=2)
        img, lab = aug().apply(image, label, AugmentParams.identity(2))
        ref_img, ref_lab = centre_crop(image, label, PATCH, OUT)
        self.assertEqual(tuple(img.shape), (2, 1, *PATCH))
        self.assertEqual(tuple(lab.shape), (2, 1, *OUT))
        torch.testing.assert_close(img, ref_img, atol=1e-4, rtol=0)
        self.assertTrue(torch.equal(lab, ref_lab))
        # the label patch is the centre of the image patch's box, voxel for voxel
        m = [(p - o) // 2 + x for p, o, x in zip(PATCH, OUT, a, strict=True)]
        self.assertTrue(torch.equal(lab, label[:, :, m[0] : m[0] + 4, m[1] : m[1] + 4, m[2] : m[2] + 4].long()))

    @parameterized.expand([("disabled", {"enabled": False}), ("prob0", {"prob": 0.0})])
    def test_no_augmentation_is_exact_crop(self, _, kwargs):
        image, label = boxes(batch=3)
        img, lab = aug(**kwargs)(image, label)
        ref_img, ref_lab = centre_crop(image, label, PATCH, OUT)
        self.assertTrue(torch.equal(img, ref_img))
        self.assertTrue(torch.equal(lab, ref_lab))

    @parameterized.expand([("x", (3.0, 0.0, 0.0)), ("mixed", (2.0, -3.0, 1.0)), ("negative", (-3.0, -1.0, -2.0))])
    def test_translation_moves_content(self, _, t):
        a = (3, 3, 3)
        image, label = boxes(a)
        img, lab = aug().apply(image, label, with_translation(t))
        s = [int(x + ti) for x, ti in zip(a, t, strict=True)]  # output voxel i shows box voxel i + a + t
        ref = image[:, :, s[0] : s[0] + 20, s[1] : s[1] + 20, s[2] : s[2] + 20]
        torch.testing.assert_close(img, ref, atol=1e-4, rtol=0)
        s = [x + 8 for x in s]
        self.assertTrue(torch.equal(lab, label[:, :, s[0] : s[0] + 4, s[1] : s[1] + 4, s[2] : s[2] + 4].long()))

    @parameterized.expand([("z", 2), ("x", 0), ("y", 1)])
    def test_rotation_by_90_degrees(self, _, axis):
        image, label = boxes((0, 0, 0))
        angles = torch.zeros(1, 3)
        angles[0, axis] = math.pi / 2
        p = AugmentParams.identity(1)
        p.rotation = rotation_matrix(angles)
        img, lab = aug().apply(image, label, p)
        # p = c + R x. About z: (x, y) -> (-y, x), so out[i, j, k] = in[n-1-j, i, k]; likewise for the other axes
        u, v = [(1, 2), (2, 0), (0, 1)][axis]  # R maps axis u to v and v to -u
        n = PATCH[0]
        expected = torch.empty_like(image[0, 0])
        for idx in np.ndindex(*PATCH):
            src = list(idx)
            src[u], src[v] = n - 1 - idx[v], idx[u]
            expected[idx] = image[(0, 0, *src)]
        torch.testing.assert_close(img[0, 0], expected, atol=1e-4, rtol=0)
        self.assertTrue(bool(torch.isin(lab, torch.tensor([0, 3, 7])).all()))

    def test_grid_matches_direct_formula(self):
        """The spline-folded grid equals c + t + R x computed directly in float64 (to 1e-4 voxel)."""
        t = RandElasticRigid3D(patch_size=(100, 100, 92), seed=0, rotation_degrees=30.0)
        p = t.randomize(2)
        p.control = None
        box = (160, 150, 140)
        grid = t.sampling_grid(p, box).double()
        axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in t.patch_size]
        x = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        ref = torch.einsum("bij,xyzj->bxyzi", p.rotation.double(), x) + p.translation.double().view(2, 1, 1, 1, 3)
        scale = torch.tensor([2.0 / (s - 1) for s in box], dtype=torch.float64)
        err = (grid.flip(-1) / scale - ref).abs().amax()
        self.assertLess(float(err), 1e-4)

    def test_rotation_matrix_is_right_handed(self):
        r = rotation_matrix(torch.tensor([[0.0, 0.0, math.pi / 2]]))[0]
        torch.testing.assert_close(r @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
        r = rotation_matrix(torch.randn(5, 3))
        torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(3).expand(5, 3, 3), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.linalg.det(r), torch.ones(5))

    def test_out_of_box_gets_pad_values(self):
        image, label = boxes((3, 3, 3), labels=(0, 3, 7))
        img, lab = aug(image_pad_value=-1.0).apply(image, label, with_translation((15.0, 0.0, 0.0)))
        # output x index i samples box x = i + 18: the box has 26 voxels, so i >= 8 is outside
        self.assertTrue(bool((img[:, :, 9:] == -1.0).all()))
        self.assertFalse(bool((img[:, :, :7] == -1.0).any()))
        self.assertTrue(bool((lab == 255).all()))  # label region i in 8..11 -> box 26..29, outside
        self.assertTrue(bool(torch.isin(lab, torch.tensor([0, 3, 7, 255])).all()))

    def test_label_values_from_input_set_under_random_augmentation(self):
        image, label = boxes((3, 3, 3), batch=4, labels=(0, 2, 5, 255))
        _, lab = aug(translation=6.0, rotation_degrees=20.0, max_displacement=3.0, grid_spacing=8)(image, label)
        self.assertEqual(lab.dtype, torch.int64)
        self.assertTrue(bool(torch.isin(lab, torch.tensor([0, 2, 5, 255])).all()))
        self.assertGreater(len(torch.unique(lab)), 2)

    @parameterized.expand([("uniform", "uniform", 6.0), ("normal", "normal", 6.0), ("far", "uniform", 14.0)])
    def test_label_window_equals_full_box_sampling(self, _, dist, shift):
        """The label is sampled from a window of the box only; it must equal sampling the whole box."""
        image, label = boxes((3, 3, 3), batch=4, labels=(0, 1, 2, 3, 4, 5, 6))
        t = aug(translation=shift, rotation_degrees=20.0, max_displacement=3.0, grid_spacing=8, distribution=dist)
        p = t.randomize(4)
        _, lab = t.apply(image, label, p)
        grid = t.sampling_grid(p, image.shape[2:])[:, 8:12, 8:12, 8:12]
        ref = torch.nn.functional.grid_sample(label.float() - 255, grid, mode="nearest", align_corners=True) + 255
        self.assertTrue(torch.equal(lab, ref.long()))
        self.assertLess(len(torch.unique(lab)), 9)


class TestRandomParameters(unittest.TestCase):
    @parameterized.expand(
        [("cubic_uniform", 3, "uniform"), ("linear_uniform", 1, "uniform"), ("cubic_normal", 3, "normal")]
    )
    def test_elastic_field_bounded_and_smooth(self, _, order, dist):
        t = RandElasticRigid3D(patch_size=(132, 132, 116), spline_order=order, distribution=dist, seed=1)
        p = t.randomize(2)
        self.assertEqual(tuple(p.control.shape[2:]), t.control_shape)
        field_params = AugmentParams(torch.eye(3).expand(2, 3, 3), torch.zeros(2, 3), p.control, p.apply)
        box = [s + 2 * m for s, m in zip(t.patch_size, t.required_margin(), strict=True)]
        grid = t.sampling_grid(field_params, box)
        base = t.sampling_grid(AugmentParams.identity(2), box)
        scale = torch.tensor([2.0 / (s - 1) for s in box[::-1]])  # grid is in (z, y, x) order
        disp = (grid - base) / scale  # voxels
        bound = float(p.control.abs().amax()) + 1e-3
        self.assertLessEqual(float(disp.abs().amax()), bound)
        if dist == "uniform":
            self.assertLessEqual(bound, 4.0 + 1e-3)
        self.assertGreater(float(disp.abs().amax()), 0.5)
        # a coarse grid (spacing 32): neighbouring voxels move by far less than a voxel
        self.assertLess(float((disp[:, 1:] - disp[:, :-1]).abs().amax()), 0.5)

    def test_parameter_ranges(self):
        t = RandElasticRigid3D(seed=0)
        p = t.randomize(500)
        self.assertLessEqual(float(p.translation.abs().amax()), 20.0)
        self.assertGreater(float(p.translation.abs().amax()), 18.0)
        self.assertLessEqual(float(p.control.abs().amax()), 4.0)
        # three angles of at most 5 degrees compose to a rotation of at most ~5 * sqrt(3) degrees
        trace = torch.diagonal(p.rotation, dim1=1, dim2=2).sum(-1)
        angle = torch.rad2deg(torch.acos(((trace - 1) / 2).clamp(-1, 1)))
        self.assertLessEqual(float(angle.amax()), 5 * math.sqrt(3) + 0.05)
        self.assertGreater(float(angle.amax()), 6.0)
        self.assertTrue(bool(p.apply.all()))

    def test_required_margin_keeps_samples_inside_box(self):
        t = RandElasticRigid3D(seed=3)
        m = t.required_margin()
        box = [s + 2 * a for s, a in zip(t.patch_size, m, strict=True)]
        worst = AugmentParams(
            rotation_matrix(torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]]) * math.radians(5)),
            torch.tensor([[20.0, -20.0, 20.0], [-20.0, 20.0, -20.0]]),
            torch.full((2, 3, *t.control_shape), 4.0),
            torch.ones(2, dtype=torch.bool),
        )
        for params in (worst, t.randomize(2)):
            self.assertLessEqual(float(t.sampling_grid(params, box).abs().amax()), 1.0)
        # one voxel less would not do
        tight = [b - 2 for b in box]
        self.assertGreater(float(t.sampling_grid(worst, tight).abs().amax()), 1.0)

    def test_determinism(self):
        image, label = boxes(batch=2)
        a = aug(seed=5)(image, label)
        b = aug(seed=5)(image, label)
        c = aug(seed=6)(image, label)
        t = aug(seed=5)
        t(image, label)
        d = t.set_random_state(5)(image, label)
        for x, y in [(a, b), (a, d)]:
            self.assertTrue(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]))
        self.assertFalse(torch.equal(a[0], c[0]))

    def test_prob_mixes_exact_crops_and_augmented_samples(self):
        image, label = boxes(batch=8)
        t = aug(prob=0.5, seed=2)
        p = t.randomize(8)
        self.assertTrue(bool(p.apply.any()) and not bool(p.apply.all()))
        img, lab = t.apply(image, label, p)
        ref_img, _ = centre_crop(image, label, PATCH, OUT)
        for i in range(8):
            self.assertEqual(torch.equal(img[i], ref_img[i]), not bool(p.apply[i]), i)
        full, _ = t.apply(image, label, AugmentParams(p.rotation, p.translation, p.control, torch.ones(8, dtype=bool)))
        torch.testing.assert_close(img[p.apply], full[p.apply])

    @parameterized.expand(
        [
            ("distribution", {"distribution": "gaussian"}),
            ("spline_order", {"spline_order": 2}),
            ("prob", {"prob": 1.5}),
            ("odd_output_difference", {"output_size": (5, 4, 4)}),
            ("output_too_big", {"output_size": (22, 4, 4)}),
            ("grid_spacing", {"grid_spacing": 0}),
        ]
    )
    def test_bad_arguments(self, _, kwargs):
        with self.assertRaises(ValueError):
            aug(**kwargs)

    @parameterized.expand(
        [
            ("odd_margin", (1, 1, 27, 26, 26), (1, 1, 27, 26, 26)),
            ("box_too_small", (1, 1, 18, 26, 26), (1, 1, 18, 26, 26)),
            ("label_mismatch", (1, 1, 26, 26, 26), (1, 1, 26, 26, 24)),
            ("label_channels", (1, 1, 26, 26, 26), (1, 2, 26, 26, 26)),
            ("not_5d", (1, 26, 26, 26), (1, 26, 26, 26)),
        ]
    )
    def test_bad_boxes(self, _, image_shape, label_shape):
        with self.assertRaises(ValueError):
            aug()(torch.zeros(image_shape), torch.zeros(label_shape))


class TestCascadeBatchPreparer(unittest.TestCase):
    def test_centre_crop_and_class_weights(self):
        image, label = boxes(batch=2)
        w = torch.rand(2, 8)
        batch = {"image": MetaTensor(image), "label": MetaTensor(label), "class_weights": w}
        x, y = CascadeBatchPreparer(None, patch_size=PATCH, output_size=OUT)(batch, torch.device("cpu"))
        ref_x, ref_y = centre_crop(image, label, PATCH, OUT)
        self.assertTrue(torch.equal(x, ref_x) and torch.equal(y.as_tensor(), ref_y))
        self.assertNotIsInstance(x, MetaTensor)
        self.assertIsInstance(y, MetaTensor)
        self.assertEqual((x.dtype, y.dtype), (torch.float32, torch.int64))
        self.assertTrue(torch.equal(y.meta["class_weights"], w))

    def test_augmented_channels_last(self):
        image, label = boxes(batch=2)
        t = aug(seed=4)
        prep = CascadeBatchPreparer(t, patch_size=PATCH, output_size=OUT, channels_last=True)
        x, y = prep({"image": image, "label": label}, "cpu")
        self.assertEqual((tuple(x.shape), tuple(y.shape)), ((2, 1, *PATCH), (2, 1, *OUT)))
        self.assertTrue(x.is_contiguous(memory_format=torch.channels_last_3d))
        self.assertNotIn("class_weights", y.meta)
        ref = aug(seed=4)(image, label)
        self.assertTrue(torch.equal(x, ref[0]) and torch.equal(y.as_tensor(), ref[1]))

    def test_errors(self):
        with self.assertRaises(ValueError):
            CascadeBatchPreparer(aug(), patch_size=(132, 132, 116))
        prep = CascadeBatchPreparer(None, patch_size=PATCH, output_size=OUT)
        with self.assertRaises(KeyError):
            prep({"image": torch.zeros(1, 1, 20, 20, 20)}, "cpu")
        with self.assertRaises(TypeError):
            prep([torch.zeros(1, 1, 20, 20, 20)], "cpu")

    def test_supervised_trainer_runs_with_preparer(self):
        from monai.engines import SupervisedTrainer

        class CropNet(torch.nn.Module):  # a 1x1x1 conv, cropped like a valid U-Net (margin 8 here)
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv3d(1, 8, 1)

            def forward(self, x):
                return self.conv(x)[:, :, 8:-8, 8:-8, 8:-8]

        seen = {}

        def loss(pred, target):
            seen["weights"] = target.meta["class_weights"]
            return torch.nn.functional.cross_entropy(pred, target.as_tensor()[:, 0], ignore_index=255)

        image, label = boxes(batch=2)
        data = [{"image": image[i], "label": label[i], "class_weights": torch.full((8,), 0.5)} for i in range(2)]
        net = CropNet()
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=1,
            train_data_loader=torch.utils.data.DataLoader(data, batch_size=2),
            network=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            loss_function=loss,
            prepare_batch=CascadeBatchPreparer(aug(), patch_size=PATCH, output_size=OUT),
            decollate=False,
        )
        trainer.run()
        self.assertTrue(math.isfinite(trainer.state.output["loss"].item()))
        self.assertEqual(tuple(seen["weights"].shape), (2, 8))

    def test_sampler_to_network_patch_geometry(self):
        """Sampler box -> preparer: the drawn candidate voxel is the centre voxel of the label patch."""
        shape, voxel = (40, 30, 25), (2, 27, 12)
        image = MetaTensor(torch.arange(np.prod(shape), dtype=torch.float32).reshape(1, *shape))
        label = MetaTensor((torch.arange(np.prod(shape)) % 5).to(torch.uint8).reshape(1, *shape))
        c1 = torch.zeros(1, *shape, dtype=torch.bool)
        c1[(0, *voxel)] = True
        a = (3, 2, 1)
        crop = RandCandidateCropd(patch_size=(100, 100, 92), aug_margin=a, num_samples=2, image_pad_value=-1)
        samples = crop.set_random_state(0)({"image": image, "label": label, "c1": c1})
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("image", "label")}
        for augment in (None, RandElasticRigid3D(patch_size=(100, 100, 92), seed=0, enabled=False)):
            x, y = CascadeBatchPreparer(augment, patch_size=(100, 100, 92))(batch, "cpu")
            self.assertEqual((tuple(x.shape), tuple(y.shape)), ((2, 1, 100, 100, 92), (2, 1, 12, 12, 4)))
            flat = int(np.ravel_multi_index(voxel, shape))
            self.assertTrue(bool((y[:, 0, 6, 6, 2] == flat % 5).all()))
            self.assertTrue(bool((x[:, 0, 44 + 6, 44 + 6, 44 + 2] == flat).all()))
        # resampled with the identity: the same voxel, up to float rounding in the image
        t = RandElasticRigid3D(patch_size=(100, 100, 92), seed=0)
        xi, yi = t.apply(batch["image"].as_tensor(), batch["label"].as_tensor(), AugmentParams.identity(2))
        self.assertTrue(bool((yi[:, 0, 6, 6, 2] == flat % 5).all()))
        torch.testing.assert_close(xi[:, 0, 50, 50, 46], torch.full((2,), float(flat)), atol=0.05, rtol=0)


@pytest.mark.gpu
class TestCuda(unittest.TestCase):
    def test_cuda_matches_cpu(self):
        t_cpu, t_gpu = RandElasticRigid3D(seed=0), RandElasticRigid3D(seed=0)
        m = t_cpu.required_margin()
        box = [p + 2 * a for p, a in zip(t_cpu.patch_size, m, strict=True)]
        image = torch.randn(2, 1, *box)
        label = torch.randint(0, 8, (2, 1, *box), dtype=torch.uint8)
        x_cpu, y_cpu = t_cpu(image, label)
        x_gpu, y_gpu = t_gpu(image.cuda(), label.cuda())
        torch.testing.assert_close(x_gpu.cpu(), x_cpu, atol=1e-3, rtol=0)
        self.assertGreater(float((y_gpu.cpu() == y_cpu).float().mean()), 0.999)  # nearest ties may differ
        prep = CascadeBatchPreparer(t_gpu, channels_last=True)
        x, y = prep({"image": image, "label": label, "class_weights": torch.ones(2, 8)}, torch.device("cuda"))
        self.assertEqual((x.device.type, y.device.type, y.meta["class_weights"].device.type), ("cuda",) * 3)


if __name__ == "__main__":
    unittest.main()
