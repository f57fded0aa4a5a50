"""custom.tile_choice: the tile choice under a memory budget (FLOPs, element cap) and for a mask (cost, optimality
against brute force, exactness of the result)."""

from __future__ import annotations

import itertools
import math
import unittest

import torch
from parameterized import parameterized

from custom.inferer import ValidTiledInferer, estimate_tile_bytes, max_activation_elements
from custom.network import forward_flops
from custom.tile_choice import encoder_flops, tile_hits
from custom.tiling import TileGrid, valid_outputs_from
from tests.test_inferer import one_pass
from tests.test_inferer_speed import NET2, blobs


def run_cost(inferer, size, tile, mask, overhead, features=32, shared=False) -> tuple[float, int]:
    """Reference cost by brute force: plan every pass, test every tile's write region against the mask. ``shared``:
    a tile that runs for any pass pays its encoder once (input 4 larger), the rest once per pass."""
    runs, tiles = 0, set()
    over = overhead * forward_flops((100, 100, 100), 1, 8, features)  # relative to the smallest tile (input 100^3)
    passes = inferer.plan(size, tile)
    ins = [t + 88 for t in passes[0].tile_size]
    for p in passes:
        for k, w in enumerate(p.write):
            if bool(mask[0, 0, w[0][0] : w[0][1], w[1][0] : w[1][1], w[2][0] : w[2][1]].any()):
                runs += 1
                tiles.add(k)
    full = forward_flops(ins, 1, 8, features)
    if not shared:
        return runs * (full + over), runs
    enc = encoder_flops([i + 4 for i in ins], 1, features)
    return len(tiles) * enc + runs * (full - encoder_flops(ins, 1, features) + over), runs


TWO_BLOBS = [((20, 40), (30, 50), (10, 30)), ((150, 170), (120, 140), (100, 120))]
# size, mask boxes, overlap R, per-tile overhead (x FLOPs of the smallest tile)
SMALL_CASES = [
    ((64, 56, 44), [((10, 30), (5, 25), (5, 20))], 1, 0.75, False),
    ((64, 56, 44), [((10, 30), (5, 25), (5, 20))], 4, 0.0, False),
    ((64, 56, 44), [((10, 30), (5, 25), (5, 20)), ((50, 60), (40, 50), (30, 40))], 4, 0.75, True),
    ((90, 70, 60), [((0, 90), (30, 40), (50, 60))], 2, 0.5, True),  # a rod along x
    ((72, 60, 44), [((0, 72), (0, 60), (0, 44))], 1, 0.75, False),  # full mask: same as the unmasked choice
]


class TestBudgetTileChoice(unittest.TestCase):
    def test_memory_budget_chooses_tiles(self):
        inferer = ValidTiledInferer()
        size = (256, 256, 250)
        self.assertEqual(inferer.choose_tile_size((250, 250, 200), 1e15, features=4), (252, 252, 204))  # one tile
        previous = None
        for gb in (1, 2, 4, 8):
            budget = gb * 2**30
            tile = inferer.choose_tile_size(size, budget, features=32, elem_bytes=2)
            self.assertTrue(all(t % 8 == 4 for t in tile), tile)
            ins = [t + 88 for t in tile]
            self.assertLessEqual(estimate_tile_bytes(ins, features=32, elem_bytes=2), budget)
            total = len(inferer.plan(size, tile)[0].starts) * forward_flops(ins)
            if previous is not None:
                self.assertLessEqual(total, previous)  # more memory never costs more FLOPs
            previous = total
            if gb == 4:  # the CPU default: 8 tiles of 132^3, 3.2 MFLOP per voxel (paper tiles: 9.7 per output voxel)
                self.assertEqual(tile, (132, 132, 132))
                self.assertLess(total / math.prod(size), 3.3e6)
        self.assertEqual(inferer.choose_tile_size(size, 1.0, features=32), (12, 12, 12))

    def test_element_cap(self):
        tile = ValidTiledInferer().choose_tile_size((600, 600, 600), 1e15, features=32)
        self.assertLessEqual(max_activation_elements([t + 88 for t in tile], 32), 2**31 - 1)


class TestMaskAwareTileChoice(unittest.TestCase):
    @parameterized.expand(SMALL_CASES)
    def test_optimal_among_all_tilings(self, size, boxes, r, overhead, shared):
        mask = blobs(size, boxes)
        inf = ValidTiledInferer(overlap=r, tile_overhead=overhead)
        budget = 8 * 2**30
        kw = {"features": 32, "elem_bytes": 2, "shared": shared}
        unmasked = inf.choose_tile_size(size, budget, **kw)
        masked = inf.choose_tile_size(size, budget, mask=mask, **kw)
        # brute force over every combination of per-axis tilings
        ext = 4 if r > 1 else 0
        grid = TileGrid(overlap=r)
        options = [[t for _, t in grid.axis_options(valid_outputs_from(n + ext, 4, 8))] for n in size]
        costs = {t: run_cost(inf, size, t, mask, overhead, shared=shared)[0] for t in itertools.product(*options)}
        self.assertAlmostEqual(costs[masked] / min(costs.values()), 1.0, places=9)
        self.assertLessEqual(costs[masked], costs[unmasked])
        if boxes == [((0, size[0]), (0, size[1]), (0, size[2]))]:
            self.assertEqual(masked, unmasked)

    @parameterized.expand([(1, 0.0), (4, 0.75)])
    def test_sparse_mask_large_volume(self, r, overhead):
        """Two small blobs far apart in 200x180x150: small tiles around each beat large tiles over both."""
        size = (200, 180, 150)
        mask = blobs(size, TWO_BLOBS)
        inf = ValidTiledInferer(overlap=r, tile_overhead=overhead)
        unmasked = inf.choose_tile_size(size, 8 * 2**30, features=32, elem_bytes=2)
        masked = inf.choose_tile_size(size, 8 * 2**30, features=32, elem_bytes=2, mask=mask)
        c_un, _ = run_cost(inf, size, unmasked, mask, overhead)
        c_m, n_m = run_cost(inf, size, masked, mask, overhead)
        self.assertLess(c_m, 0.6 * c_un)
        self.assertLess(max(masked), max(unmasked))
        self.assertGreaterEqual(n_m, 2 * r)  # at least one tile per blob and pass

    def test_empty_mask_and_batch_union(self):
        size = (120, 100, 90)
        inf = ValidTiledInferer()
        unmasked = inf.choose_tile_size(size, 8 * 2**30, features=32)
        self.assertEqual(inf.choose_tile_size(size, 8 * 2**30, features=32, mask=torch.zeros(1, 1, *size)), unmasked)
        # per-item masks are costed per item: the same blob in both items costs twice one item, same tile
        one = blobs(size, [((10, 20), (10, 20), (10, 20))])
        two = torch.cat([one, one])
        self.assertEqual(
            inf.choose_tile_size(size, 8 * 2**30, features=32, mask=one),
            inf.choose_tile_size(size, 8 * 2**30, features=32, mask=two),
        )
        h2, h1 = tile_hits(TileGrid(), two, size)((44, 44, 44)), tile_hits(TileGrid(), one, size)((44, 44, 44))
        self.assertEqual(h2.shape[:2], (1, 2))  # (passes, batch, cx, cy, cz)
        self.assertEqual(int(h2.sum()), 2 * int(h1.sum()))
        self.assertIsNone(tile_hits(TileGrid(), torch.zeros(1, 1, *size), size))

    @parameterized.expand([(1,), (4,)])
    def test_mask_aware_result_is_exact(self, r):
        """Tiles chosen for a sparse mask: inside it the result equals the one-pass result (or the R-phase mean)."""
        size = (70, 52, 40)
        x = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(3))
        mask = blobs(size, [((2, 9), (3, 10), (2, 8)), ((55, 66), (40, 50), (30, 38))])
        aware = ValidTiledInferer(overlap=r, amp=False, memory_budget_mb=1e6, tile_overhead=0.0)
        plain = ValidTiledInferer(overlap=r, amp=False, memory_budget_mb=1e6, tile_overhead=0.0, mask_aware=False)
        got = aware(x, NET2, mask=mask).as_tensor()
        ref_plain = plain(x, NET2, mask=mask).as_tensor()
        # the mask changed the tiling: smaller tiles, fewer FLOPs
        self.assertLess(max(aware.last_stats["tile_size"]), max(plain.last_stats["tile_size"]))
        self.assertLess(aware.last_stats["flops"], plain.last_stats["flops"])
        shifts = {1: [(0, 0, 0)], 4: [(0, 0, 0), (4, 4, 0), (4, 0, 4), (0, 4, 4)]}[r]
        ref = sum(one_pass(NET2, x, shift=s) for s in shifts) / len(shifts)
        m = mask.expand_as(got)
        torch.testing.assert_close(got[m], ref[m], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, ref_plain, rtol=1e-5, atol=1e-6)

    def test_bad_overhead(self):
        with self.assertRaises(ValueError):
            ValidTiledInferer(tile_overhead=-1)


if __name__ == "__main__":
    unittest.main()
