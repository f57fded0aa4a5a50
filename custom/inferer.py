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

The parts: :mod:`custom.tiling` (the plan), :mod:`custom.tile_choice` (cost and memory model, tile choice),
:mod:`custom.precision` (dtype and layout, the folded copy), :mod:`custom.tile_executor` (the loop over tiles and
the out-of-memory ladder); :class:`ValidTiledInferer` checks the arguments and puts them together.

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
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type
from torch import nn

from custom import precision, runtime, tile_choice
from custom.network import ValidUNet3D
from custom.options import as_bool
from custom.precision import Precision, auto_or_bool, autocast_for, config_name
from custom.tile_choice import encoder_flops, estimate_tile_bytes, max_activation_elements
from custom.tile_executor import (
    PlainForward,
    SharedEncoderForward,
    TileExecutor,
    is_out_of_memory,
    progress_bar,
    run_with_fallbacks,
)
from custom.tiling import ALIGNED_SHIFTS, PAPER_TILE, TileGrid, TilePass, grid_shared

__all__ = [
    "Precision",
    "ValidTiledInferer",
    "TilePass",
    "encoder_flops",
    "estimate_tile_bytes",
    "is_out_of_memory",
    "max_activation_elements",
]

logger = logging.getLogger(__name__)


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
            per tile for all R passes (:meth:`ValidUNet3D.phase_shared_forward`); the passes then share one tile grid.

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
        tile_size = _check_arguments(
            mode, tile_size, overlap, padding_mode, activation, sw_batch_size, align, min_output, tile_overhead
        )
        self.mode = mode
        self.tile_size = tile_size
        self.memory_budget_mb = memory_budget_mb
        self.overlap = int(overlap)
        self.padding_mode = padding_mode
        self.pad_value = float(pad_value)
        self.sw_batch_size = int(sw_batch_size)
        self.amp = auto_or_bool(amp, "amp")
        self.channels_last = auto_or_bool(channels_last, "channels_last")
        self.fold_bn = as_bool(fold_bn, "fold_bn")
        self.output_device = output_device
        self.progress = auto_or_bool(progress, "progress")
        self.name = name
        self.activation = activation
        self.margin = int(margin)
        self.align = int(align)
        self.min_output = int(min_output)
        self.mask_from_last_channel = bool(mask_from_last_channel)
        self.mask_aware = bool(mask_aware)
        self.tile_overhead = float(tile_overhead)
        self.compile = bool(compile)
        self.share_encoder = bool(share_encoder)
        self.last_stats: dict[str, Any] = {}
        self._copies = precision.ComputeCopies()  # the folded copies, per network
        # precision and layout of the current call (resolved from amp / channels_last by `resolve_precision`)
        self._prec = Precision(
            torch.bfloat16 if self.amp is True else torch.float32,
            self.channels_last is not False,
            "forced",
            "not resolved yet",
        )

    # ----------------------------------------------------------------------------------------------------- planning
    def _grid(self) -> TileGrid:
        return TileGrid(self.mode, self.overlap, self.min_output, self.align)

    def plan(self, spatial_size: Sequence[int], tile_size: Sequence[int] | None = None) -> list[TilePass]:
        """The passes and tiles for an image of ``spatial_size`` (x, y, z), before any mask is applied.

        ``tile_size`` overrides the constructor's (aligned mode: the wanted output tile, rebalanced per axis so that
        the tiles cover the domain with the least overlap); see :meth:`custom.tiling.TileGrid.plan`.
        """
        return self._grid().plan(spatial_size, tile_size or self.tile_size)

    def coverage_count(self, spatial_size: Sequence[int], tile_size: Sequence[int] | None = None) -> torch.Tensor:
        """How many predictions are averaged at each voxel (int32, shape ``spatial_size``), from :meth:`plan`."""
        return torch.from_numpy(self._grid().coverage_count(spatial_size, tile_size or self.tile_size))

    def choose_tile_size(self, spatial_size: Sequence[int], budget_bytes: float, **model: Any) -> tuple[int, int, int]:
        """The output tile (aligned mode) with the least total cost whose batch of tiles fits ``budget_bytes``.

        ``model``: the keywords of :func:`custom.tile_choice.choose_tile_size` that describe the network and the run
        (``in_channels``, ``out_channels``, ``features``, ``elem_bytes``, ``folded``, ``device_type``, ``mask``,
        ``shared``); the model (FLOPs plus a per-tile overhead, only the tiles that run with a ``mask``, the encoder
        once per tile with ``shared``) is described there. This inferer gives the tiling, margin, batch size, layout
        and ``tile_overhead``.

        >>> inf = ValidTiledInferer()
        >>> m = torch.zeros(1, 1, 200, 200, 200, dtype=torch.bool); m[..., 20:40, 20:40, 20:40] = True
        >>> inf.choose_tile_size((200, 200, 200), 2**40, features=32), inf.choose_tile_size((200,) * 3, 2**40, mask=m)
        ((204, 204, 204), (44, 44, 44))
        """
        return tile_choice.choose_tile_size(
            self._grid(),
            spatial_size,
            budget_bytes,
            margin=self.margin,
            sw_batch_size=self.sw_batch_size,
            channels_last=self._prec.channels_last,
            tile_overhead=self.tile_overhead,
            **model,
        )

    def _default_budget(self, device: torch.device, output_bytes: int) -> float:
        return tile_choice.default_budget_bytes(device, output_bytes, self.memory_budget_mb)

    # -------------------------------------------------------------------------------------------------- precision
    def _build_compute(
        self, network: Callable, dtype: torch.dtype, channels_last: bool, compile: bool | None = None
    ) -> tuple[Callable, bool, torch.dtype | None]:
        """(module to run, whether it is the folded copy, dtype to cast tiles to or None for autocast/fp32) for
        ``dtype`` and the layout (:class:`custom.precision.ComputeCopies`)."""
        compile = self.compile if compile is None else compile
        return self._copies.get(network, dtype, channels_last, self.fold_bn, compile)

    def _compute_net(self, network: Callable, device: torch.device) -> tuple[Callable, bool, torch.dtype | None]:
        """:meth:`_build_compute` for the precision of this call (``self._prec``)."""
        return self._build_compute(network, self._prec.dtype, self._prec.channels_last)

    def resolve_precision(self, network: Callable, device: torch.device) -> Precision:
        """The dtype and layout for ``network`` on ``device``: forced values as given, ``"auto"`` from the device's
        capability and (on the CPU) a short probe; cached per process (see ``amp``). Logs each new decision once."""
        return precision.resolve_precision(
            network,
            device,
            self.amp,
            self.channels_last,
            lambda configs: self._probe(network, device, configs),
            folds=self.fold_bn and isinstance(network, ValidUNet3D),
            compile=self.compile,
            label=self.name or "tiles",
        )

    def probe_input_size(self) -> tuple[int, int, int]:
        """Input of the probe: the smallest valid input grown by one pooling period, 100^3 for this U-Net (a 12^3
        output). The smallest input (92^3, a 4^3 output) is not representative: its tiny deepest layers hit a slow
        bfloat16 path (f = 8 on AMX: 0.37 s against 0.06 s at 100^3, where float32 takes 0.12 and 0.17 s)."""
        n = self.min_output + self.align + 2 * self.margin
        return (n, n, n)

    def _probe(
        self, network: Callable, device: torch.device, configs: list[tuple[torch.dtype, bool]]
    ) -> dict[tuple[torch.dtype, bool], float | None]:
        """:func:`custom.precision.probe` of the eager folded copy (compiling each candidate would cost more than
        the whole probe) on a :meth:`probe_input_size` input."""
        return precision.probe(
            lambda c: self._build_compute(network, *c, compile=False),
            device,
            configs,
            _in_channels(network) or 1,
            self.probe_input_size(),
        )

    # ---------------------------------------------------------------------------------------------------- running
    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], mask: torch.Tensor | None = None, **kwargs
    ) -> MetaTensor:
        t0 = time.perf_counter()
        x, network, mask, meta_src = _checked_inputs(inputs, network, mask, self)
        batch, _, *spatial = x.shape
        device = _module_device(network) or x.device
        out_channels = _out_channels(network)
        out_bytes = batch * (out_channels or 8) * math.prod(spatial) * 4
        out_device = _output_device(self.output_device, x.device, out_bytes)
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
            passes, out, stats, fallbacks = run_with_fallbacks(
                lambda t: self.plan(spatial, t),
                lambda passes, sw_batch, out_dev: self._run(
                    x, net, passes, mask, device, out_dev, cast, out_channels, sw_batch
                ),
                tile,
                self.sw_batch_size,
                device,
                out_device,
                self._grid().halved_tile if self.mode == "aligned" else None,
                self.mode,
            )
            out_device = out.device
        finally:
            if was_training is not None:
                network.train(was_training)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats = _call_stats(self, stats, passes, network, x.shape, device, out_device, folded, fallbacks, t0)
        self.last_stats = stats
        logger.info(
            "%s: %d tiles run, %d skipped, %.1f s (%s, %s)",
            self.name or "tiles",
            stats["tiles_run"],
            stats["tiles_skipped"],
            stats["seconds"],
            config_name(self._prec.dtype, self._prec.channels_last),
            "tile " + "x".join(map(str, stats["tile_size"])),
        )
        if meta_src is not None:
            return convert_to_dst_type(out, meta_src, device=out_device)[0]
        return MetaTensor(out)

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
        """One try of the call: the passes through :class:`custom.tile_executor.TileExecutor`, with the encoder
        shared by the passes where it can be (:class:`custom.tile_executor.SharedEncoderForward`)."""
        count = None
        if self._can_share(net) and grid_shared(passes):
            out_channels = out_channels or net.out_channels
            f = int(getattr(net, "features", 32))
            strategy = SharedEncoderForward(passes, self.margin, x.shape[1], out_channels, f)
        else:
            strategy = PlainForward(passes, self.margin)
            if self.overlap > 1 and self.mode == "paper":
                count = self.coverage_count(x.shape[2:], passes[0].tile_size).to(out_device)
        executor = TileExecutor(
            self.margin,
            self.padding_mode,
            self.pad_value,
            self.activation,
            self._prec.channels_last,
            autocast_for(device, self._prec.dtype, cast),
            functools.partial(progress_bar, self.progress, self.name),
        )
        return executor.run(
            x,
            net,
            strategy,
            mask,
            device,
            out_device,
            cast,
            out_channels,
            sw_batch_size or self.sw_batch_size,
            averaged=self.overlap > 1,
            count=count,
        )

    def _can_share(self, net: Callable) -> bool:
        """Whether the R passes of this call can share the encoder (:meth:`ValidUNet3D.phase_shared_forward`)."""
        return (
            self.share_encoder
            and self.mode == "aligned"
            and self.overlap > 1
            and isinstance(net, ValidUNet3D)
            and (self.align, self.margin) == (net.align, net.margin) == (8, 44)
        )


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


def _check_arguments(
    mode, tile_size, overlap, padding_mode, activation, sw_batch_size, align, min_output, tile_overhead
) -> tuple[int, ...] | None:
    """The constructor's checks (a ``ValueError`` naming the argument); returns ``tile_size`` as a tuple or None."""
    if mode not in ("aligned", "paper"):
        raise ValueError(f"mode must be 'aligned' or 'paper', got {mode!r}")
    if int(overlap) not in ALIGNED_SHIFTS:
        raise ValueError(f"overlap must be one of {sorted(ALIGNED_SHIFTS)}, got {overlap!r}")
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
    if float(tile_overhead) < 0:
        raise ValueError(f"tile_overhead must be >= 0, got {tile_overhead}")
    if mode == "paper":
        tile = tile_size or PAPER_TILE
        if not all(TileGrid(mode, int(overlap), int(min_output), int(align)).is_valid_output(t) for t in tile):
            raise ValueError(f"paper-mode tile sizes must be {min_output} + {align} k (e.g. 44, 28), got {tile}")
    return tile_size


def _checked_inputs(inputs, network, mask, inf: ValidTiledInferer) -> tuple:
    """(image as a float tensor, the network to run, boolean mask or None, MetaTensor metadata or None) of a call,
    after the checks of shapes, mask and margin."""
    if inputs.dim() != 5:
        raise ValueError(f"inputs must be (B, C, X, Y, Z), got shape {tuple(inputs.shape)}")
    batch, _, *spatial = inputs.shape
    if isinstance(network, torch.nn.parallel.DistributedDataParallel):
        # tiles skipped by the mask differ between ranks: DDP's per-forward buffer broadcast would deadlock
        network = network.module
    if inf.mask_from_last_channel:
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
        if isinstance(got, int) and got != getattr(inf, name):
            raise ValueError(f"network {name} = {got} but inferer {name} = {getattr(inf, name)}")
    meta_src = MetaTensor([]).copy_meta_from(inputs, copy_attr=False) if isinstance(inputs, MetaTensor) else None
    x = inputs.as_subclass(torch.Tensor) if isinstance(inputs, torch.Tensor) else torch.as_tensor(inputs)
    if not x.is_floating_point():
        x = x.float()

    return x, network, mask, meta_src


def _output_device(output_device: str | None, input_device: torch.device, out_bytes: int) -> torch.device:
    """``output_device``, else the input's device, falling back to the CPU when the output does not fit in free
    CUDA memory."""
    out_device = torch.device(output_device) if output_device else input_device
    if output_device is None and out_device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(out_device)
        if out_bytes > 0.5 * free:
            out_device = torch.device("cpu")
    return out_device


def _call_stats(
    inf: ValidTiledInferer, stats, passes, network, shape, device, out_device, folded, fallbacks, t0
) -> dict:
    """``last_stats`` of a call: the executor's ``stats`` with the FLOPs, the plan, the devices and the precision."""
    flops_fn = getattr(network, "flops", None)
    tile_flops = [flops_fn([t + 2 * inf.margin for t in p.tile_size]) if callable(flops_fn) else None for p in passes]
    flops = stats.pop("flops", None)  # a shared-encoder run counts its own
    runs_per_pass = stats.pop("runs_per_pass")
    if flops is None and all(f is not None for f in tile_flops):
        flops = sum(f * n for f, n in zip(tile_flops, runs_per_pass, strict=True))
    n_vox = math.prod(shape[:1] + shape[2:])
    stats.update(
        mode=inf.mode,
        overlap=inf.overlap,
        passes=len(passes),
        tile_size=list(passes[0].tile_size),
        input_tile_size=[t + 2 * inf.margin for t in passes[0].tile_size],
        flops=flops,
        flops_per_voxel=None if flops is None else flops / n_vox,
        device=str(device),
        output_device=str(out_device),
        dtype=str(inf._prec.dtype).replace("torch.", ""),
        channels_last=inf._prec.channels_last,
        precision={**inf._prec.as_dict(), "amp": inf.amp, "fold_bn": folded},
        folded_bn=folded,
        oom_fallbacks=fallbacks,
        seconds=time.perf_counter() - t0,
    )
    return stats
