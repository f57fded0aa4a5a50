"""The valid-convolution 3D U-Net of the paper (Cicek et al. 2016, as used by Roth et al. 2018) and its size arithmetic.

Every 3x3x3 convolution is *valid* (unpadded), so the output is smaller than the input by a fixed margin of 44 voxels
per side, and each output voxel sees only real image content (no zero padding inside the network). Three 2x2x2
max-poolings make two constraints that the rest of the bundle relies on:

- only inputs of size ``n = 8 b + 60`` (92, 100, ..., 132, ...) per axis are *valid*: every pooling then sees an even
  size. Any other size would be floored silently by the pooling and the skip connections would be cropped off-centre,
  so :meth:`ValidUNet3D.forward` rejects it, naming the nearest valid sizes;
- the network is shift-equivariant only for shifts that are multiples of 8 (:data:`ALIGN`). Tiles whose offsets are
  multiples of 8 reproduce one whole-volume pass exactly (see :mod:`custom.inferer`).

Output size = input size - 88 (:data:`MARGIN` = 44 per side): the paper's 132x132x116 input gives 44x44x28.

Two layer layouts are offered (``layout``), because the paper and the authors' Caffe code differ:

- ``"cicek"`` (default): biased convolutions, each 3x3x3 convolution followed by BatchNorm + ReLU, the 2x2x2 up-
  convolution linear (biased, no norm), as in Cicek et al.'s text. 19,074,120 parameters at the paper's widths, K = 8.
- ``"prototxt"``: the authors' released prototxt: only the first convolution has a bias, BatchNorm (+ Scale) + ReLU
  after every convolution *and* every up-convolution, unbiased up-convolutions. 19,072,712 parameters at K = 8.

Example:

>>> net = ValidUNet3D(in_channels=1, out_channels=3, features=4)
>>> net(torch.zeros(1, 1, 92, 92, 100)).shape
torch.Size([1, 3, 4, 4, 12])
>>> nearest_valid_sizes(128), valid_input_size_for_output(44), output_size(132)
((124, 132), 132, 44)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = [
    "ALIGN",
    "MARGIN",
    "MIN_INPUT",
    "MIN_OUTPUT",
    "ValidUNet3D",
    "fold_batchnorm",
    "forward_flops",
    "is_valid_size",
    "nearest_valid_sizes",
    "output_size",
    "valid_input_size_for_output",
]

#: Voxels lost per side by the valid convolutions: output = input - 2 * MARGIN.
MARGIN = 44
#: Shift-equivariance period (2 ** number of poolings); valid input sizes are MIN_INPUT + ALIGN * k.
ALIGN = 8
#: Smallest valid input size per axis (the bottleneck must keep >= 4 voxels so the decoder stays positive).
MIN_INPUT = 92
#: Output size of the smallest valid input.
MIN_OUTPUT = MIN_INPUT - 2 * MARGIN

_AXES = ("x", "y", "z")


def is_valid_size(n: int, min_input: int = MIN_INPUT, align: int = ALIGN) -> bool:
    """Whether ``n`` (one spatial axis of the input) is ``8 b + 60`` with ``n >= 92``."""
    return n >= min_input and (n - min_input) % align == 0


def nearest_valid_sizes(n: int, min_input: int = MIN_INPUT, align: int = ALIGN) -> tuple[int, int]:
    """The valid input sizes just below and just above ``n`` (both ``n`` when it is valid, both 92 below 92)."""
    if n <= min_input:
        return min_input, min_input
    lo = min_input + ((n - min_input) // align) * align
    hi = lo if lo == n else lo + align
    return lo, hi


def output_size(n: int) -> int:
    """Output size of a valid input size ``n`` (``n - 88``); raises ``ValueError`` for an invalid size."""
    if not is_valid_size(n):
        lo, hi = nearest_valid_sizes(n)
        raise ValueError(f"input size {n} is not valid (8 b + 60 >= {MIN_INPUT}); nearest valid sizes: {lo}, {hi}")
    return n - 2 * MARGIN


def valid_input_size_for_output(m: int) -> int:
    """Smallest valid input size whose output covers at least ``m`` voxels (e.g. 44 -> 132, 28 -> 116)."""
    need = max(int(m) + 2 * MARGIN, MIN_INPUT)
    return MIN_INPUT + math.ceil((need - MIN_INPUT) / ALIGN) * ALIGN


def _check_valid_input(x: torch.Tensor) -> None:
    """TorchScript-compatible size check of a (B, C, X, Y, Z) input (skipped while tracing: sizes are constants)."""
    if torch.jit.is_tracing():
        return
    if x.dim() != 5:
        raise ValueError(f"ValidUNet3D expects a 5D (B, C, X, Y, Z) input, got {x.dim()} dimensions")
    for i in range(3):
        n = x.shape[i + 2]
        axis = "x" if i == 0 else ("y" if i == 1 else "z")
        if not is_valid_size(n):
            lo, hi = nearest_valid_sizes(n)
            raise ValueError(
                f"ValidUNet3D: spatial size {n} on axis {axis} (dim {i + 2}) is not a valid input size "
                f"(8 b + 60 >= 92); nearest valid sizes: {lo} and {hi}"
            )


def _center_crop(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Crop the spatial centre of ``x`` to the spatial size of ``ref`` (the crop-and-concat skip)."""
    d0 = (x.shape[2] - ref.shape[2]) // 2
    d1 = (x.shape[3] - ref.shape[3]) // 2
    d2 = (x.shape[4] - ref.shape[4]) // 2
    return x[:, :, d0 : d0 + ref.shape[2], d1 : d1 + ref.shape[3], d2 : d2 + ref.shape[4]]


def _crop(x: torch.Tensor, offset: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """The spatial box of ``x`` at ``offset`` of ``size``."""
    o, n = offset, size
    return x[:, :, o[0] : o[0] + n[0], o[1] : o[1] + n[1], o[2] : o[2] + n[2]]


class _ConvBlock(nn.Module):
    """Convolution (3x3x3 valid, 1x1x1, or 2x2x2 stride-2 transposed) -> optional BatchNorm -> optional ReLU."""

    def __init__(
        self, cin: int, cout: int, kind: str = "conv3", bias: bool = True, norm: bool = True, act: bool = True
    ):
        super().__init__()
        if kind == "conv3":
            self.conv = nn.Conv3d(cin, cout, kernel_size=3, padding=0, bias=bias)
        elif kind == "conv1":
            self.conv = nn.Conv3d(cin, cout, kernel_size=1, bias=bias)
        elif kind == "up":
            self.conv = nn.ConvTranspose3d(cin, cout, kernel_size=2, stride=2, bias=bias)
        else:
            raise ValueError(f"unknown block kind {kind!r}")
        self.norm = nn.BatchNorm3d(cout) if norm else nn.Identity()
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ValidUNet3D(nn.Module):
    """3D U-Net with valid convolutions: 4 levels, widths (f, 2f), (2f, 4f), (4f, 8f), (8f, 16f), crop-and-concat skips.

    Args:
        in_channels: image channels.
        out_channels: classes K including background (the paper's 7 organs: 8).
        features: width f of the first convolution (paper: 32).
        norm: ``"batch"`` (BatchNorm after each convolution, the paper) or ``"none"`` (then every convolution is
            biased). Instance or group norm are not offered: their statistics depend on the tile, which would break
            the exact equivalence of tiled and whole-volume inference.
        layout: ``"cicek"`` (default) or ``"prototxt"`` (the authors' Caffe layout); see the module docstring.

    The input must be ``8 b + 60`` voxels (>= 92) on every spatial axis; the output is 88 voxels smaller per axis and
    aligned with the input's centre (``margin`` = 44 per side). ``align`` (8) is the shift-equivariance period.

    >>> net = ValidUNet3D(features=32)
    >>> sum(p.numel() for p in net.parameters())
    19074120
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 8,
        features: int = 32,
        norm: str = "batch",
        layout: str = "cicek",
    ):
        super().__init__()
        if norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
        if layout not in ("cicek", "prototxt"):
            raise ValueError(f"layout must be 'cicek' or 'prototxt', got {layout!r}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.features = int(features)
        self.norm_type = norm
        self.layout = layout
        self.margin = MARGIN
        self.align = ALIGN
        f = self.features
        bn = norm == "batch"
        proto = layout == "prototxt"
        cbias = not (bn and proto)  # the prototxt drops the bias of convolutions followed by BatchNorm
        up_norm = proto  # the prototxt follows each up-convolution with BatchNorm + Scale + ReLU

        def conv(cin: int, cout: int, bias: bool = cbias) -> _ConvBlock:
            return _ConvBlock(cin, cout, "conv3", bias=bias, norm=bn)

        def up(c: int) -> _ConvBlock:
            return _ConvBlock(c, c, "up", bias=not (bn and up_norm), norm=bn and up_norm, act=up_norm)

        self.enc1a, self.enc1b = conv(in_channels, f, bias=True), conv(f, 2 * f)
        self.enc2a, self.enc2b = conv(2 * f, 2 * f), conv(2 * f, 4 * f)
        self.enc3a, self.enc3b = conv(4 * f, 4 * f), conv(4 * f, 8 * f)
        self.enc4a, self.enc4b = conv(8 * f, 8 * f), conv(8 * f, 16 * f)
        self.up3 = up(16 * f)
        self.dec3a, self.dec3b = conv(24 * f, 8 * f), conv(8 * f, 8 * f)
        self.up2 = up(8 * f)
        self.dec2a, self.dec2b = conv(12 * f, 4 * f), conv(4 * f, 4 * f)
        self.up1 = up(4 * f)
        self.dec1a, self.dec1b = conv(6 * f, 2 * f), conv(2 * f, 2 * f)
        self.head = _ConvBlock(2 * f, out_channels, "conv1", bias=True, norm=False, act=False)
        for m in self.modules():  # He (MSRA) initialisation, as the authors' prototxt
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_valid_input(x)
        s1, s2, s3 = self._encode(x)
        return self._decode(s1, s2, s3)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder levels 1-3: the three skips (before the first, second and third pooling)."""
        s1 = self.enc1b(self.enc1a(x))
        s2 = self.enc2b(self.enc2a(F.max_pool3d(s1, 2)))
        s3 = self.enc3b(self.enc3a(F.max_pool3d(s2, 2)))
        return s1, s2, s3

    def _decode(self, s1: torch.Tensor, s2: torch.Tensor, s3: torch.Tensor) -> torch.Tensor:
        """The third pooling, the bottleneck and the decoder (crop-and-concat of the skips), then the head."""
        u = self.enc4b(self.enc4a(F.max_pool3d(s3, 2)))
        u = self.up3(u)
        u = self.dec3b(self.dec3a(torch.cat([u, _center_crop(s3, u)], dim=1)))
        u = self.up2(u)
        u = self.dec2b(self.dec2a(torch.cat([u, _center_crop(s2, u)], dim=1)))
        u = self.up1(u)
        u = self.dec1b(self.dec1a(torch.cat([u, _center_crop(s1, u)], dim=1)))
        return self.head(u)

    def phase_shared_forward(
        self, x: torch.Tensor, offsets: Sequence[Sequence[int]], in_size: Sequence[int]
    ) -> list[torch.Tensor]:
        """Logits of the ``in_size`` tiles of ``x`` at ``offsets`` (each 0 or 4 per axis), sharing encoder levels 1-3.

        Valid convolutions commute with cropping, and an offset of 4 is a multiple of the first two pooling windows'
        period (2 at level 1, 4 in input voxels at level 2), so the features of levels 1-3 of every tile are crops of
        those of ``x``; the third pooling (period 8) differs between offsets 0 and 4 and runs per tile, with the
        bottleneck and the decoder. Equals ``[self(crop) for crop in tiles]`` (same modules, same order of operations
        per tile). The tiled inferer runs its pooling-phase passes (``overlap``) this way.

        >>> net = ValidUNet3D(out_channels=2, features=2).eval()
        >>> x = torch.randn(1, 1, 104, 100, 100)
        >>> a, b = net.phase_shared_forward(x, [(0, 0, 0), (4, 0, 0)], (100, 100, 100))
        >>> torch.allclose(a, net(x[..., :100, :, :]), atol=1e-5), torch.allclose(b, net(x[..., 4:, :, :]), atol=1e-5)
        (True, True)
        """
        for d in offsets:
            if any(int(o) % 4 for o in d):
                raise ValueError(f"tile offsets must be multiples of 4 (a quarter of the pooling period 8), got {d}")
        s1, s2, s3 = self._encode(x)
        l1 = [int(n) - 4 for n in in_size]
        l2 = [n // 2 - 4 for n in l1]
        l3 = [n // 2 - 4 for n in l2]
        outs = []
        for d in offsets:
            o = [int(v) for v in d]
            c1 = _crop(s1, o, l1)
            c2 = _crop(s2, [v // 2 for v in o], l2)
            c3 = _crop(s3, [v // 4 for v in o], l3)
            outs.append(self._decode(c1, c2, c3))
        return outs

    def flops(self, spatial_size: Sequence[int]) -> int:
        """Forward FLOPs (2 x multiply-adds of the convolutions) for one input of ``spatial_size``."""
        return forward_flops(spatial_size, self.in_channels, self.out_channels, self.features)


def forward_flops(spatial_size: Sequence[int], in_channels: int = 1, out_channels: int = 8, features: int = 32) -> int:
    """Analytic forward FLOPs (2 x MACs of conv and up-conv; norm, ReLU, pooling ignored) for one valid input.

    >>> round(forward_flops((132, 132, 116)) / 1e9, 1)  # the paper's tile
    526.8
    """
    n = [int(s) for s in spatial_size]
    for i, s in enumerate(n):
        if not is_valid_size(s):
            lo, hi = nearest_valid_sizes(s)
            raise ValueError(f"spatial size {s} on axis {_AXES[i]} is not valid; nearest valid sizes: {lo} and {hi}")
    f = features
    total = 0

    def conv3(cin: int, cout: int, size: list[int]) -> list[int]:
        nonlocal total
        size = [s - 2 for s in size]
        total += 2 * 27 * cin * cout * math.prod(size)
        return size

    def upconv(c: int, size: list[int]) -> list[int]:
        nonlocal total
        size = [2 * s for s in size]
        total += 2 * c * c * math.prod(size)  # each output voxel gets exactly one of the 2x2x2 taps
        return size

    s1 = conv3(f, 2 * f, conv3(in_channels, f, n))
    s2 = conv3(2 * f, 4 * f, conv3(2 * f, 2 * f, [s // 2 for s in s1]))
    s3 = conv3(4 * f, 8 * f, conv3(4 * f, 4 * f, [s // 2 for s in s2]))
    u = conv3(8 * f, 16 * f, conv3(8 * f, 8 * f, [s // 2 for s in s3]))
    u = conv3(8 * f, 8 * f, conv3(24 * f, 8 * f, upconv(16 * f, u)))
    u = conv3(4 * f, 4 * f, conv3(12 * f, 4 * f, upconv(8 * f, u)))
    u = conv3(2 * f, 2 * f, conv3(6 * f, 2 * f, upconv(4 * f, u)))
    total += 2 * 2 * f * out_channels * math.prod(u)
    return total


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``net`` with every BatchNorm folded into the convolution before it.

    In eval mode BatchNorm is a per-channel affine map ``y = a x + c`` with ``a = gamma / sqrt(var + eps)`` and
    ``c = beta - a mean``; folding it into the preceding (up-)convolution removes one pass over every activation,
    which matters for inference speed (2x on the CPU, 1.25x on an H200 at the paper's widths; REFERENCE.md). The fold
    is torch's ``fuse_conv_bn_weights`` computed in float64, so it is exact up to the final rounding. ``net`` itself is
    not modified.

    >>> net = ValidUNet3D(features=4).eval()
    >>> x = torch.randn(1, 1, 92, 92, 92)
    >>> bool(torch.allclose(fold_batchnorm(net)(x), net(x), atol=1e-4))
    True
    """
    folded = copy.deepcopy(net).eval()
    for block in folded.modules():
        if not isinstance(block, _ConvBlock) or not isinstance(block.norm, nn.modules.batchnorm._BatchNorm):
            continue
        bn, conv = block.norm, block.conv
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
        with torch.no_grad():
            w, b = fuse_conv_bn_weights(
                _f64(conv.weight),
                _f64(conv.bias),
                _f64(bn.running_mean),
                _f64(bn.running_var),
                bn.eps,
                _f64(bn.weight),
                _f64(bn.bias),
                transpose=isinstance(conv, nn.ConvTranspose3d),  # ConvTranspose3d weights are (in, out, k, k, k)
            )
        conv.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)
        block.norm = nn.Identity()
    return folded


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()
