"""The cost and memory model of tiled inference and the tile choice built on it (aligned mode).

- :func:`estimate_tile_bytes` and :func:`max_activation_elements`: what one batch of tiles needs in memory;
- :func:`encoder_flops` (with :func:`custom.network.forward_flops`): what it costs, also when the R pooling-phase
  passes share the encoder (:meth:`custom.network.ValidUNet3D.phase_shared_forward`);
- :func:`choose_tile_size`: the tile with the least total cost that fits a budget, counting (with a mask) only the
  tiles that run (:func:`tile_hits`: the mask's occupancy per tile of every pass);
- :func:`default_budget_bytes`: the budget when none is given.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from custom.network import forward_flops
from custom.tiling import TileGrid

__all__ = [
    "available_ram_bytes",
    "choose_tile_size",
    "default_budget_bytes",
    "encoder_flops",
    "estimate_tile_bytes",
    "max_activation_elements",
    "tile_hits",
]

MAX_ELEMENTS = 2**31 - 1  # largest single activation kept below int32 indexing limits of some kernels
#: Mask-aware tile choice: at most this many tiles per axis are considered (smaller tiles never pay for their halo).
MASKED_MAX_COUNT = 16


def max_activation_elements(in_size: Sequence[int], features: int = 32, batch: int = 1) -> int:
    """Elements of the largest single activation of :class:`ValidUNet3D` for an input of ``in_size``.

    Either the first skip (2f channels at ``n - 4``) or the last concatenation (6f channels at ``n - 84``).
    """
    n = [int(s) for s in in_size]
    return batch * max(2 * features * math.prod(s - 4 for s in n), 6 * features * math.prod(max(s - 84, 0) for s in n))


def encoder_flops(in_size: Sequence[int], in_channels: int = 1, features: int = 32) -> int:
    """Forward FLOPs of the encoder levels 1-3 of :class:`ValidUNet3D` (the part the pooling-phase passes share).

    ``in_size`` need not be a valid input size: an input 4 voxels larger than a tile serves the R passes of
    ``overlap`` (see :meth:`custom.network.ValidUNet3D.phase_shared_forward`).
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


def choose_tile_size(
    grid: TileGrid,
    spatial_size: Sequence[int],
    budget_bytes: float,
    *,
    margin: int = 44,
    sw_batch_size: int = 1,
    channels_last: bool = True,
    tile_overhead: float = 0.75,
    in_channels: int = 1,
    out_channels: int = 8,
    features: int = 32,
    elem_bytes: int = 4,
    folded: bool = True,
    device_type: str = "cpu",
    mask: torch.Tensor | np.ndarray | None = None,
    shared: bool = False,
) -> tuple[int, int, int]:
    """The output tile of ``grid`` (aligned mode) with the least total cost whose batch of ``sw_batch_size`` tiles
    fits ``budget_bytes`` (inputs: the tile grown by ``margin`` per side).

    For every number of tiles per axis the tile is the smallest that covers the domain (see
    :meth:`custom.tiling.TileGrid.plan`); among the combinations whose :func:`estimate_tile_bytes` fits and whose
    largest activation stays below 2**31 elements, the one with the least ``tiles x (forward_flops(tile) +
    overhead)`` wins (``overhead`` = ``tile_overhead`` x the FLOPs of the smallest tile). Without a mask every tile
    counts: large, near-cubic tiles win, because the 88-voxel halo is paid once per tile. With ``shared`` (the R
    passes share the encoder, see ``share_encoder``) a tile that runs for any pass costs its encoder once
    (:func:`encoder_flops` of the input 4 voxels larger) plus the rest of the network once per pass that runs.

    With a ``mask`` ((B, 1, X, Y, Z) or (X, Y, Z), nonzero = candidate) only the tiles that run count, over all
    passes of ``overlap`` (exactly as the plan and the run skip them): a sparse C2 skips many small tiles and few
    large ones. The combinations with up to 16 tiles per axis are tried, as is the unmasked choice, so the result
    never costs more than the unmasked one. Falls back to the smallest tile when nothing fits.
    """
    min_tile = grid.min_tile()
    size = tuple(int(n) for n in spatial_size)
    ext = grid.ext()
    doms = [grid.domain(n) for n in size]
    options = [grid.axis_options(d) for d in doms]
    n_pass = len(grid.shifts())
    shared = bool(shared) and n_pass > 1

    @functools.cache
    def tile_flops(t: tuple[int, ...]) -> float:
        return float(forward_flops([x + 2 * margin for x in t], in_channels, out_channels, features))

    overhead = tile_overhead * tile_flops((min_tile,) * 3)

    @functools.cache
    def shared_flops(t: tuple[int, ...]) -> tuple[float, float]:
        ins = [x + 2 * margin for x in t]
        enc = float(encoder_flops([i + ext for i in ins], in_channels, features))
        return enc, tile_flops(t) - encoder_flops(ins, in_channels, features)

    def total(t: tuple[int, ...], n_tiles: int, n_runs: int) -> float:
        if shared:
            enc, rest = shared_flops(t)
            return n_tiles * enc + n_runs * (rest + overhead)
        return n_runs * (tile_flops(t) + overhead)

    @functools.cache
    def fits(t: tuple[int, ...]) -> bool:
        ins = [x + 2 * margin + (ext if shared else 0) for x in t]
        est = estimate_tile_bytes(
            ins, in_channels, out_channels, features, sw_batch_size, elem_bytes, folded, channels_last, device_type
        )
        return est <= budget_bytes and max_activation_elements(ins, features, 1) <= MAX_ELEMENTS

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
    hits_of = tile_hits(grid, mask, size)
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
                if max(cx, cy, cz) > MASKED_MAX_COUNT or not fits(tile):
                    continue
                k = key(tile)
                if k < best[0]:
                    best = (k, tile)
    return best[1]


def tile_hits(grid: TileGrid, mask: torch.Tensor | np.ndarray, size: tuple[int, ...]) -> Callable | None:
    """``hits(tile) -> bool array (passes, B, cx, cy, cz)``: which tiles of ``grid.plan`` run for ``mask`` (their
    write region holds a candidate); None if the mask is empty.

    Tile boundaries of every pass fall on multiples of ``align / 2`` in image coordinates (multiples of
    ``align`` from a domain origin shifted by 0 or ``align / 2``) or on the image end, so the mask is reduced to
    a block occupancy grid once, and each tile's test is four lookups in its summed-area table.
    """
    blk = grid.align // 2
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
    shifts = grid.shifts()

    @functools.cache
    def axis(a: int, wanted: int, s: int) -> tuple[int, np.ndarray, np.ndarray]:
        t, _, write = grid.axis_plan(size[a], wanted, s)
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


def default_budget_bytes(device: torch.device, output_bytes: int, memory_budget_mb: float | None = None) -> float:
    """Memory for one batch of tiles: ``memory_budget_mb`` if given; on CUDA half of the free device memory (less the
    output's ``output_bytes``); on the CPU a quarter of the available RAM up to 4 GB (2 GB when unknown)."""
    if memory_budget_mb is not None:
        return float(memory_budget_mb) * 2**20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.5 * max(free - output_bytes, 0)
    avail = available_ram_bytes()
    return min(4 * 2**30, 0.25 * avail) if avail else 2 * 2**30


def available_ram_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (or the available physical pages), None when unknown."""
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
