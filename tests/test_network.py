"""ValidUNet3D: parameter count, size arithmetic and its errors, shift equivariance, BatchNorm folding, TorchScript."""

from __future__ import annotations

import itertools
import math
import unittest

import torch
from monai.networks.utils import convert_to_torchscript
from parameterized import parameterized
from torch import nn

from custom.network import (
    ALIGN,
    MARGIN,
    ValidUNet3D,
    fold_batchnorm,
    forward_flops,
    is_valid_size,
    nearest_valid_sizes,
    output_size,
    valid_input_size_for_output,
)


def randomize_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (defaults hide folding errors)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
    return net


# layout, features, out_channels, expected parameters
PARAM_CASES = [
    ("cicek", 32, 8, 19_074_120),  # REFERENCE.md section 2
    ("cicek", 32, 3, 19_074_120 - 5 * 64 - 5),  # head: 64 inputs x 5 fewer classes, 5 fewer biases
    ("prototxt", 32, 8, 19_072_712),  # no conv biases but the first; BN (+Scale) on each up-convolution
]

# size, valid, nearest valid sizes (below, above)
SIZE_CASES = [
    (92, True, (92, 92)),
    (100, True, (100, 100)),
    (132, True, (132, 132)),
    (116, True, (116, 116)),
    (128, False, (124, 132)),
    (93, False, (92, 100)),
    (60, False, (92, 92)),
    (4, False, (92, 92)),
    (99, False, (92, 100)),
]

# input shape, axis named in the error, nearest valid sizes named
INVALID_CASES = [
    ((1, 1, 93, 92, 92), "axis x", "92 and 100"),
    ((1, 1, 92, 129, 92), "axis y", "124 and 132"),
    ((1, 1, 92, 92, 60), "axis z", "92 and 92"),
]


class TestValidUNet3D(unittest.TestCase):
    @parameterized.expand(PARAM_CASES)
    def test_parameter_count(self, layout, features, k, expected):
        net = ValidUNet3D(in_channels=1, out_channels=k, features=features, layout=layout)
        self.assertEqual(sum(p.numel() for p in net.parameters()), expected)

    def test_prototxt_layout_structure(self):
        net = ValidUNet3D(features=4, layout="prototxt")
        self.assertIsInstance(net.up1.norm, nn.BatchNorm3d)
        self.assertIsNone(net.up1.conv.bias)
        self.assertIsNone(net.enc1b.conv.bias)
        self.assertIsNotNone(net.enc1a.conv.bias)
        cicek = ValidUNet3D(features=4)
        self.assertIsInstance(cicek.up1.norm, nn.Identity)
        self.assertIsNotNone(cicek.up1.conv.bias)

    @parameterized.expand(SIZE_CASES)
    def test_size_arithmetic(self, n, valid, nearest):
        self.assertEqual(is_valid_size(n), valid)
        self.assertEqual(nearest_valid_sizes(n), nearest)
        if valid:
            self.assertEqual(output_size(n), n - 2 * MARGIN)
            self.assertEqual((n - 60) % 8, 0)
        else:
            with self.assertRaisesRegex(ValueError, "nearest valid sizes"):
                output_size(n)

    @parameterized.expand([(44, 132), (28, 116), (1, 92), (4, 92), (5, 100), (12, 100), (13, 108), (212, 300)])
    def test_valid_input_size_for_output(self, m, n):
        self.assertEqual(valid_input_size_for_output(m), n)
        self.assertTrue(is_valid_size(n))
        self.assertGreaterEqual(output_size(n), m)

    @parameterized.expand(INVALID_CASES)
    def test_invalid_input_raises(self, shape, axis, nearest):
        net = ValidUNet3D(features=2)
        with self.assertRaises(ValueError) as ctx:
            net(torch.zeros(shape))
        self.assertIn(axis, str(ctx.exception))
        self.assertIn(nearest, str(ctx.exception))

    def test_rejects_non_5d(self):
        with self.assertRaisesRegex(ValueError, "5D"):
            ValidUNet3D(features=2)(torch.zeros(1, 92, 92, 92))

    def test_constructor_errors(self):
        with self.assertRaises(ValueError):
            ValidUNet3D(norm="instance")
        with self.assertRaises(ValueError):
            ValidUNet3D(layout="caffe")

    def test_attributes(self):
        net = ValidUNet3D(in_channels=2, out_channels=5, features=4)
        self.assertEqual((net.margin, net.align, net.out_channels, net.in_channels), (MARGIN, ALIGN, 5, 2))

    def test_shift_equivariance_period(self):
        """Output geometry and the pooling period: a crop shifted by 8 gives the same voxels; a shift of 4 does not."""
        torch.manual_seed(0)
        net = randomize_bn(ValidUNet3D(out_channels=3, features=4)).eval()
        x = torch.randn(1, 1, 100, 92, 92)
        with torch.no_grad():
            full = net(x)  # output 12 x 4 x 4, voxel i <-> input voxel i + 44
            self.assertEqual(tuple(full.shape), (1, 3, 12, 4, 4))
            shifted8 = net(x[:, :, 8:])
            shifted4 = net(x[:, :, 4:96])
        torch.testing.assert_close(shifted8, full[:, :, 8:], rtol=1e-4, atol=1e-5)
        self.assertGreater((shifted4 - full[:, :, 4:8]).abs().max().item(), 1e-3)

    @parameterized.expand([("cicek",), ("prototxt",)])
    def test_fold_batchnorm_exact(self, layout):
        torch.manual_seed(1)
        net = randomize_bn(ValidUNet3D(out_channels=3, features=2, layout=layout)).double()
        net.train()
        folded = fold_batchnorm(net)
        self.assertTrue(net.training, "the original network must not be modified")
        self.assertFalse(folded.training)
        self.assertFalse(any(isinstance(m, nn.BatchNorm3d) for m in folded.modules()))
        self.assertTrue(any(isinstance(m, nn.BatchNorm3d) for m in net.modules()))
        x = torch.randn(1, 1, 92, 92, 92, dtype=torch.float64)
        net.eval()
        with torch.no_grad():
            ref, got = net(x), folded(x)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())

    def test_fold_batchnorm_without_running_stats_raises(self):
        net = ValidUNet3D(features=2)
        net.enc1a.norm = nn.BatchNorm3d(2, track_running_stats=False)
        with self.assertRaisesRegex(ValueError, "running statistics"):
            fold_batchnorm(net)

    @parameterized.expand([("cicek",), ("prototxt",)])
    def test_phase_shared_forward_equals_network_on_each_crop(self, layout):
        torch.manual_seed(0)
        net = randomize_bn(ValidUNet3D(out_channels=3, features=2, layout=layout), 1).eval()
        size = (92, 100, 92)
        x = torch.randn(1, 1, *(n + 4 for n in size))
        offsets = list(itertools.product((0, 4), repeat=3))
        with torch.no_grad():
            got = net.phase_shared_forward(x, offsets, size)
            for d, g in zip(offsets, got, strict=True):
                ref = net(x[:, :, d[0] : d[0] + size[0], d[1] : d[1] + size[1], d[2] : d[2] + size[2]])
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)
            # the two phases of the third pooling really differ
            self.assertGreater((got[0] - got[-1]).abs().max().item(), 1e-3)
        with self.assertRaises(ValueError):
            net.phase_shared_forward(x, [(2, 0, 0)], size)

    def test_torchscript(self):
        torch.manual_seed(2)
        net = randomize_bn(ValidUNet3D(out_channels=3, features=4)).eval()
        scripted = convert_to_torchscript(net)
        x = torch.randn(1, 1, 92, 92, 100)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), net(x))
        self.assertIsInstance(torch.jit.script(fold_batchnorm(net)), torch.jit.ScriptModule)  # folded copy scripts too
        with self.assertRaisesRegex(Exception, "nearest valid sizes: 92 and 100"):
            scripted(torch.zeros(1, 1, 92, 93, 92))

    @parameterized.expand([((132, 132, 116), 526.8e9), ((348, 348, 340), 38.68e12)])
    def test_flops_reference(self, size, expected):
        """REFERENCE.md section 3: the paper tile and the one pass over a 256x256x250 volume."""
        self.assertAlmostEqual(forward_flops(size) / expected, 1.0, delta=1e-3)

    def test_flops_match_hook_count(self):
        """The analytic FLOP count equals 2 x MACs counted from the convolutions actually run."""
        net = ValidUNet3D(in_channels=2, out_channels=3, features=4).eval()
        total = 0

        def hook(mod, inp, out):
            nonlocal total
            k = math.prod(mod.kernel_size)
            if isinstance(mod, nn.ConvTranspose3d):
                total += 2 * inp[0].numel() * mod.out_channels * k
            else:
                total += 2 * out.numel() * mod.in_channels * k

        for m in net.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                m.register_forward_hook(hook)
        with torch.no_grad():
            net(torch.zeros(1, 2, 92, 100, 92))
        self.assertEqual(net.flops((92, 100, 92)), total)


if __name__ == "__main__":
    unittest.main()
