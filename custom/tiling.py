"""The tiling plan of :class:`custom.inferer.ValidTiledInferer`: which output tiles, where, for which pass.

Pure arithmetic on tuples (and a numpy coverage count): nothing here runs a network. Two modes (details in
``bundle/docs/tiling.md``):

- ``"aligned"``: output tiles whose offsets are multiples of ``align`` (8, the pooling period) from the padded
  volume's origin, rebalanced per axis so that the tiles cover the domain with the least overlap. With ``overlap=R``
  the R passes are shifted by ``align / 2`` on chosen axes (:data:`ALIGNED_SHIFTS`) and all cover the same domain,
  grown by ``align / 2``, so that they share one tile grid (each pass's tiles are pass 0's, shifted).
- ``"paper"``: the paper's fixed tiles (:data:`PAPER_TILE`), non-overlapping, or with the stride halved on the axes
  of :data:`PAPER_HALVED` (R = 4 is the paper's "4x sampling").

>>> grid = TileGrid(mode="aligned")
>>> p = grid.plan((170, 90, 20), (100, 100, 100))[0]  # a wanted 100 on a 172-voxel domain: 2 tiles of 92
>>> p.tile_size, sorted({st[0] for st in p.starts})
((92, 92, 20), [0, 80])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ALIGNED_SHIFTS", "PAPER_HALVED", "PAPER_TILE", "TileGrid", "TilePass", "grid_shared", "valid_outputs_from"]

#: The paper's output tile (x, y, z); its input is 132x132x116.
PAPER_TILE = (44, 44, 28)
#: Tiling-origin shifts (in units of ``align / 2``, per axis) of the R passes of aligned mode: balanced so that each
#: axis is shifted in half of the passes.
ALIGNED_SHIFTS = {
    1: [(0, 0, 0)],
    2: [(0, 0, 0), (1, 1, 1)],
    4: [(0, 0, 0), (1, 1, 0), (1, 0, 1), (0, 1, 1)],
    8: [(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)],
}
#: Axes whose stride is halved in paper mode, by overlap factor (the paper's 4x: x and y).
PAPER_HALVED = {1: (), 2: (0,), 4: (0, 1), 8: (0, 1, 2)}


def valid_outputs_from(m: int, min_output: int, align: int) -> int:
    """Smallest valid output size >= m (valid output sizes are min_output + align * k)."""
    return min_output + max(0, math.ceil((m - min_output) / align)) * align


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


def grid_shared(passes: list[TilePass]) -> bool:
    """All passes hold the same tiles, shifted by their shift (true for :meth:`TileGrid.plan` with R > 1)."""
    p0 = passes[0]
    return p0.shift == (0, 0, 0) and all(
        p.tile_size == p0.tile_size
        and len(p.starts) == len(p0.starts)
        and all(tuple(g[a] - p.shift[a] for a in range(3)) == st for g, st in zip(p0.starts, p.starts, strict=True))
        for p in passes
    )


@dataclass(frozen=True)
class TileGrid:
    """The tiling rules of one inferer: ``mode``, ``overlap`` R and the network's size arithmetic (valid output sizes
    ``min_output + align * k``)."""

    mode: str = "aligned"
    overlap: int = 1
    min_output: int = 4
    align: int = 8

    def is_valid_output(self, t: int) -> bool:
        return t >= self.min_output and (t - self.min_output) % self.align == 0

    def round_down_output(self, t: int) -> int:
        return max(self.min_output, self.min_output + ((t - self.min_output) // self.align) * self.align)

    def min_tile(self) -> int:
        """Smallest output tile that tiles a larger domain (its stride must be at least ``align``)."""
        return valid_outputs_from(self.align, self.min_output, self.align)

    def ext(self) -> int:
        """Extra domain per axis: ``align / 2`` when passes are shifted (R > 1), so that all passes share one grid."""
        return self.align // 2 if self.mode == "aligned" and self.overlap > 1 else 0

    def domain(self, n: int) -> int:
        """Output domain (aligned mode) of an axis of ``n`` voxels: the smallest valid output >= ``n + ext``."""
        return valid_outputs_from(n + self.ext(), self.min_output, self.align)

    def shifts(self) -> list[tuple[int, ...]]:
        """Tiling-origin shifts (voxels) of the aligned passes."""
        half = self.align // 2
        return [tuple(half * s for s in shift) for shift in ALIGNED_SHIFTS[self.overlap]]

    def plan(self, spatial_size: Sequence[int], tile_size: Sequence[int] | None = None) -> list[TilePass]:
        """The passes and tiles for an image of ``spatial_size`` (x, y, z), before any mask is applied.

        ``tile_size``: paper mode: the tile (default :data:`PAPER_TILE`); aligned mode: the wanted output tile
        (default: the volume), rebalanced per axis so that the tiles cover the domain with the least overlap.
        """
        size = tuple(int(s) for s in spatial_size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"spatial_size must be 3 positive sizes, got {spatial_size}")
        if self.mode == "paper":
            return [self._plan_paper(size, tuple(tile_size or PAPER_TILE))]
        wanted = tuple(tile_size or size)
        return [self._plan_aligned(size, wanted, shift) for shift in self.shifts()]

    def _plan_aligned(self, size: tuple[int, ...], wanted: tuple[int, ...], shift: tuple[int, ...]) -> TilePass:
        # Output domain of the pass: image coordinates [-shift, -shift + M), M = smallest valid output >= size + ext
        # (ext = align / 2 >= shift when R > 1, else 0): every pass has the same tiles, shifted by -shift. Tiles start
        # at multiples of `align` from the domain origin; the last one ends at M (also a multiple of align away, since
        # M and the tile size are both min_output mod align).
        axes_starts, axes_write, tiles = [], [], []
        for n, w, s in zip(size, wanted, shift, strict=True):
            t, starts, write = self.axis_plan(n, w, s)
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

    def axis_plan(self, n: int, wanted: int, s: int) -> tuple[int, list[int], list[tuple[int, int]]]:
        """One axis of an aligned pass: (tile size, tile starts, write regions), both in image coordinates, for an
        axis of ``n`` voxels, a wanted tile size and a tiling-origin shift ``s``."""
        dom = self.domain(n)
        t = min(dom, max(self.round_down_output(int(wanted)), self.min_tile()))
        count = 1 if t >= dom else math.ceil((dom - t) / ((t // self.align) * self.align)) + 1
        t = self.tile_for_count(dom, count)  # rebalance: the smallest tile that covers with `count` tiles
        stride = (t // self.align) * self.align
        starts = [min(k * stride, dom - t) for k in range(count)]
        bounds = starts[1:] + [dom]
        write = [(max(a - s, 0), min(b - s, n)) for a, b in zip(starts, bounds, strict=True)]
        keep = [i for i, (a, b) in enumerate(write) if b > a]
        return t, [starts[i] - s for i in keep], [write[i] for i in keep]

    def _plan_paper(self, size: tuple[int, ...], tile: tuple[int, ...]) -> TilePass:
        bad = [t for t in tile if not self.is_valid_output(int(t))]
        if bad:
            raise ValueError(f"paper-mode tile sizes must be {self.min_output} + {self.align} k, got {tile}")
        halved = PAPER_HALVED[self.overlap]
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

    def coverage_count(self, spatial_size: Sequence[int], tile_size: Sequence[int] | None = None) -> np.ndarray:
        """How many predictions are averaged at each voxel (int32, shape ``spatial_size``), from :meth:`plan`."""
        count = np.zeros(tuple(int(s) for s in spatial_size), dtype=np.int32)
        for p in self.plan(spatial_size, tile_size):
            for w in p.write:
                count[w[0][0] : w[0][1], w[1][0] : w[1][1], w[2][0] : w[2][1]] += 1
        return count

    def tile_for_count(self, dom: int, count: int) -> int:
        """Smallest valid tile such that ``count`` tiles at multiple-of-``align`` offsets cover ``dom`` voxels."""
        if count <= 1:
            return dom
        t = self.min_tile()
        while (count - 1) * ((t // self.align) * self.align) + t < dom:
            t += self.align
        return t

    def axis_options(self, dom: int) -> list[tuple[int, int]]:
        """(tile count, tile size) pairs along one axis, by ascending count and strictly descending tile size."""
        opts: list[tuple[int, int]] = []
        count = 1
        while True:
            t = self.tile_for_count(dom, count)
            if not opts or t < opts[-1][1]:
                opts.append((count, t))
            if t <= self.min_tile():
                return opts
            count += 1

    def halved_tile(self, tile: Sequence[int]) -> tuple[int, ...] | None:
        """Output tile with every axis halved (rounded down to a valid size, at least the smallest tile), or None
        when no axis can shrink."""
        min_tile = self.min_tile()
        new = tuple(max(min_tile, self.round_down_output(t // 2)) if t > min_tile else t for t in tile)
        return None if new == tuple(tile) else new
