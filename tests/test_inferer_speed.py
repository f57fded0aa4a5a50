"""Speed levers of the tiled inferer: mask-aware tile choice (cost, optimality, exactness) and the compile flag."""

from __future__ import annotations

import itertools
import unittest

import torch
from parameterized import parameterized

from custom.inferer import ValidTiledInferer
from custom.network import forward_flops
from tests.test_inferer import NET, one_pass


def blobs(size, boxes) -> torch.Tensor:
    """(1, 1, *size) bool mask with the given boxes ((x0, x1), (y0, y1), (z0, z1)) set."""
    m = torch.zeros(1, 1, *size, dtype=torch.bool)
    for (x0, x1), (y0, y1), (z0, z1) in boxes:
        m[0, 0, x0:x1, y0:y1, z0:z1] = True
    return m


def run_cost(inferer, size, tile, mask, overhead, features=32) -> tuple[float, int]:
    """Reference cost by brute force: plan every pass, test every tile's write region against the mask."""
    total, runs = 0.0, 0
    over = overhead * forward_flops((100, 100, 100), 1, 8, features)  # relative to the smallest tile (input 100^3)
    for p in inferer.plan(size, tile):
        f = forward_flops([t + 88 for t in p.tile_size], 1, 8, features) + over
        for w in p.write:
            if bool(mask[0, 0, w[0][0] : w[0][1], w[1][0] : w[1][1], w[2][0] : w[2][1]].any()):
                total += f
                runs += 1
    return total, runs


TWO_BLOBS = [((20, 40), (30, 50), (10, 30)), ((150, 170), (120, 140), (100, 120))]
# size, mask boxes, overlap R, per-tile overhead (x FLOPs of the smallest tile)
SMALL_CASES = [
    ((64, 56, 44), [((10, 30), (5, 25), (5, 20))], 1, 0.75),
    ((64, 56, 44), [((10, 30), (5, 25), (5, 20))], 4, 0.0),
    ((90, 70, 60), [((0, 90), (30, 40), (50, 60))], 2, 0.5),  # a rod along x
    ((72, 60, 44), [((0, 72), (0, 60), (0, 44))], 1, 0.75),  # full mask: same as the unmasked choice
]


class TestMaskAwareTileChoice(unittest.TestCase):
    @parameterized.expand(SMALL_CASES)
    def test_optimal_among_all_tilings(self, size, boxes, r, overhead):
        mask = blobs(size, boxes)
        inf = ValidTiledInferer(overlap=r, tile_overhead=overhead)
        budget = 8 * 2**30
        unmasked = inf.choose_tile_size(size, budget, features=32, elem_bytes=2)
        masked = inf.choose_tile_size(size, budget, features=32, elem_bytes=2, mask=mask)
        # brute force over every combination of per-axis tilings
        from custom.inferer import _valid_outputs_from

        options = [[t for _, t in inf._axis_options(_valid_outputs_from(n, 4, 8))] for n in size]
        costs = {t: run_cost(inf, size, t, mask, overhead)[0] for t in itertools.product(*options)}
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
        cost = inf._masked_cost(two, size)
        flops = lambda t: float(forward_flops([x + 88 for x in t]))  # noqa: E731
        c2, n2 = cost((44, 44, 44), flops, 0.0)
        c1, n1 = inf._masked_cost(one, size)((44, 44, 44), flops, 0.0)
        self.assertEqual((n2, c2), (2 * n1, 2 * c1))

    @parameterized.expand([(1,), (4,)])
    def test_mask_aware_result_is_exact(self, r):
        """Tiles chosen for a sparse mask: inside it the result equals the one-pass result (or the R-phase mean)."""
        size = (70, 52, 40)
        x = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(3))
        mask = blobs(size, [((2, 9), (3, 10), (2, 8)), ((55, 66), (40, 50), (30, 38))])
        aware = ValidTiledInferer(overlap=r, amp=False, memory_budget_mb=1e6, tile_overhead=0.0)
        plain = ValidTiledInferer(overlap=r, amp=False, memory_budget_mb=1e6, tile_overhead=0.0, mask_aware=False)
        got = aware(x, NET, mask=mask).as_tensor()
        ref_plain = plain(x, NET, mask=mask).as_tensor()
        # the mask changed the tiling: smaller tiles, fewer FLOPs
        self.assertLess(max(aware.last_stats["tile_size"]), max(plain.last_stats["tile_size"]))
        self.assertLess(aware.last_stats["flops"], plain.last_stats["flops"])
        shifts = {1: [(0, 0, 0)], 4: [(0, 0, 0), (4, 4, 0), (4, 0, 4), (0, 4, 4)]}[r]
        ref = sum(one_pass(NET, x, shift=s) for s in shifts) / len(shifts)
        m = mask.expand_as(got)
        torch.testing.assert_close(got[m], ref[m], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, ref_plain, rtol=1e-5, atol=1e-6)

    def test_bad_overhead(self):
        with self.assertRaises(ValueError):
            ValidTiledInferer(tile_overhead=-1)


if __name__ == "__main__":
    unittest.main()
