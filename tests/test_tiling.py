"""custom.tiling: aligned and paper plans (tile sizes, starts, coverage counts, the grid shared by the passes)."""

from __future__ import annotations

import unittest

import numpy as np
from parameterized import parameterized

from custom.inferer import ValidTiledInferer
from custom.tiling import TileGrid, grid_shared


class TestAlignedPlan(unittest.TestCase):
    @parameterized.expand([(1,), (2,), (4,), (8,)])
    def test_aligned_coverage_is_exactly_r(self, r):
        inferer = ValidTiledInferer(overlap=r, tile_size=(20, 28, 12))
        count = inferer.coverage_count((61, 40, 33))
        self.assertTrue(bool((count == r).all()), f"coverage values {count.unique().tolist()}")
        passes = inferer.plan((61, 40, 33))
        self.assertEqual(len({p.shift for p in passes}), r)
        for p in passes:
            self.assertTrue(all(t % 8 == 4 for t in p.tile_size))
            for st in p.starts:  # tile offsets are multiples of 8 from the pass's padded origin (-shift)
                self.assertTrue(all((o + s) % 8 == 0 for o, s in zip(st, p.shift, strict=True)))

    def test_tiles_rebalanced(self):
        """A wanted tile of 100 on a 172-voxel domain becomes 2 tiles of 92 (least overlap), not 100 + 100."""
        p = ValidTiledInferer(tile_size=(100, 100, 100)).plan((170, 90, 20))[0]
        self.assertEqual(p.tile_size, (92, 92, 20))
        self.assertEqual(sorted({st[0] for st in p.starts}), [0, 80])

    @parameterized.expand([((61, 40, 33), (20, 28, 12)), ((5, 9, 3), (44, 44, 28)), ((130, 70, 50), (44, 36, 20))])
    def test_passes_share_one_grid(self, size, tile):
        for r in (2, 4, 8):
            passes = ValidTiledInferer(overlap=r, tile_size=tile).plan(size)
            self.assertTrue(grid_shared(passes), (size, tile, r))
            self.assertEqual(len({p.tile_size for p in passes}), 1)

    def test_inferer_delegates_to_the_grid(self):
        inf = ValidTiledInferer(overlap=4, tile_size=(20, 28, 12))
        grid = TileGrid(overlap=4)
        self.assertEqual(inf.plan((61, 40, 33)), grid.plan((61, 40, 33), (20, 28, 12)))
        np.testing.assert_array_equal(
            inf.coverage_count((61, 40, 33)).numpy(), grid.coverage_count((61, 40, 33), (20, 28, 12))
        )
        self.assertEqual(grid.halved_tile((92, 20, 12)), (44, 12, 12))
        self.assertIsNone(grid.halved_tile((12, 12, 12)))


class TestPaperTiling(unittest.TestCase):
    @parameterized.expand([((256, 256, 250), 1, 324), ((256, 256, 250), 4, 1089), ((100, 50, 28), 1, 6)])
    def test_tile_counts(self, size, r, n):
        """REFERENCE.md section 3: 324 non-overlapping and 1089 4x-overlap tiles on 256x256x250."""
        passes = ValidTiledInferer(mode="paper", overlap=r).plan(size)
        self.assertEqual(len(passes[0].starts), n)
        self.assertEqual(passes[0].tile_size, (44, 44, 28))

    def test_non_overlapping_covers_once(self):
        count = ValidTiledInferer(mode="paper").coverage_count((100, 50, 60))
        self.assertTrue(bool((count == 1).all()))

    @parameterized.expand([(2, (0,)), (4, (0, 1)), (8, (0, 1, 2))])
    def test_overlap_covers_interior_r_times(self, r, halved):
        size, tile = (120, 100, 70), (44, 44, 28)
        count = ValidTiledInferer(mode="paper", overlap=r).coverage_count(size)
        # interior of a halved axis: from half a tile to one tile before the end (the first and last half tiles are
        # sampled once on that axis, as in the paper's tiling that starts at the image corner)
        inner = tuple(
            slice(t // 2, n - t) if a in halved else slice(None)
            for a, (n, t) in enumerate(zip(size, tile, strict=True))
        )
        self.assertEqual(int(count[inner].min()), r)
        self.assertEqual(int(count[inner].max()), r)
        self.assertEqual(int(count.min()), 1)
        self.assertEqual(int(count.max()), r)


if __name__ == "__main__":
    unittest.main()
