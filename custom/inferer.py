"""Exact, memory-bounded tiled inference for valid-convolution networks (:class:`custom.network.ValidUNet3D`).

MONAI's ``SlidingWindowInferer`` assumes that a network maps a window to an output of the *same* size; a valid-
convolution network returns a window 88 voxels smaller, which MONAI treats as a zoomed window: the geometry comes out
wrong without any error. :class:`ValidTiledInferer` tiles the *output* domain instead: every output tile is predicted
from its input tile grown by the margin (44 voxels per side), and the image borders are padded by that margin, so
every input voxel gets a prediction and the output has the input's spatial size.

Two tilings (details and measured costs in ``bundle/docs/tiling.md``):

- ``mode="aligned"`` (default): output tiles as large as a memory budget allows, with offsets that are multiples of 8
  (the pooling period) from the padded volume's origin. The stitched result then equals one whole-volume pass
  ("pad by 44, plus end padding to a valid size, run once, crop") to float precision, for any tile and volume size,
  and the cost per output voxel approaches that of one pass (paper widths, 256x256x250 volume: 2.4 MFLOP per voxel
  for one pass, 3.2 with the CPU's default 4 GB budget, against 10.4 for the paper's 44x44x28 tiles).
  ``overlap=R`` (1, 2, 4, 8) averages R passes whose tilings are shifted by 4 voxels (half the pooling period) on
  chosen axes: a test-time ensemble over pooling phases. A shift of 4 voxels is a multiple of the first two pooling
  periods (2 and 4), so the R passes differ only from the third pooling on: for a :class:`ValidUNet3D` the encoder
  levels 1-3 (~70 % of the FLOPs) run once per tile on an input 4 voxels larger, and only the bottleneck and decoder
  run once per pass (``share_encoder``): R = 4 costs ~1.9x one pass instead of 4x, with the same result.
- ``mode="paper"``: the paper's fixed 44x44x28 output tiles (132x132x116 inputs), non-overlapping; with ``overlap=R``
  the stride is halved on x (R = 2), x and y (R = 4, the paper's "4x sampling") or x, y and z (R = 8), and the
  probabilities of all tiles covering a voxel are averaged (paper eq. 5). Adjacent tiles see different pooling phases,
  so this mode does not equal a whole-volume pass; it exists to reproduce the paper.

A candidate ``mask`` (stage 1: body mask C1, stage 2: dilated stage-1 foreground C2) skips every tile whose output
region holds no candidate voxel, and sets every voxel outside the mask to background. In aligned mode the tile size is
chosen for the mask (``mask_aware``): the tiling whose *running* tiles cost the least (FLOPs plus a per-tile
overhead). Large tiles pay the 88-voxel halo rarely but skip little; with C2 at ~5-10 % of the voxels smaller tiles
often cost less in total (measured in ``bundle/docs/performance.md``). Any aligned tile gives the same result, so
this changes only the cost.

Out of memory (``torch.OutOfMemoryError``, or a ``RuntimeError`` saying the allocator ran out) in a batch of tiles
is not the end of a case: the call is retried with one tile per forward, then with the stitching buffer on the CPU,
then (aligned mode) with output tiles half as large per axis, each step logged and listed in
``last_stats["oom_fallbacks"]``. Aligned tiling gives the same result for any tile size, so the retried result
equals the one that did not fit; paper mode keeps its tile size (it defines the result) and only uses the first two.

Example (narrow network, CPU, float32):

>>> from custom.network import ValidUNet3D
>>> net = ValidUNet3D(out_channels=3, features=4)
>>> inferer = ValidTiledInferer(tile_size=(20, 20, 20), amp=False)
>>> probs = inferer(torch.rand(1, 1, 30, 25, 17), net)
>>> probs.shape, inferer.last_stats["tiles_run"]
(torch.Size([1, 3, 30, 25, 17]), 4)
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type
from torch import nn

from custom import runtime
from custom.network import ValidUNet3D, _center_crop, fold_batchnorm, forward_flops
from custom.options import as_bool

__all__ = [
    "Precision",
    "ValidTiledInferer",
    "TilePass",
    "encoder_flops",
    "estimate_tile_bytes",
    "is_out_of_memory",
    "max_activation_elements",
    "shared_encoder_forward",
]

logger = logging.getLogger(__name__)

#: The paper's output tile (x, y, z); its input is 132x132x116.
PAPER_TILE = (44, 44, 28)
#: Tiling-origin shifts (voxels, per axis) of the R passes of aligned mode: half the pooling period, balanced so that
#: each axis is shifted in half of the passes.
_ALIGNED_SHIFTS = {
    1: [(0, 0, 0)],
    2: [(0, 0, 0), (1, 1, 1)],
    4: [(0, 0, 0), (1, 1, 0), (1, 0, 1), (0, 1, 1)],
    8: [(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)],
}
#: Axes whose stride is halved in paper mode, by overlap factor (the paper's 4x: x and y).
_PAPER_HALVED = {1: (), 2: (0,), 4: (0, 1), 8: (0, 1, 2)}
_MAX_ELEMENTS = 2**31 - 1  # largest single activation kept below int32 indexing limits of some kernels
#: Mask-aware tile choice: at most this many tiles per axis are considered (smaller tiles never pay for their halo).
_MASKED_MAX_COUNT = 16


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: ``torch.OutOfMemoryError`` (CUDA) or the ``RuntimeError`` /
    ``MemoryError`` of a CPU or other allocator (\"out of memory\", \"can't allocate memory\")."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def max_activation_elements(in_size: Sequence[int], features: int = 32, batch: int = 1) -> int:
    """Elements of the largest single activation of :class:`ValidUNet3D` for an input of ``in_size``.

    Either the first skip (2f channels at ``n - 4``) or the last concatenation (6f channels at ``n - 84``).
    """
    n = [int(s) for s in in_size]
    return batch * max(2 * features * math.prod(s - 4 for s in n), 6 * features * math.prod(max(s - 84, 0) for s in n))


def encoder_flops(in_size: Sequence[int], in_channels: int = 1, features: int = 32) -> int:
    """Forward FLOPs of the encoder levels 1-3 of :class:`ValidUNet3D` (the part the pooling-phase passes share).

    ``in_size`` need not be a valid input size: an input 4 voxels larger than a tile serves the R passes of
    ``overlap`` (see :func:`shared_encoder_forward`).
    """
    f = features
    size = [int(s) for s in in_size]
    total = 0
    for level, (cin, cmid, cout) in enumerate(((in_channels, f, 2 * f), (2 * f, 2 * f, 4 * f), (4 * f, 4 * f, 8 * f))):
        if level:
            size = [s // 2 for s in size]
        for a, b in ((cin, cmid), (cmid, cout)):
            size = [s - 2 for s in size]
            total += 2 * 27 * a * b * math.prod(size)
    return total


def _crop(x: torch.Tensor, offset: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    o, n = offset, size
    return x[:, :, o[0] : o[0] + n[0], o[1] : o[1] + n[1], o[2] : o[2] + n[2]]


def shared_encoder_forward(
    net: ValidUNet3D, x: torch.Tensor, offsets: Sequence[Sequence[int]], in_size: Sequence[int]
) -> list[torch.Tensor]:
    """Logits of the ``in_size`` tiles of ``x`` at ``offsets`` (each 0 or 4 per axis), sharing encoder levels 1-3.

    Valid convolutions commute with cropping, and an offset of 4 is a multiple of the first two pooling windows' period
    (2 at level 1, 4 in input voxels at level 2), so the features of levels 1-3 of every tile are crops of those of
    ``x``; the third pooling (period 8) differs between offsets 0 and 4 and runs per tile, with the bottleneck and the
    decoder. Equals ``[net(crop) for crop in tiles]`` (same modules, same order of operations per tile).

    >>> net = ValidUNet3D(out_channels=2, features=2).eval()
    >>> x = torch.randn(1, 1, 104, 100, 100)
    >>> a, b = shared_encoder_forward(net, x, [(0, 0, 0), (4, 0, 0)], (100, 100, 100))
    >>> torch.allclose(a, net(x[..., :100, :, :]), atol=1e-5), torch.allclose(b, net(x[..., 4:, :, :]), atol=1e-5)
    (True, True)
    """
    if net.align != 8 or net.margin != 44:
        raise ValueError("shared_encoder_forward needs the ValidUNet3D layout (3 poolings, margin 44)")
    for d in offsets:
        if any(int(o) % 4 for o in d):
            raise ValueError(f"tile offsets must be multiples of 4 (a quarter of the pooling period 8), got {d}")
    s1 = net.enc1b(net.enc1a(x))
    s2 = net.enc2b(net.enc2a(F.max_pool3d(s1, 2)))
    s3 = net.enc3b(net.enc3a(F.max_pool3d(s2, 2)))
    l1 = [int(n) - 4 for n in in_size]
    l2 = [n // 2 - 4 for n in l1]
    l3 = [n // 2 - 4 for n in l2]
    outs = []
    for d in offsets:
        c1 = _crop(s1, [int(o) for o in d], l1)
        c2 = _crop(s2, [int(o) // 2 for o in d], l2)
        c3 = _crop(s3, [int(o) // 4 for o in d], l3)
        u = net.up3(net.enc4b(net.enc4a(F.max_pool3d(c3, 2))))
        u = net.dec3b(net.dec3a(torch.cat([u, _center_crop(c3, u)], dim=1)))
        u = net.up2(u)
        u = net.dec2b(net.dec2a(torch.cat([u, _center_crop(c2, u)], dim=1)))
        u = net.up1(u)
        u = net.dec1b(net.dec1a(torch.cat([u, _center_crop(c1, u)], dim=1)))
        outs.append(net.head(u))
    return outs


def estimate_tile_bytes(
    in_size: Sequence[int],
    in_channels: int = 1,
    out_channels: int = 8,
    features: int = 32,
    batch: int = 1,
    elem_bytes: int = 4,
    folded: bool = True,
    channels_last: bool = True,
    device_type: str = "cpu",
) -> int:
    """Estimated peak memory (bytes) of one inference forward of :class:`ValidUNet3D` on ``batch`` tiles.

    Follows the live tensors of the eager forward at its two peaks: the end of the first level (input, first
    convolution output, first skip) and the last decoder level (all skips, up-convolution output, concatenation,
    convolution output); an unfolded BatchNorm adds one more tensor the size of its convolution's output; the float32
    logits and probabilities of the output tile are added. The library's own buffers (oneDNN reorders, im2col) come
    on top, as a factor measured on this project's CPUs (torch 2.13, f = 8 and 32, inputs 132-220 voxels; measured
    peak / tensor count: bfloat16 channels-last 0.88-0.92, float32 channels-last 0.90-1.20, float32 NCDHW 1.17-1.48,
    bfloat16 NCDHW 2.06), with about 15 % to spare. On CUDA the factor is a guess (1.5): cuDNN workspaces are not
    calibrated yet.
    """
    f = features
    n = [int(s) for s in in_size]
    vol = math.prod
    n1, n2 = vol(s - 2 for s in n), vol(s - 4 for s in n)
    n2p = vol((s - 4) // 2 for s in n)
    n3 = vol(((s - 4) // 2 - 4) for s in n)
    n3p = vol(((s - 4) // 2 - 4) // 2 for s in n)
    n4 = vol((((s - 4) // 2 - 4) // 2 - 4) for s in n)
    m = vol(max(s - 84, 0) for s in n)  # last up-convolution output
    extra = 0 if folded else 1
    enc = in_channels * vol(n) + f * n1 * (1 + extra) + 2 * f * n2 * (1 + extra)
    skips = 2 * f * n2 + 4 * f * n3 + 8 * f * n4
    dec = skips + 4 * f * m + 6 * f * m + 2 * f * m * (1 + extra)
    pooled = 2 * f * n2p + 4 * f * n3p  # small next to the rest
    peak = (max(enc, dec) + pooled) * elem_bytes + 2 * out_channels * m * 4  # + logits and probabilities (float32)
    if device_type != "cpu":
        factor = 1.5
    elif channels_last:
        factor = 1.05 if elem_bytes == 2 else 1.4
    else:
        factor = 2.4 if elem_bytes == 2 else 1.7
    return int(batch * peak * factor)


@dataclass
class TilePass:
    """One tiling of the output domain: tiles of ``tile_size`` at ``starts`` (image coordinates, may be negative).

    ``write`` gives, per tile, the (start, stop) region it writes per axis (image coordinates, clipped to the image):
    in aligned mode a partition of the image (overlapping tiles agree, so each voxel is written once); in paper mode
    the whole tile (overlapping tiles are averaged).
    """

    shift: tuple[int, int, int]
    tile_size: tuple[int, int, int]
    starts: list[tuple[int, int, int]] = field(default_factory=list)
    write: list[tuple[tuple[int, int], ...]] = field(default_factory=list)


@dataclass(frozen=True)
class Precision:
    """The compute precision and layout of a tiled run, and why they were chosen.

    ``source`` is ``"forced"`` (``amp`` / ``channels_last`` given as booleans), ``"capability"`` (decided from
    what the device reports, without a probe) or ``"probe"`` (a short timed run of the network at its own widths;
    ``probe_seconds`` gives the best time per configuration (the warm-up's for one too slow to time again).
    """

    dtype: torch.dtype
    channels_last: bool
    source: str
    reason: str
    probe_seconds: dict[str, float | None] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "dtype": str(self.dtype).replace("torch.", ""),
            "channels_last": self.channels_last,
            "source": self.source,
            "reason": self.reason,
            "probe_seconds": None if self.probe_seconds is None else dict(self.probe_seconds),
        }


#: Decisions of ``amp="auto"`` / ``channels_last="auto"``, per process: key = network shape, device, threads, ISA.
_PRECISION_CACHE: dict[tuple, Precision] = {}
#: bfloat16 must beat the best float32 configuration by this factor to be chosen (float32 is exact, so a tie or a
#: few percent of timing noise keeps float32).
_BF16_MARGIN = 0.9
#: A warm-up this many times faster than every other decides the probe without timed runs (warm-ups include
#: oneDNN's kernel creation, which costs bfloat16 relatively more, so this never favours it wrongly).
_PROBE_CLEAR = 1.5
#: A probed configuration whose warm-up takes this many times the fastest warm-up is not timed again (the slow
#: reference kernels of a CPU without native bfloat16 are 20-70x slower).
_PROBE_DROP = 4.0


def _auto_or_bool(value: Any, name: str) -> bool | str:
    """``"auto"`` (any case) or a boolean through :func:`custom.options.as_bool` (CLI strings accepted)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return as_bool(value, name)


def _config_name(dtype: torch.dtype, channels_last: bool) -> str:
    return f"{str(dtype).replace('torch.', '')}, {'channels_last_3d' if channels_last else 'NCDHW'}"


def _valid_outputs_from(m: int, min_output: int, align: int) -> int:
    """Smallest valid output size >= m (valid output sizes are min_output + align * k)."""
    return min_output + max(0, math.ceil((m - min_output) / align)) * align


class ValidTiledInferer(Inferer):
    """Tiled inference for valid-convolution networks whose output is ``2 * margin`` smaller than the input.

    Args:
        mode: ``"aligned"`` (exact, large tiles; default) or ``"paper"`` (44x44x28 tiles, as the paper).
        tile_size: output tile size (x, y, z). Aligned mode: rounded down to a valid output size (``4 + 8 k``) and
            capped by the volume; ``None`` = as large as ``memory_budget_mb`` allows. Paper mode: default 44x44x28;
            must be valid output sizes.
        memory_budget_mb: memory for one batch of tiles (aligned mode, when ``tile_size`` is None). ``None``: on CPU a
            quarter of the available RAM up to 4 GB; on CUDA half of the free device memory.
        overlap: R = 1, 2, 4 or 8 predictions per voxel, averaged (aligned: pooling-phase-shifted passes; paper: halved
            strides, R = 4 is the paper's overlapping mode).
        padding_mode: border padding of the image, ``"constant"`` (with ``pad_value``) or ``"replicate"``.
        pad_value: constant used for padding: the normalised intensity of air in this bundle's configs.
        sw_batch_size: tiles per forward.
        amp: ``"auto"`` (default), True (bfloat16) or False (float32); the strings ``"true"``/``"false"`` of the
            command line are accepted. With ``fold_bn`` the folded copy runs in pure bfloat16, otherwise under
            autocast. ``"auto"``: on CUDA bfloat16 where the device supports it; on the CPU bfloat16 only where
            oneDNN reports native support (AVX-512 BF16 / AMX; on AVX2-only CPUs bfloat16 convolutions fall back to
            a reference kernel 20-70x slower) *and* a short probe of the network at its own widths (a 100^3 input,
            a warm-up and at most two timed runs per configuration) finds it at least 10 % faster than float32;
            float32 otherwise. The decision is cached per process and network shape, logged once and reported in
            ``last_stats["precision"]`` (see :class:`Precision`).
        channels_last: ``"auto"`` (default), True or False: channels_last_3d memory format for tiles and the
            folded copy. ``"auto"``: channels-last on CUDA and on the CPU (oneDNN ran it as fast as NCDHW or faster
            in every configuration measured but one; probing the layout too cost more than it won), NCDHW on other
            devices.
        fold_bn: run a cached copy of a :class:`ValidUNet3D` with BatchNorm folded into the convolutions (fewer
            passes over the activations, the same result to float rounding; never slower, so not probed).
        output_device: device of the returned probabilities; ``None`` = the input's device, falling back to the CPU
            when the probabilities do not fit in free CUDA memory.
        progress: ``"auto"`` (default: when stderr is a terminal), True or False: a tqdm bar over the tiles of the
            call with its ETA. Whatever this says, each call logs one INFO line with its tiles and seconds.
        name: label of the progress bar and of the log line (e.g. ``"stage 1"``); default ``"tiles"``.
        activation: ``"softmax"`` (default), ``"sigmoid"`` or ``"none"`` (logits).
        margin: voxels lost per side by the network (44).
        align: shift-equivariance period of the network (8).
        min_output: smallest output size of the network (4); valid output sizes are ``min_output + align * k``.
        mask_from_last_channel: take the candidate mask from the last input channel and give the network the others.
            Lets a bundle pass C1/C2 through evaluators that only call ``inferer(inputs, network)``: concatenate the
            mask to the image (``ConcatItemsd``) and set this flag.
        mask_aware: aligned mode without ``tile_size``: choose the tile for the given mask, counting only the tiles
            that run (see :meth:`choose_tile_size`); False chooses as if every tile ran.
        tile_overhead: fixed cost charged per tile when choosing the tile size, as a multiple of the forward FLOPs
            of the smallest tile (input 100^3): small tiles run at a lower rate. Fitted ``time = FLOPs / rate +
            overhead`` at the paper's widths: ~0.4 s per tile at ~300 GFLOP/s on the project's 2-core CPU (0.5x),
            ~1 ms at ~290 TFLOP/s on an H200 (REFERENCE.md section 4; 1.0x). 0 counts FLOPs only.
        compile: ``torch.compile`` the folded copy (needs ``fold_bn`` and a :class:`ValidUNet3D`). Pays off on CUDA
            for many tiles of one size (REFERENCE.md: 2.75 -> 1.72 ms per paper tile on an H200); each new tile size
            compiles again (tens of seconds), so it is off by default. The compiled module runs whole tiles: it
            disables ``share_encoder``.
        share_encoder: aligned mode with ``overlap`` > 1 and a :class:`ValidUNet3D`: run the encoder levels 1-3 once
            per tile for all R passes (:func:`shared_encoder_forward`); the passes then share one tile grid.

    Call: ``inferer(inputs (B, C, X, Y, Z), network, mask=None) -> MetaTensor (B, K, X, Y, Z)``. After each call
    ``last_stats`` holds ``tiles_run``, ``tiles_skipped``, ``candidate_fraction``, ``seconds``, ``mode``,
    ``tile_size`` (output tile of the first pass), ``input_tile_size``, ``passes``, ``flops`` (estimated forward
    FLOPs, ``None`` for networks that do not expose ``flops``) and ``flops_per_voxel``; with a shared encoder also
    ``shared_encoder`` (True) and ``encoder_tiles`` (tile positions whose encoder ran; ``tiles_run`` counts passes);
    ``dtype`` and ``channels_last`` of the run, and ``precision``: :meth:`Precision.as_dict` (how ``amp="auto"``
    decided, with the probe's times) plus ``amp`` as given and ``fold_bn`` as run.
    """

    def __init__(
        self,
        mode: str = "aligned",
        tile_size: Sequence[int] | None = None,
        memory_budget_mb: float | None = None,
        overlap: int = 1,
        padding_mode: str = "constant",
        pad_value: float = 0.0,
        sw_batch_size: int = 1,
        amp: bool | str = "auto",
        channels_last: bool | str = "auto",
        fold_bn: bool = True,
        output_device: str | None = None,
        progress: bool | str = "auto",
        activation: str = "softmax",
        margin: int = 44,
        align: int = 8,
        min_output: int = 4,
        mask_from_last_channel: bool = False,
        mask_aware: bool = True,
        tile_overhead: float = 0.75,
        compile: bool = False,
        share_encoder: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("aligned", "paper"):
            raise ValueError(f"mode must be 'aligned' or 'paper', got {mode!r}")
        if int(overlap) not in _ALIGNED_SHIFTS:
            raise ValueError(f"overlap must be one of {sorted(_ALIGNED_SHIFTS)}, got {overlap!r}")
        if padding_mode not in ("constant", "replicate"):
            raise ValueError(f"padding_mode must be 'constant' or 'replicate', got {padding_mode!r}")
        if activation not in ("softmax", "sigmoid", "none"):
            raise ValueError(f"activation must be 'softmax', 'sigmoid' or 'none', got {activation!r}")
        if int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        if tile_size is not None:
            tile_size = tuple(int(t) for t in tile_size)
            if len(tile_size) != 3 or min(tile_size) < 1:
                raise ValueError(f"tile_size must be 3 positive sizes (x, y, z), got {tile_size}")
        if align % 2:
            raise ValueError(f"align must be even (pooling period), got {align}")
        self.mode = mode
        self.tile_size = tile_size
        self.memory_budget_mb = memory_budget_mb
        self.overlap = int(overlap)
        self.padding_mode = padding_mode
        self.pad_value = float(pad_value)
        self.sw_batch_size = int(sw_batch_size)
        self.amp = _auto_or_bool(amp, "amp")
        self.channels_last = _auto_or_bool(channels_last, "channels_last")
        self.fold_bn = as_bool(fold_bn, "fold_bn")
        self.output_device = output_device
        self.progress = _auto_or_bool(progress, "progress")
        self.name = name
        self.activation = activation
        self.margin = int(margin)
        self.align = int(align)
        self.min_output = int(min_output)
        self.mask_from_last_channel = bool(mask_from_last_channel)
        self.mask_aware = bool(mask_aware)
        if float(tile_overhead) < 0:
            raise ValueError(f"tile_overhead must be >= 0, got {tile_overhead}")
        self.tile_overhead = float(tile_overhead)
        self.compile = bool(compile)
        self.share_encoder = bool(share_encoder)
        self.last_stats: dict[str, Any] = {}
        self._fold_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # precision and layout of the current call (resolved from amp / channels_last by `resolve_precision`)
        self._prec = Precision(
            torch.bfloat16 if self.amp is True else torch.float32,
            self.channels_last is not False,
            "forced",
            "not resolved yet",
        )
        if mode == "paper":
            tile = self.tile_size or PAPER_TILE
            bad = [t for t in tile if not self._is_valid_output(t)]
            if bad:
                raise ValueError(f"paper-mode tile sizes must be {min_output} + {align} k (e.g. 44, 28), got {tile}")

    # ----------------------------------------------------------------------------------------------------- planning
    def _is_valid_output(self, t: int) -> bool:
        return t >= self.min_output and (t - self.min_output) % self.align == 0

    def _round_down_output(self, t: int) -> int:
        return max(self.min_output, self.min_output + ((t - self.min_output) // self.align) * self.align)

    def plan(
        self,
        spatial_size: Sequence[int],
        tile_size: Sequence[int] | None = None,
    ) -> list[TilePass]:
        """The passes and tiles for an image of ``spatial_size`` (x, y, z), before any mask is applied.

        ``tile_size`` overrides the constructor's (aligned mode: the wanted output tile, rebalanced per axis so that
        the tiles cover the domain with the least overlap).
        """
        size = tuple(int(s) for s in spatial_size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"spatial_size must be 3 positive sizes, got {spatial_size}")
        if self.mode == "paper":
            return [self._plan_paper(size, tuple(tile_size or self.tile_size or PAPER_TILE))]
        wanted = tuple(tile_size or self.tile_size or size)
        half = self.align // 2
        return [
            self._plan_aligned(size, wanted, tuple(half * s for s in shift)) for shift in _ALIGNED_SHIFTS[self.overlap]
        ]

    def _ext(self) -> int:
        """Extra domain per axis: ``align / 2`` when passes are shifted (R > 1), so that all passes share one grid."""
        return self.align // 2 if self.mode == "aligned" and self.overlap > 1 else 0

    def _plan_aligned(self, size: tuple[int, ...], wanted: tuple[int, ...], shift: tuple[int, ...]) -> TilePass:
        # Output domain of the pass: image coordinates [-shift, -shift + M), M = smallest valid output >= size + ext
        # (ext = align / 2 >= shift when R > 1, else 0): every pass has the same tiles, shifted by -shift. Tiles start
        # at multiples of `align` from the domain origin; the last one ends at M (also a multiple of align away, since
        # M and the tile size are both min_output mod align).
        axes_starts, axes_write, tiles = [], [], []
        for n, w, s in zip(size, wanted, shift, strict=True):
            t, starts, write = self._axis_plan(n, w, s)
            axes_starts.append(starts)
            axes_write.append(write)
            tiles.append(t)
        p = TilePass(shift=tuple(shift), tile_size=tuple(tiles))
        for i, sx in enumerate(axes_starts[0]):
            for j, sy in enumerate(axes_starts[1]):
                for k, sz in enumerate(axes_starts[2]):
                    p.starts.append((sx, sy, sz))
                    p.write.append((axes_write[0][i], axes_write[1][j], axes_write[2][k]))
        return p

    def _axis_plan(self, n: int, wanted: int, s: int) -> tuple[int, list[int], list[tuple[int, int]]]:
        """One axis of an aligned pass: (tile size, tile starts, write regions), both in image coordinates, for an
        axis of ``n`` voxels, a wanted tile size and a tiling-origin shift ``s``."""
        dom = _valid_outputs_from(n + self._ext(), self.min_output, self.align)
        t = min(dom, max(self._round_down_output(int(wanted)), self._min_tile()))
        count = 1 if t >= dom else math.ceil((dom - t) / ((t // self.align) * self.align)) + 1
        t = self._tile_for_count(dom, count)  # rebalance: the smallest tile that covers with `count` tiles
        stride = (t // self.align) * self.align
        starts = [min(k * stride, dom - t) for k in range(count)]
        bounds = starts[1:] + [dom]
        write = [(max(a - s, 0), min(b - s, n)) for a, b in zip(starts, bounds, strict=True)]
        keep = [i for i, (a, b) in enumerate(write) if b > a]
        return t, [starts[i] - s for i in keep], [write[i] for i in keep]

    def _plan_paper(self, size: tuple[int, ...], tile: tuple[int, ...]) -> TilePass:
        bad = [t for t in tile if not self._is_valid_output(int(t))]
        if bad:
            raise ValueError(f"paper-mode tile sizes must be {self.min_output} + {self.align} k, got {tile}")
        halved = _PAPER_HALVED[self.overlap]
        axes = []
        for a, (n, t) in enumerate(zip(size, tile, strict=True)):
            stride = max(1, t // 2) if a in halved else t
            count = 1 if n <= t else math.ceil((n - t) / stride) + 1
            axes.append([k * stride for k in range(count)])
        p = TilePass(shift=(0, 0, 0), tile_size=tuple(int(t) for t in tile))
        for sx in axes[0]:
            for sy in axes[1]:
                for sz in axes[2]:
                    p.starts.append((sx, sy, sz))
                    p.write.append(tuple((o, min(o + t, n)) for o, t, n in zip((sx, sy, sz), tile, size, strict=True)))
        return p

    def coverage_count(self, spatial_size: Sequence[int], tile_size: Sequence[int] | None = None) -> torch.Tensor:
        """How many predictions are averaged at each voxel (int32, shape ``spatial_size``), from :meth:`plan`."""
        count = torch.zeros(tuple(int(s) for s in spatial_size), dtype=torch.int32)
        for p in self.plan(spatial_size, tile_size):
            for w in p.write:
                count[w[0][0] : w[0][1], w[1][0] : w[1][1], w[2][0] : w[2][1]] += 1
        return count

    def choose_tile_size(
        self,
        spatial_size: Sequence[int],
        budget_bytes: float,
        in_channels: int = 1,
        out_channels: int = 8,
        features: int = 32,
        elem_bytes: int = 4,
        folded: bool = True,
        device_type: str = "cpu",
        mask: torch.Tensor | np.ndarray | None = None,
        shared: bool = False,
    ) -> tuple[int, int, int]:
        """The output tile (aligned mode) with the least total cost whose batch of tiles fits ``budget_bytes``.

        For every number of tiles per axis the tile is the smallest that covers the domain (see :meth:`plan`); among
        the combinations whose :func:`estimate_tile_bytes` fits and whose largest activation stays below 2**31
        elements, the one with the least ``tiles x (forward_flops(tile) + overhead)`` wins (``overhead`` =
        ``tile_overhead`` x the FLOPs of the smallest tile). Without a mask every tile counts: large, near-cubic
        tiles win, because the 88-voxel halo is paid once per tile. With ``shared`` (the R passes share the encoder,
        see ``share_encoder``) a tile that runs for any pass costs its encoder once (:func:`encoder_flops` of the
        input 4 voxels larger) plus the rest of the network once per pass that runs.

        With a ``mask`` ((B, 1, X, Y, Z) or (X, Y, Z), nonzero = candidate) only the tiles that run count, over all
        passes of ``overlap`` (exactly as :meth:`plan` and the run skip them): a sparse C2 skips many small tiles and
        few large ones. The combinations with up to 16 tiles per axis are tried, as is the unmasked choice, so the
        result never costs more than the unmasked one. Falls back to the smallest tile when nothing fits.

        >>> inf = ValidTiledInferer()
        >>> m = torch.zeros(1, 1, 200, 200, 200, dtype=torch.bool); m[..., 20:40, 20:40, 20:40] = True
        >>> inf.choose_tile_size((200, 200, 200), 2**40, features=32), inf.choose_tile_size((200,) * 3, 2**40, mask=m)
        ((204, 204, 204), (44, 44, 44))
        """
        min_tile = self._min_tile()
        size = tuple(int(n) for n in spatial_size)
        ext = self._ext()
        doms = [_valid_outputs_from(n + ext, self.min_output, self.align) for n in size]
        options = [self._axis_options(d) for d in doms]
        n_pass = len(_ALIGNED_SHIFTS[self.overlap])
        shared = bool(shared) and n_pass > 1

        @functools.cache
        def tile_flops(t: tuple[int, ...]) -> float:
            return float(forward_flops([x + 2 * self.margin for x in t], in_channels, out_channels, features))

        overhead = self.tile_overhead * tile_flops((min_tile,) * 3)

        @functools.cache
        def shared_flops(t: tuple[int, ...]) -> tuple[float, float]:
            ins = [x + 2 * self.margin for x in t]
            enc = float(encoder_flops([i + ext for i in ins], in_channels, features))
            return enc, tile_flops(t) - encoder_flops(ins, in_channels, features)

        def total(t: tuple[int, ...], n_tiles: int, n_runs: int) -> float:
            if shared:
                enc, rest = shared_flops(t)
                return n_tiles * enc + n_runs * (rest + overhead)
            return n_runs * (tile_flops(t) + overhead)

        @functools.cache
        def fits(t: tuple[int, ...]) -> bool:
            ins = [x + 2 * self.margin + (ext if shared else 0) for x in t]
            b = self.sw_batch_size
            est = estimate_tile_bytes(
                ins, in_channels, out_channels, features, b, elem_bytes, folded, self._prec.channels_last, device_type
            )
            return est <= budget_bytes and max_activation_elements(ins, features, 1) <= _MAX_ELEMENTS

        best: tuple[tuple[float, int], tuple[int, int, int]] | None = None
        for cx, tx in options[0]:
            for cy, ty in options[1]:
                for cz, tz in options[2]:  # ascending counts: the first fit is the largest z tile for (x, y)
                    tile = (tx, ty, tz)
                    if fits(tile):
                        n = cx * cy * cz
                        cost = total(tile, n, n * n_pass)
                        if best is None or (cost, n) < best[0]:
                            best = ((cost, n), tile)
                        break
        if best is None:
            return tuple(min(min_tile, d) for d in doms)
        if mask is None:
            return best[1]
        hits_of = self._tile_hits(mask, size)
        if hits_of is None:  # empty mask: nothing runs, any tile will do
            return best[1]

        def key(t: tuple[int, ...]) -> tuple[float, int]:
            hits = hits_of(t)  # (passes, B, cx, cy, cz)
            runs = int(np.count_nonzero(hits))
            return total(t, int(np.count_nonzero(hits.any(0))), runs), runs

        best = (key(best[1]), best[1])
        for cx, tx in options[0]:
            for cy, ty in options[1]:
                for cz, tz in options[2]:
                    tile = (tx, ty, tz)
                    if max(cx, cy, cz) > _MASKED_MAX_COUNT or not fits(tile):
                        continue
                    k = key(tile)
                    if k < best[0]:
                        best = (k, tile)
        return best[1]

    def _tile_hits(self, mask: torch.Tensor | np.ndarray, size: tuple[int, ...]) -> Callable | None:
        """``hits(tile) -> bool array (passes, B, cx, cy, cz)``: which tiles of :meth:`plan` run for ``mask`` (their
        write region holds a candidate); None if the mask is empty.

        Tile boundaries of every pass fall on multiples of ``align / 2`` in image coordinates (multiples of
        ``align`` from a domain origin shifted by 0 or ``align / 2``) or on the image end, so the mask is reduced to
        a block occupancy grid once, and each tile's test is four lookups in its summed-area table.
        """
        blk = self.align // 2
        m = torch.as_tensor(mask).reshape(-1, *size)
        m = m if m.dtype == torch.bool else m != 0
        if not bool(m.any()):
            return None
        pads = [(-n) % blk for n in size]
        if any(pads):
            m = F.pad(m.view(torch.uint8), (0, pads[2], 0, pads[1], 0, pads[0])).bool()
        g = [(n + p) // blk for n, p in zip(size, pads, strict=True)]
        b = m.shape[0]  # one axis at a time: each step shrinks the data by blk
        m = m.view(b * g[0], blk, -1).any(1).view(b, g[0], g[1], blk, -1).any(3)
        occ = m.view(b, g[0], g[1], g[2], blk).any(4).cpu().numpy()
        sat = np.zeros((occ.shape[0], g[0] + 1, g[1] + 1, g[2] + 1), np.int32)
        sat[:, 1:, 1:, 1:] = occ.astype(np.int32).cumsum(1).cumsum(2).cumsum(3)
        half = self.align // 2
        shifts = [tuple(half * v for v in sh) for sh in _ALIGNED_SHIFTS[self.overlap]]

        @functools.cache
        def axis(a: int, wanted: int, s: int) -> tuple[int, np.ndarray, np.ndarray]:
            t, _, write = self._axis_plan(size[a], wanted, s)
            lo = np.array([w[0] // blk for w in write])
            hi = np.array([-(-w[1] // blk) for w in write])
            return t, lo, hi

        def hits(tile) -> np.ndarray:
            out = []
            for sh in shifts:
                (_, x0, x1), (_, y0, y1), (_, z0, z1) = (axis(a, tile[a], sh[a]) for a in range(3))
                x0, x1 = x0[:, None, None], x1[:, None, None]
                y0, y1 = y0[None, :, None], y1[None, :, None]
                count = (
                    sat[:, x1, y1, z1]
                    - sat[:, x0, y1, z1]
                    - sat[:, x1, y0, z1]
                    - sat[:, x1, y1, z0]
                    + sat[:, x0, y0, z1]
                    + sat[:, x0, y1, z0]
                    + sat[:, x1, y0, z0]
                    - sat[:, x0, y0, z0]
                )
                out.append(count > 0)
            return np.stack(out)

        return hits

    def _min_tile(self) -> int:
        """Smallest output tile that tiles a larger domain (its stride must be at least ``align``)."""
        return _valid_outputs_from(self.align, self.min_output, self.align)

    def _tile_for_count(self, dom: int, count: int) -> int:
        """Smallest valid tile such that ``count`` tiles at multiple-of-``align`` offsets cover ``dom`` voxels."""
        if count <= 1:
            return dom
        t = self._min_tile()
        while (count - 1) * ((t // self.align) * self.align) + t < dom:
            t += self.align
        return t

    def _axis_options(self, dom: int) -> list[tuple[int, int]]:
        """(tile count, tile size) pairs along one axis, by ascending count and strictly descending tile size."""
        opts: list[tuple[int, int]] = []
        count = 1
        while True:
            t = self._tile_for_count(dom, count)
            if not opts or t < opts[-1][1]:
                opts.append((count, t))
            if t <= self._min_tile():
                return opts
            count += 1

    # ---------------------------------------------------------------------------------------------------- running
    def _default_budget(self, device: torch.device, output_bytes: int) -> float:
        if self.memory_budget_mb is not None:
            return float(self.memory_budget_mb) * 2**20
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return 0.5 * max(free - output_bytes, 0)
        avail = _available_ram_bytes()
        return min(4 * 2**30, 0.25 * avail) if avail else 2 * 2**30

    def _build_compute(
        self, network: Callable, dtype: torch.dtype, channels_last: bool, compile: bool | None = None
    ) -> tuple[Callable, bool, torch.dtype | None]:
        """(module to run, whether it is the folded copy, dtype to cast tiles to or None for autocast/fp32) for
        ``dtype`` and the layout; the folded copy is cached per network (and refreshed when its weights change)."""
        if not (self.fold_bn and isinstance(network, ValidUNet3D)):
            return network, False, None
        state = tuple((t.data_ptr(), t._version, t.dtype, str(t.device)) for t in network.state_dict().values())
        compile = self.compile if compile is None else compile
        key = (state, dtype, channels_last, compile)
        cached = self._fold_cache.get(network)
        if cached is not None and cached[0] == key:
            return cached[1], True, dtype
        folded = fold_batchnorm(network).to(dtype=dtype)
        if channels_last:
            folded = folded.to(memory_format=torch.channels_last_3d)
        if compile:
            folded = torch.compile(folded, dynamic=False)
        self._fold_cache[network] = (key, folded)
        return folded, True, dtype

    def _compute_net(self, network: Callable, device: torch.device) -> tuple[Callable, bool, torch.dtype | None]:
        """:meth:`_build_compute` for the precision of this call (``self._prec``)."""
        return self._build_compute(network, self._prec.dtype, self._prec.channels_last)

    def _autocast(self, device: torch.device, cast: torch.dtype | None):
        """bfloat16 autocast for an unfolded network in bfloat16; nothing otherwise."""
        if self._prec.dtype == torch.bfloat16 and cast is None:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    def resolve_precision(self, network: Callable, device: torch.device) -> Precision:
        """The dtype and layout for ``network`` on ``device``: forced values as given, ``"auto"`` from the device's
        capability and (on the CPU) a short probe; cached per process (see ``amp``). Logs each new decision once."""
        key = (
            type(network).__name__,
            tuple((n, tuple(t.shape), t.dtype) for n, t in network.named_parameters())
            if isinstance(network, nn.Module)
            else id(network),
            str(device),
            torch.get_num_threads(),
            os.environ.get("ONEDNN_MAX_CPU_ISA"),
            self.amp,
            self.channels_last,
            self.fold_bn and isinstance(network, ValidUNet3D),
            self.compile,
        )
        cached = _PRECISION_CACHE.get(key)
        if cached is not None:
            return cached
        prec = self._decide_precision(network, device)
        _PRECISION_CACHE[key] = prec
        logger.info(
            "%s: %s on %s (%s: %s)",
            self.name or "tiles",
            _config_name(prec.dtype, prec.channels_last),
            device,
            prec.source,
            prec.reason,
        )
        return prec

    def _decide_precision(self, network: Callable, device: torch.device) -> Precision:
        amp, cl = self.amp, self.channels_last
        bf16, fp32 = torch.bfloat16, torch.float32
        if amp != "auto" and cl != "auto":
            return Precision(bf16 if amp else fp32, bool(cl), "forced", f"amp={amp}, channels_last={cl}")
        if device.type == "cuda":
            ok = bool(torch.cuda.is_bf16_supported())
            dtype = (bf16 if ok else fp32) if amp == "auto" else (bf16 if amp else fp32)
            why = f"CUDA, bfloat16 {'supported' if ok else 'not supported'} by {torch.cuda.get_device_name(device)}"
            return Precision(dtype, True if cl == "auto" else bool(cl), "capability", why)
        if device.type != "cpu":
            dtype = fp32 if amp == "auto" else (bf16 if amp else fp32)
            return Precision(
                dtype,
                False if cl == "auto" else bool(cl),
                "capability",
                f"no measured fast path on {device.type}: float32, NCDHW unless forced",
            )
        native = runtime.cpu_bf16_supported()
        if amp == "auto":
            dtypes = [fp32, bf16] if native else [fp32]
        else:
            dtypes = [bf16 if amp else fp32]
        # channels-last unless forced: oneDNN ran it as fast as NCDHW or faster in every configuration measured
        # here but one (f = 32 under AVX2 kernels, ~10 %), and probing a second layout cost 2-5 s in a fresh process
        # (kernel creation for new shapes), more than it could win (bundle/docs/performance.md)
        layouts = [True] if cl == "auto" else [bool(cl)]
        no_bf16 = (
            "oneDNN reports no native bfloat16 on this CPU (bfloat16 convolutions would use the slow reference kernel)"
        )
        configs = [(d, c) for d in dtypes for c in layouts]
        if len(configs) == 1:
            if amp == "auto":
                return Precision(configs[0][0], configs[0][1], "capability", no_bf16)
            return Precision(configs[0][0], configs[0][1], "forced", f"amp={amp}, channels-last unless forced")
        try:
            times = self._probe(network, device, configs)
        except Exception as e:  # noqa: BLE001 - a probe that cannot run must not stop inference: float32 then
            logger.warning("precision probe failed (%s: %s); using float32", type(e).__name__, e)
            return Precision(
                fp32 if amp == "auto" else (bf16 if amp else fp32),
                layouts[0],
                "capability",
                f"probe failed ({type(e).__name__})",
            )
        return self._choose(times, amp, native, no_bf16)

    @staticmethod
    def _choose(
        times: dict[tuple[torch.dtype, bool], float | None], amp: bool | str, native: bool, no_bf16: str
    ) -> Precision:
        """The decision from probe times (seconds per run, None = not run): the fastest layout per
        dtype; bfloat16 only when it beats the best float32 by ``_BF16_MARGIN``."""

        def best(dtype):
            got = [(t, c) for (d, c), t in times.items() if d == dtype and t is not None]
            return min(got, key=lambda tc: tc[0]) if got else None

        named = {_config_name(d, c): (None if t is None else round(t, 4)) for (d, c), t in times.items()}
        f32, b16 = best(torch.float32), best(torch.bfloat16)
        if f32 is not None and b16 is not None:
            if b16[0] < _BF16_MARGIN * f32[0]:
                why = f"bfloat16 {b16[0] * 1e3:.0f} ms vs float32 {f32[0] * 1e3:.0f} ms per run"
                return Precision(torch.bfloat16, b16[1], "probe", why, named)
            why = (
                f"bfloat16 {b16[0] * 1e3:.0f} ms not at least {1 - _BF16_MARGIN:.0%} faster than float32 "
                f"{f32[0] * 1e3:.0f} ms per run"
            )
            return Precision(torch.float32, f32[1], "probe", why, named)
        dtype, (t, c) = (torch.float32, f32) if f32 is not None else (torch.bfloat16, b16)
        if amp == "auto" and not native:
            why = f"{no_bf16}; fastest layout {t * 1e3:.0f} ms per run"
        elif amp == "auto":
            why = f"bfloat16 not run; float32 {t * 1e3:.0f} ms per run"
        else:
            why = f"amp={amp} forced; fastest layout {t * 1e3:.0f} ms per run"
        return Precision(dtype, c, "probe", why, named)

    def probe_input_size(self) -> tuple[int, int, int]:
        """Input of the probe: the smallest valid input grown by one pooling period, 100^3 for this U-Net (a 12^3
        output). The smallest input (92^3, a 4^3 output) is not representative: its tiny deepest layers hit a slow
        bfloat16 path (f = 8 on AMX: 0.37 s against 0.06 s at 100^3, where float32 takes 0.12 and 0.17 s)."""
        n = self.min_output + self.align + 2 * self.margin
        return (n, n, n)

    def _probe(
        self, network: Callable, device: torch.device, configs: list[tuple[torch.dtype, bool]]
    ) -> dict[tuple[torch.dtype, bool], float | None]:
        """Seconds per forward of each configuration on a :meth:`probe_input_size` input (the folded copy in that
        dtype and layout, as inference runs it). Every configuration runs once as a warm-up (oneDNN creates its
        kernels). When the fastest warm-up is ``_PROBE_CLEAR`` times faster than every other, it wins on those
        times; otherwise the configurations within
        ``_PROBE_DROP`` x the fastest run twice more (once when a warm-up took over a second), interleaved, and the
        best run counts; the slower ones (the slow-kernel trap) keep their warm-up time."""
        cin = _in_channels(network) or 1
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, cin, *self.probe_input_size(), generator=g).to(device)
        built = {c: self._build_compute(network, *c, compile=False) for c in configs}  # eager: compiling each
        # candidate would cost more than the whole probe

        def once(c) -> float:
            net, _, cast = built[c]
            tile = x.to(dtype=cast or torch.float32)
            if c[1]:
                tile = tile.contiguous(memory_format=torch.channels_last_3d)
            t0 = time.perf_counter()
            with torch.no_grad(), self._autocast_for(device, c[0], cast):
                net(tile)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t0

        first: dict = {}
        # warm-up (oneDNN creates its kernels; a slow reference kernel shows here already), bfloat16 first
        for c in sorted(configs, key=lambda c: (not c[1], c[0] != torch.bfloat16)):
            first[c] = once(c)
        fastest = min(first.values())
        times: dict = {c: first.get(c) for c in configs}
        live = [c for c in first if first[c] <= _PROBE_DROP * fastest]  # the others keep their warm-up time
        ranked = sorted(first.values())
        if len(ranked) > 1 and ranked[0] * _PROBE_CLEAR > ranked[1]:  # no clear winner from the warm-ups
            times.update({c: math.inf for c in live})
            rounds = 1 if fastest > 1.0 else 2  # wide networks: one timed run each keeps the probe short
            for _ in range(rounds):  # interleaved, so that other load on the machine hits every configuration alike
                for c in live:
                    times[c] = min(times[c], once(c))
        return times

    @staticmethod
    def _autocast_for(device: torch.device, dtype: torch.dtype, cast: torch.dtype | None):
        if dtype == torch.bfloat16 and cast is None:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], mask: torch.Tensor | None = None, **kwargs
    ) -> MetaTensor:
        t0 = time.perf_counter()
        if inputs.dim() != 5:
            raise ValueError(f"inputs must be (B, C, X, Y, Z), got shape {tuple(inputs.shape)}")
        batch, _, *spatial = inputs.shape
        if isinstance(network, torch.nn.parallel.DistributedDataParallel):
            # tiles skipped by the mask differ between ranks: DDP's per-forward buffer broadcast would deadlock
            network = network.module
        if self.mask_from_last_channel:
            if mask is not None or inputs.shape[1] < 2:
                raise ValueError("mask_from_last_channel needs >= 2 input channels and no separate mask")
            mask, inputs = inputs[:, -1:], inputs[:, :-1]
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.dim() != 5 or mask.shape[0] != batch or mask.shape[1] != 1 or list(mask.shape[2:]) != spatial:
                raise ValueError(f"mask must be (B, 1, X, Y, Z) = {(batch, 1, *spatial)}, got {tuple(mask.shape)}")
            mask = mask.as_subclass(torch.Tensor).to(inputs.device) > 0
        for name in ("margin", "align"):
            got = getattr(network, name, None)
            if isinstance(got, int) and got != getattr(self, name):
                raise ValueError(f"network {name} = {got} but inferer {name} = {getattr(self, name)}")
        meta_src = MetaTensor([]).copy_meta_from(inputs, copy_attr=False) if isinstance(inputs, MetaTensor) else None
        x = inputs.as_subclass(torch.Tensor) if isinstance(inputs, torch.Tensor) else torch.as_tensor(inputs)
        if not x.is_floating_point():
            x = x.float()

        device = _module_device(network) or x.device
        out_channels = _out_channels(network)
        out_bytes = batch * (out_channels or 8) * math.prod(spatial) * 4
        out_device = torch.device(self.output_device) if self.output_device else x.device
        if self.output_device is None and out_device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(out_device)
            if out_bytes > 0.5 * free:
                out_device = torch.device("cpu")
        on_out_dev = out_bytes if out_device.type == device.type else 0

        was_training = network.training if isinstance(network, nn.Module) else None
        if isinstance(network, nn.Module):
            network.eval()
        if device.type == "cpu":
            runtime.ensure_threads_configured()
        try:
            self._prec = self.resolve_precision(network, device)
            net, folded, cast = self._compute_net(network, device)
            tile = None
            if self.mode == "aligned" and self.tile_size is None:
                elem = 2 if self._prec.dtype == torch.bfloat16 else 4
                budget = self._default_budget(device, on_out_dev)
                tile = self.choose_tile_size(
                    spatial,
                    budget,
                    in_channels=x.shape[1],
                    out_channels=out_channels or 8,
                    features=int(getattr(network, "features", 32)),
                    elem_bytes=elem,
                    folded=folded,
                    device_type=device.type,
                    mask=mask if self.mask_aware else None,
                    shared=self._can_share(net),
                )
            passes, out, stats, fallbacks = self._run_with_fallbacks(
                x, net, spatial, tile, mask, device, out_device, cast, out_channels
            )
            out_device = out.device
        finally:
            if was_training is not None:
                network.train(was_training)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        flops_fn = getattr(network, "flops", None)
        tile_flops = [
            flops_fn([t + 2 * self.margin for t in p.tile_size]) if callable(flops_fn) else None for p in passes
        ]
        flops = stats.pop("flops", None)  # a shared-encoder run counts its own
        runs_per_pass = stats.pop("runs_per_pass")
        if flops is None and all(f is not None for f in tile_flops):
            flops = sum(f * n for f, n in zip(tile_flops, runs_per_pass, strict=True))
        n_vox = batch * math.prod(spatial)
        stats.update(
            mode=self.mode,
            overlap=self.overlap,
            passes=len(passes),
            tile_size=list(passes[0].tile_size),
            input_tile_size=[t + 2 * self.margin for t in passes[0].tile_size],
            flops=flops,
            flops_per_voxel=None if flops is None else flops / n_vox,
            device=str(device),
            output_device=str(out_device),
            dtype=str(self._prec.dtype).replace("torch.", ""),
            channels_last=self._prec.channels_last,
            precision={**self._prec.as_dict(), "amp": self.amp, "fold_bn": folded},
            folded_bn=folded,
            oom_fallbacks=fallbacks,
            seconds=time.perf_counter() - t0,
        )
        self.last_stats = stats
        logger.info(
            "%s: %d tiles run, %d skipped, %.1f s (%s, %s)",
            self.name or "tiles",
            stats["tiles_run"],
            stats["tiles_skipped"],
            stats["seconds"],
            _config_name(self._prec.dtype, self._prec.channels_last),
            "tile " + "x".join(map(str, stats["tile_size"])),
        )
        if meta_src is not None:
            return convert_to_dst_type(out, meta_src, device=out_device)[0]
        return MetaTensor(out)

    def _run_with_fallbacks(
        self,
        x: torch.Tensor,
        net: Callable,
        spatial: Sequence[int],
        tile: Sequence[int] | None,
        mask: torch.Tensor | None,
        device: torch.device,
        out_device: torch.device,
        cast: torch.dtype | None,
        out_channels: int | None,
    ) -> tuple[list[TilePass], torch.Tensor, dict[str, Any], list[str]]:
        """:meth:`_run`, retried after an out-of-memory error with one tile per batch, CPU stitching, then (aligned
        mode) halved tiles, until it fits or nothing is left to shrink (then the error is raised with the steps)."""
        sw_batch = self.sw_batch_size
        fallbacks: list[str] = []
        while True:
            passes = self.plan(spatial, tile)
            failed = None
            try:
                out, stats = self._run(x, net, passes, mask, device, out_device, cast, out_channels, sw_batch)
                return passes, out, stats, fallbacks
            except Exception as e:  # noqa: BLE001 - only allocation failures are retried, the rest is re-raised
                if not is_out_of_memory(e):
                    raise
                failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            # outside the except block: the traceback (and the tensors its frames hold) is released before retrying
            if device.type == "cuda":
                torch.cuda.empty_cache()
            current = tuple(passes[0].tile_size)
            halved = self._halved_tile(current, spatial) if self.mode == "aligned" else None
            if sw_batch > 1:
                sw_batch, step = 1, f"one tile per forward (sw_batch_size {self.sw_batch_size} -> 1)"
            elif out_device.type != "cpu":
                out_device, step = torch.device("cpu"), "stitching on the CPU"
            elif halved is not None:
                tile, step = halved, f"output tiles {list(current)} -> {list(halved)}"
            else:
                raise RuntimeError(
                    f"out of memory with output tiles {list(current)} ({self.mode} mode) after the fallbacks "
                    f"{fallbacks or 'none'}: lower memory_budget_mb / tile_size or free memory ({failed})"
                )
            fallbacks.append(step)
            logger.warning("Out of memory in tiled inference (%s); retrying with %s.", failed, step)

    def _halved_tile(self, tile: tuple[int, ...], spatial: Sequence[int]) -> tuple[int, ...] | None:
        """Output tile with every axis halved (rounded down to a valid size, at least the smallest tile), or None."""
        min_tile = self._min_tile()
        new = tuple(max(min_tile, self._round_down_output(t // 2)) if t > min_tile else t for t in tile)
        return None if new == tuple(tile) else new

    def _run(
        self,
        x: torch.Tensor,
        net: Callable,
        passes: list[TilePass],
        mask: torch.Tensor | None,
        device: torch.device,
        out_device: torch.device,
        cast: torch.dtype | None,
        out_channels: int | None,
        sw_batch_size: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if self._can_share(net) and self._grid_shared(passes):
            return self._run_shared(x, net, passes, mask, device, out_device, cast, out_channels, sw_batch_size)
        batch, _, *spatial = x.shape
        sw_batch_size = sw_batch_size or self.sw_batch_size
        m = self.margin
        # one padded copy of the image serves every pass: pad so that the lowest tile start and the highest tile end
        # of all passes fit.
        lo = [max(m - min(st[a] for p in passes for st in p.starts), 0) for a in range(3)]
        hi = [max(max(st[a] + p.tile_size[a] + m for p in passes for st in p.starts) - spatial[a], 0) for a in range(3)]
        pad = (lo[2], hi[2], lo[1], hi[1], lo[0], hi[0])
        use_cl = self._prec.channels_last
        autocast = self._autocast(device, cast)
        averaged = self.overlap > 1
        count = None
        if averaged and self.mode == "paper":
            count = self.coverage_count(spatial, passes[0].tile_size).to(out_device)
        runs_per_pass = [0] * len(passes)
        tiles_run = tiles_skipped = 0
        out: torch.Tensor | None = None
        if out_channels is not None:
            out = torch.zeros((batch, out_channels, *spatial), dtype=torch.float32, device=out_device)
        jobs = []
        for b in range(batch):
            for pi, p in enumerate(passes):
                for st, w in zip(p.starts, p.write, strict=True):
                    if not self._tile_runs(mask, b, w):
                        tiles_skipped += 1
                        continue
                    jobs.append((b, pi, st, w))
        groups: list[list] = []
        for job in jobs:  # batch tiles of the same element and pass (same tile size)
            if groups and len(groups[-1]) < sw_batch_size and groups[-1][0][:2] == job[:2]:
                groups[-1].append(job)
            else:
                groups.append([job])
        padded = None
        padded_b = -1
        bar = self._progress_bar(len(jobs))
        with torch.no_grad(), bar if bar is not None else nullcontext():  # the bar is closed on errors too
            for group in groups:
                b, pi = group[0][0], group[0][1]
                if b != padded_b:
                    xb = x[b : b + 1]
                    if self.padding_mode == "constant":
                        padded = F.pad(xb, pad, mode="constant", value=self.pad_value)
                    else:
                        padded = F.pad(xb, pad, mode="replicate")
                    padded_b = b
                tsz = passes[pi].tile_size
                crops = []
                for _, _, st, _ in group:
                    o = [st[a] - m + lo[a] for a in range(3)]
                    crops.append(
                        padded[
                            0,
                            :,
                            o[0] : o[0] + tsz[0] + 2 * m,
                            o[1] : o[1] + tsz[1] + 2 * m,
                            o[2] : o[2] + tsz[2] + 2 * m,
                        ]
                    )
                tiles = torch.stack(crops).to(device=device, dtype=cast or torch.float32)
                if use_cl:
                    tiles = tiles.contiguous(memory_format=torch.channels_last_3d)
                with autocast:
                    logits = net(tiles)
                logits = logits.float()
                if list(logits.shape[2:]) != list(tsz):
                    raise ValueError(
                        f"network output {tuple(logits.shape[2:])} for input {tuple(tiles.shape[2:])}, expected "
                        f"{tuple(tsz)}: margin {m} does not match the network"
                    )
                probs = self._activate(logits).to(out_device)
                if out is None:
                    out = torch.zeros((batch, probs.shape[1], *spatial), dtype=torch.float32, device=out_device)
                for i, (_, _, st, w) in enumerate(group):
                    src = probs[
                        i,
                        :,
                        w[0][0] - st[0] : w[0][1] - st[0],
                        w[1][0] - st[1] : w[1][1] - st[1],
                        w[2][0] - st[2] : w[2][1] - st[2],
                    ]
                    dst = out[b, :, w[0][0] : w[0][1], w[1][0] : w[1][1], w[2][0] : w[2][1]]
                    if averaged:
                        dst += src
                    else:
                        dst.copy_(src)
                tiles_run += len(group)
                runs_per_pass[pi] += len(group)
                if bar is not None:
                    bar.update(len(group))
        if out is None:  # nothing ran and the class count is unknown
            raise ValueError("no tile was run and the network's number of classes is unknown (no out_channels)")
        if averaged:
            if count is not None:
                out /= count.clamp_min(1).to(out.dtype)
            else:
                out /= len(passes)
        return self._finish(out, mask, out_device, tiles_run, tiles_skipped, runs_per_pass)

    def _finish(self, out, mask, out_device, tiles_run, tiles_skipped, runs_per_pass, **extra) -> tuple:
        """Background outside the mask, and the run statistics."""
        if mask is not None:
            keep = mask.to(out_device).float()
            out.mul_(keep)
            if self.activation != "sigmoid":
                out[:, :1].add_(1.0 - keep)
        cand = 1.0 if mask is None else float(mask.float().mean())
        stats = {
            "tiles_run": tiles_run,
            "tiles_skipped": tiles_skipped,
            "candidate_fraction": cand,
            "runs_per_pass": runs_per_pass,
            **extra,
        }
        return out, stats

    @staticmethod
    def _tile_runs(mask: torch.Tensor | None, b: int, w) -> bool:
        """A tile runs when its write region is not empty and (with a mask) holds a candidate voxel."""
        if any(hi <= lo for lo, hi in w):
            return False
        return mask is None or bool(mask[b, 0, w[0][0] : w[0][1], w[1][0] : w[1][1], w[2][0] : w[2][1]].any())

    def _can_share(self, net: Callable) -> bool:
        """Whether the R passes of this call can share the encoder (:func:`shared_encoder_forward`)."""
        return (
            self.share_encoder
            and self.mode == "aligned"
            and self.overlap > 1
            and isinstance(net, ValidUNet3D)
            and (self.align, self.margin) == (net.align, net.margin) == (8, 44)
        )

    @staticmethod
    def _grid_shared(passes: list[TilePass]) -> bool:
        """All passes hold the same tiles, shifted by their shift (true for :meth:`plan` with R > 1)."""
        p0 = passes[0]
        return p0.shift == (0, 0, 0) and all(
            p.tile_size == p0.tile_size
            and len(p.starts) == len(p0.starts)
            and all(tuple(g[a] - p.shift[a] for a in range(3)) == st for g, st in zip(p0.starts, p.starts, strict=True))
            for p in passes
        )

    def _run_shared(
        self,
        x: torch.Tensor,
        net: ValidUNet3D,
        passes: list[TilePass],
        mask: torch.Tensor | None,
        device: torch.device,
        out_device: torch.device,
        cast: torch.dtype | None,
        out_channels: int | None,
        sw_batch_size: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The R passes tile by tile: one encoder run on the tile grown by ``align / 2`` (toward negative
        coordinates, where the shifted passes' tiles start), then bottleneck + decoder for each pass whose tile runs."""
        batch, cin, *spatial = x.shape
        sw_batch_size = sw_batch_size or self.sw_batch_size
        m = self.margin
        ext = [max(p.shift[a] for p in passes) for a in range(3)]
        tsz = passes[0].tile_size
        in_size = [t + 2 * m for t in tsz]
        grid = passes[0].starts  # pass 0 (shift 0); pass p's tile k starts at grid[k] - shift_p
        lo = [max(m + ext[a] - min(g[a] for g in grid), 0) for a in range(3)]
        hi = [max(max(g[a] for g in grid) + tsz[a] + m - spatial[a], 0) for a in range(3)]
        pad = (lo[2], hi[2], lo[1], hi[1], lo[0], hi[0])
        autocast = self._autocast(device, cast)
        out = torch.zeros((batch, out_channels or net.out_channels, *spatial), dtype=torch.float32, device=out_device)
        runs_per_pass = [0] * len(passes)
        tiles_skipped = 0
        jobs = []
        for b in range(batch):
            for k in range(len(grid)):
                need = [pi for pi, p in enumerate(passes) if self._tile_runs(mask, b, p.write[k])]
                tiles_skipped += len(passes) - len(need)
                if need:
                    jobs.append((b, k, need))
        groups: list[list] = []
        for job in jobs:  # batch tiles of the same element
            if groups and len(groups[-1]) < sw_batch_size and groups[-1][0][0] == job[0]:
                groups[-1].append(job)
            else:
                groups.append([job])
        f = int(getattr(net, "features", 32))
        enc_flops = encoder_flops([n + e for n, e in zip(in_size, ext, strict=True)], cin, f)
        rest_flops = forward_flops(in_size, cin, out.shape[1], f) - encoder_flops(in_size, cin, f)
        flops = 0
        padded_b, padded = -1, None
        bar = self._progress_bar(sum(len(need) for _, _, need in jobs))
        with torch.no_grad(), bar if bar is not None else nullcontext():
            for group in groups:
                b = group[0][0]
                if b != padded_b:
                    xb = x[b : b + 1]
                    if self.padding_mode == "constant":
                        padded = F.pad(xb, pad, mode="constant", value=self.pad_value)
                    else:
                        padded = F.pad(xb, pad, mode="replicate")
                    padded_b = b
                crops = []
                for _, k, _ in group:
                    o = [grid[k][a] - ext[a] - m + lo[a] for a in range(3)]
                    crops.append(_crop(padded, o, [n + e for n, e in zip(in_size, ext, strict=True)])[0])
                tiles = torch.stack(crops).to(device=device, dtype=cast or torch.float32)
                if self._prec.channels_last:
                    tiles = tiles.contiguous(memory_format=torch.channels_last_3d)
                phases = sorted(set().union(*(need for _, _, need in group)))
                offsets = [[ext[a] - passes[pi].shift[a] for a in range(3)] for pi in phases]
                with autocast:
                    logits = shared_encoder_forward(net, tiles, offsets, in_size)
                flops += len(group) * (enc_flops + len(phases) * rest_flops)
                for pi, lg in zip(phases, logits, strict=True):
                    probs = self._activate(lg.float()).to(out_device)
                    for i, (_, k, need) in enumerate(group):
                        st, w = passes[pi].starts[k], passes[pi].write[k]
                        if pi not in need:  # computed for another tile of the batch: outside the mask here
                            continue
                        out[b, :, w[0][0] : w[0][1], w[1][0] : w[1][1], w[2][0] : w[2][1]] += probs[
                            i,
                            :,
                            w[0][0] - st[0] : w[0][1] - st[0],
                            w[1][0] - st[1] : w[1][1] - st[1],
                            w[2][0] - st[2] : w[2][1] - st[2],
                        ]
                    runs_per_pass[pi] += sum(pi in need for _, _, need in group)
                    del probs
                del logits, tiles
                if bar is not None:
                    bar.update(sum(len(need) for _, _, need in group))
        out /= len(passes)
        return self._finish(
            out,
            mask,
            out_device,
            sum(runs_per_pass),
            tiles_skipped,
            runs_per_pass,
            flops=flops,
            shared_encoder=True,
            encoder_tiles=sum(len(g) for g in groups),
        )

    def _progress_bar(self, total: int):
        """A tqdm bar over ``total`` tiles on stderr (MONAI's style, with ETA), or None when progress is off, or
        ``"auto"`` and stderr is not a terminal, or there is nothing to run."""
        show = _stderr_is_tty() if self.progress == "auto" else self.progress
        if not show or total <= 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=self.name or "tiles", unit="tile", file=sys.stderr, leave=True)

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.activation == "softmax":
            return torch.softmax(logits, dim=1)
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        return logits


def _module_device(network: Callable) -> torch.device | None:
    if isinstance(network, nn.Module):
        for t in network.parameters():
            return t.device
        for t in network.buffers():
            return t.device
    return None


def _out_channels(network: Callable) -> int | None:
    """Number of output channels, read without a forward (``out_channels`` or the last convolution)."""
    k = getattr(network, "out_channels", None)
    if isinstance(k, int):
        return k
    if isinstance(network, nn.Module):
        last = None
        for mod in network.modules():
            if isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d)):
                last = mod
        if last is not None:
            return int(last.out_channels)
    return None


def _in_channels(network: Callable) -> int | None:
    """Number of input channels, read without a forward (``in_channels`` or the first convolution)."""
    k = getattr(network, "in_channels", None)
    if isinstance(k, int):
        return k
    if isinstance(network, nn.Module):
        for mod in network.modules():
            if isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d)):
                return int(mod.in_channels)
    return None


def _stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def _available_ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
