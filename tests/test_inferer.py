"""ValidTiledInferer: aligned tiling equals one whole-volume pass; paper tiles are the network on their crops; masks;
metadata; the folded copy. The plan itself is tested in test_tiling.py, the tile choice in test_tile_choice.py.

Kaiming-initialised narrow networks (features=4) with random BatchNorm statistics, float32 (amp=False) unless stated.
"""

from __future__ import annotations

import unittest

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.transforms import Compose, EnsureTyped, Invertd, Zoomd
from parameterized import parameterized

from custom.inferer import ValidTiledInferer
from custom.network import ValidUNet3D, valid_input_size_for_output
from tests.test_network import randomize_bn

K = 3


def make_net(seed: int = 0) -> ValidUNet3D:
    torch.manual_seed(seed)
    return randomize_bn(ValidUNet3D(out_channels=K, features=4), seed).eval()


NET = make_net()


def one_pass(net, x, shift=(0, 0, 0), pad_value=0.0, padding_mode="constant", activation="softmax") -> torch.Tensor:
    """The definition aligned tiling must reproduce: pad by 44 (+ shift) and to a valid size, run once, crop."""
    size = x.shape[2:]
    pads = []
    for n, s in zip(size, shift, strict=True):
        total = valid_input_size_for_output(n + s)
        pads.append((44 + s, total - n - 44 - s))
    flat = (pads[2][0], pads[2][1], pads[1][0], pads[1][1], pads[0][0], pads[0][1])
    if padding_mode == "constant":
        p = F.pad(x, flat, mode="constant", value=pad_value)
    else:
        p = F.pad(x, flat, mode="replicate")
    with torch.no_grad():
        y = net(p)
    if activation == "softmax":
        y = torch.softmax(y, 1)
    s0, s1, s2 = shift
    return y[:, :, s0 : s0 + size[0], s1 : s1 + size[1], s2 : s2 + size[2]]


# spatial size, output tile size, extra inferer arguments, expected tiles run
ALIGNED_CASES = [
    ((20, 13, 9), (12, 12, 12), {"pad_value": -1.0}, 4),  # 2 x 2 x 1 tiles, odd sizes
    ((5, 9, 3), (44, 44, 28), {}, 1),  # volume smaller than one tile
    ((27, 11, 6), (20, 12, 4), {"padding_mode": "replicate", "sw_batch_size": 2}, 2),  # tile z 4 -> 12 (stride >= 8)
    ((21, 12, 10), (13, 100, 100), {"fold_bn": False, "channels_last": False, "activation": "none"}, 3),
]


class TestAlignedTiling(unittest.TestCase):
    @parameterized.expand(ALIGNED_CASES)
    def test_equals_one_pass(self, size, tile, kwargs, tiles):
        x = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(1))
        inferer = ValidTiledInferer(tile_size=tile, amp=False, **kwargs)
        got = inferer(x, NET)
        ref = one_pass(
            NET,
            x,
            pad_value=kwargs.get("pad_value", 0.0),
            padding_mode=kwargs.get("padding_mode", "constant"),
            activation=kwargs.get("activation", "softmax"),
        )
        self.assertEqual(tuple(got.shape), (1, K, *size))
        self.assertEqual(inferer.last_stats["tiles_run"], tiles)
        scale = ref.abs().max().item()
        err = (got.as_tensor() - ref).abs().max().item()
        self.assertLess(err, 1e-5 * max(scale, 1.0), f"max abs difference {err} (scale {scale})")

    def test_overlap_averages_phase_shifted_passes(self):
        x = torch.randn(1, 1, 6, 5, 7, generator=torch.Generator().manual_seed(2))
        inferer = ValidTiledInferer(overlap=2, amp=False)
        got = inferer(x, NET)
        ref0, ref4 = one_pass(NET, x), one_pass(NET, x, shift=(4, 4, 4))
        torch.testing.assert_close(got.as_tensor(), (ref0 + ref4) / 2, rtol=1e-5, atol=1e-6)
        self.assertGreater((ref0 - ref4).abs().max().item(), 1e-3)  # the two phases really differ
        self.assertEqual((inferer.last_stats["passes"], inferer.last_stats["tiles_run"]), (2, 2))


class TestPaperTiling(unittest.TestCase):
    def test_tiles_equal_net_on_crop(self):
        """Each paper tile is the network on its own 88-voxel-larger crop; the tiling does not equal one pass."""
        x = torch.randn(1, 1, 24, 10, 4, generator=torch.Generator().manual_seed(3))
        inferer = ValidTiledInferer(mode="paper", tile_size=(12, 12, 4), amp=False, pad_value=0.5)
        got = inferer(x, NET).as_tensor()
        self.assertEqual(inferer.last_stats["tiles_run"], 2)
        padded = F.pad(x, (44, 44, 44, 46, 44, 44), value=0.5)  # tiles: x 0..12 and 12..24, y 0..12, z 0..4
        for x0 in (0, 12):
            with torch.no_grad():
                tile = torch.softmax(NET(padded[:, :, x0 : x0 + 100, :100, :92]), 1)
            torch.testing.assert_close(got[:, :, x0 : x0 + 12], tile[:, :, :, :10, :4], rtol=1e-5, atol=1e-6)
        aligned = one_pass(NET, x, pad_value=0.5)
        torch.testing.assert_close(got[:, :, :12], aligned[:, :, :12], rtol=1e-5, atol=1e-6)  # offset 0: aligned
        self.assertGreater((got[:, :, 12:] - aligned[:, :, 12:]).abs().max().item(), 1e-3)  # offset 12: other phase


class TestMasksMetaAndState(unittest.TestCase):
    def test_mask_skips_tiles_and_sets_background(self):
        size = (20, 13, 9)
        x = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(4))
        mask = torch.zeros(1, 1, *size, dtype=torch.bool)
        mask[0, 0, 2:7, 3:8, 1:5] = True  # inside the first of 2 x 2 x 1 tiles
        inferer = ValidTiledInferer(tile_size=(12, 12, 12), amp=False)
        got = inferer(x, NET, mask=mask).as_tensor()
        ref = one_pass(NET, x)
        st = inferer.last_stats
        self.assertEqual((st["tiles_run"], st["tiles_skipped"]), (1, 3))
        self.assertAlmostEqual(st["candidate_fraction"], float(mask.float().mean()))
        m = mask.expand_as(got)
        torch.testing.assert_close(got[m], ref[m], rtol=1e-5, atol=1e-6)
        outside = got.permute(0, 2, 3, 4, 1)[~mask[:, 0]]
        torch.testing.assert_close(outside, torch.tensor([1.0, 0.0, 0.0]).expand_as(outside))

    def test_empty_mask_runs_nothing(self):
        calls = []
        net = make_net()
        net.register_forward_hook(lambda *a: calls.append(1))
        inferer = ValidTiledInferer(tile_size=(12, 12, 12), amp=False)
        got = inferer(torch.randn(2, 1, 30, 20, 10), net, mask=torch.zeros(2, 1, 30, 20, 10))
        self.assertEqual(calls, [])
        self.assertEqual(tuple(got.shape), (2, K, 30, 20, 10))
        self.assertEqual(inferer.last_stats["tiles_run"], 0)
        self.assertEqual(inferer.last_stats["candidate_fraction"], 0.0)
        self.assertTrue(bool((got[:, 0] == 1).all()) and bool((got[:, 1:] == 0).all()))

    def test_mask_from_last_channel(self):
        x = torch.randn(1, 1, 6, 5, 7, generator=torch.Generator().manual_seed(8))
        mask = torch.zeros(1, 1, 6, 5, 7)
        mask[..., 1:4, 1:3, 2:5] = 1
        inferer = ValidTiledInferer(amp=False, mask_from_last_channel=True)
        got = inferer(torch.cat([x, mask], 1), NET).as_tensor()
        ref = ValidTiledInferer(amp=False)(x, NET, mask=mask).as_tensor()
        torch.testing.assert_close(got, ref)
        self.assertAlmostEqual(inferer.last_stats["candidate_fraction"], float(mask.mean()))
        with self.assertRaisesRegex(ValueError, "mask_from_last_channel"):
            inferer(x, NET)

    def test_metatensor_state_and_stats(self):
        net = make_net(5)
        net.train()
        bn_mean = net.enc1a.norm.running_mean.clone()
        affine = torch.diag(torch.tensor([-2.0, 2.0, 3.0, 1.0]))
        affine[:3, 3] = torch.tensor([10.0, -5.0, 7.0])
        x = MetaTensor(torch.randn(1, 1, 7, 6, 5), affine=affine, meta={"filename_or_obj": "case_01.nii.gz"})
        x.push_applied_operation({"class": "Zoomd", "orig_size": (14, 12, 10)})
        inferer = ValidTiledInferer(amp=False)
        got = inferer(x, net)
        self.assertIsInstance(got, MetaTensor)
        np.testing.assert_allclose(got.affine.numpy(), affine.numpy())
        self.assertEqual(got.meta["filename_or_obj"], "case_01.nii.gz")
        self.assertEqual(len(got.applied_operations), 1)
        self.assertTrue(net.training, "train/eval mode must be restored")
        torch.testing.assert_close(net.enc1a.norm.running_mean, bn_mean)  # ran in eval: statistics untouched
        st = inferer.last_stats
        for key in ("tiles_run", "tiles_skipped", "candidate_fraction", "seconds", "mode", "tile_size", "flops"):
            self.assertIn(key, st)
        self.assertEqual(st["flops"], net.flops([t + 88 for t in st["tile_size"]]) * st["tiles_run"])
        self.assertEqual(st["mode"], "aligned")
        torch.testing.assert_close(got.as_tensor().sum(1), torch.ones(1, 7, 6, 5))  # probabilities

    def test_invertd_restores_input_geometry(self):
        """Batched MetaTensor in, Invertd of the downsampling out: the original shape and affine come back."""
        affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
        img = MetaTensor(torch.randn(1, 14, 12, 10), affine=affine, meta={"filename_or_obj": "a.nii.gz"})
        pre = Compose([EnsureTyped(keys="image"), Zoomd(keys="image", zoom=0.5, keep_size=False)])
        batch = list_data_collate([pre({"image": img})])
        pred = ValidTiledInferer(amp=False)(batch["image"], NET)
        self.assertTrue(pred.is_batch)
        item = decollate_batch({"image": batch["image"], "pred": pred})[0]
        out = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(item)["pred"]
        self.assertEqual(tuple(out.shape), (K, 14, 12, 10))
        np.testing.assert_allclose(out.affine.numpy(), affine.numpy())

    def test_bf16_close_to_fp32(self):
        x = torch.randn(1, 1, 9, 8, 7, generator=torch.Generator().manual_seed(6))
        fp32 = ValidTiledInferer(amp=False)(x, NET).as_tensor()
        inferer = ValidTiledInferer(amp=True)
        bf16 = inferer(x, NET).as_tensor()
        self.assertEqual(inferer.last_stats["dtype"], "bfloat16")
        self.assertLess((bf16 - fp32).abs().max().item(), 0.05)
        self.assertGreater((bf16 - fp32).abs().max().item(), 0.0)  # really ran in lower precision

    def test_folded_copy_cached_and_refreshed(self):
        net = make_net(7)
        inferer = ValidTiledInferer(amp=False)
        first, _, _ = inferer._compute_net(net, torch.device("cpu"))
        again, _, _ = inferer._compute_net(net, torch.device("cpu"))
        self.assertIs(first, again)
        with torch.no_grad():
            net.head.conv.bias.add_(1.0)  # an optimiser step or load_state_dict changes the state in place
        fresh, _, _ = inferer._compute_net(net, torch.device("cpu"))
        self.assertIsNot(fresh, first)
        torch.testing.assert_close(fresh.head.conv.bias, net.head.conv.bias)


@pytest.mark.gpu
class TestCuda(unittest.TestCase):
    def test_cuda_matches_one_pass_and_bf16_close(self):
        torch.backends.cudnn.allow_tf32 = False
        net = make_net().cuda()
        x = torch.randn(1, 1, 30, 25, 17, generator=torch.Generator().manual_seed(9))
        ref = one_pass(NET, x)
        got = ValidTiledInferer(tile_size=(20, 20, 12), amp=False, output_device="cpu")(x.cuda(), net)
        self.assertEqual(got.device.type, "cpu")
        torch.testing.assert_close(got.as_tensor(), ref, rtol=1e-4, atol=1e-5)
        inferer = ValidTiledInferer(amp=True)
        bf16 = inferer(x.cuda(), net, mask=torch.ones(1, 1, 30, 25, 17, device="cuda"))
        self.assertEqual(bf16.device.type, "cuda")
        self.assertEqual(inferer.last_stats["dtype"], "bfloat16")
        self.assertLess((bf16.as_tensor().cpu() - ref).abs().max().item(), 0.05)


class TestErrors(unittest.TestCase):
    @parameterized.expand(
        [
            ({"mode": "sliding"},),
            ({"overlap": 3},),
            ({"padding_mode": "reflect"},),
            ({"activation": "argmax"},),
            ({"mode": "paper", "tile_size": (45, 44, 28)},),
            ({"tile_size": (44, 44)},),
            ({"sw_batch_size": 0},),
        ]
    )
    def test_bad_arguments(self, kwargs):
        with self.assertRaises(ValueError):
            ValidTiledInferer(**kwargs)

    def test_bad_inputs(self):
        inferer = ValidTiledInferer(amp=False)
        with self.assertRaisesRegex(ValueError, "B, C, X, Y, Z"):
            inferer(torch.zeros(1, 10, 10, 10), NET)
        with self.assertRaisesRegex(ValueError, "mask"):
            inferer(torch.zeros(1, 1, 10, 10, 10), NET, mask=torch.ones(1, 1, 10, 10, 9))
        with self.assertRaisesRegex(ValueError, "margin"):
            ValidTiledInferer(margin=40)(torch.zeros(1, 1, 10, 10, 10), NET)


if __name__ == "__main__":
    unittest.main()
