"""Speed levers of the tiled inferer: mask-aware tile choice (cost, optimality, exactness) and the encoder shared by
the pooling-phase passes of ``overlap`` (exactness, cost)."""

from __future__ import annotations

import itertools
import unittest

import pytest
import torch
from parameterized import parameterized

from custom.inferer import ValidTiledInferer, encoder_flops, shared_encoder_forward
from custom.network import ValidUNet3D, forward_flops
from tests.test_inferer import one_pass
from tests.test_network import randomize_bn

torch.manual_seed(0)
NET2 = randomize_bn(ValidUNet3D(out_channels=3, features=2), 2).eval()  # the narrowest net: these tests run many tiles


def blobs(size, boxes) -> torch.Tensor:
    """(1, 1, *size) bool mask with the given boxes ((x0, x1), (y0, y1), (z0, z1)) set."""
    m = torch.zeros(1, 1, *size, dtype=torch.bool)
    for (x0, x1), (y0, y1), (z0, z1) in boxes:
        m[0, 0, x0:x1, y0:y1, z0:z1] = True
    return m


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
        from custom.inferer import _valid_outputs_from

        ext = 4 if r > 1 else 0
        options = [[t for _, t in inf._axis_options(_valid_outputs_from(n + ext, 4, 8))] for n in size]
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
        h2, h1 = inf._tile_hits(two, size)((44, 44, 44)), inf._tile_hits(one, size)((44, 44, 44))
        self.assertEqual(h2.shape[:2], (1, 2))  # (passes, batch, cx, cy, cz)
        self.assertEqual(int(h2.sum()), 2 * int(h1.sum()))
        self.assertIsNone(inf._tile_hits(torch.zeros(1, 1, *size), size))

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


class TestSharedEncoder(unittest.TestCase):
    @parameterized.expand([("cicek",), ("prototxt",)])
    def test_equals_network_on_each_crop(self, layout):
        torch.manual_seed(0)
        net = randomize_bn(ValidUNet3D(out_channels=3, features=2, layout=layout), 1).eval()
        size = (92, 100, 92)
        x = torch.randn(1, 1, *(n + 4 for n in size))
        offsets = list(itertools.product((0, 4), repeat=3))
        with torch.no_grad():
            got = shared_encoder_forward(net, x, offsets, size)
            for d, g in zip(offsets, got, strict=True):
                ref = net(x[:, :, d[0] : d[0] + size[0], d[1] : d[1] + size[1], d[2] : d[2] + size[2]])
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)
            # the two phases of the third pooling really differ
            self.assertGreater((got[0] - got[-1]).abs().max().item(), 1e-3)
        with self.assertRaises(ValueError):
            shared_encoder_forward(net, x, [(2, 0, 0)], size)

    @parameterized.expand([(2, 1, None), (4, 2, "mask")])
    def test_inferer_shared_equals_unshared(self, r, sw_batch, masked):
        self._check_shared(r, sw_batch, masked)

    @pytest.mark.slow
    def test_inferer_shared_equals_unshared_r8(self):
        self._check_shared(8, 1, "mask")

    def _check_shared(self, r, sw_batch, masked):
        size = (30, 14, 10) if masked else (24, 14, 10)
        mask = None
        if masked:  # two items, one small blob each: a few tiles run, some passes skip
            mask = torch.cat([blobs(size, [((0, 6), (0, 5), (0, 4))]), blobs(size, [((22, 30), (9, 14), (7, 10))])])
        if r == 8:
            mask = mask[1:]
        x = torch.randn(1 if mask is None else len(mask), 1, *size, generator=torch.Generator().manual_seed(5))
        kw = {"overlap": r, "amp": False, "tile_size": (20, 20, 12), "sw_batch_size": sw_batch}
        shared = ValidTiledInferer(**kw)
        plain = ValidTiledInferer(share_encoder=False, **kw)
        a = shared(x, NET2, mask=mask).as_tensor()
        b = plain(x, NET2, mask=mask).as_tensor()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        sa, sb = shared.last_stats, plain.last_stats
        self.assertTrue(sa["shared_encoder"])
        self.assertNotIn("shared_encoder", sb)
        self.assertEqual((sa["tiles_run"], sa["tiles_skipped"]), (sb["tiles_run"], sb["tiles_skipped"]))
        self.assertLess(sa["flops"], 0.75 * sb["flops"])
        if masked:
            self.assertGreater(sa["tiles_skipped"], 0)

    @parameterized.expand([((61, 40, 33), (20, 28, 12)), ((5, 9, 3), (44, 44, 28)), ((130, 70, 50), (44, 36, 20))])
    def test_passes_share_one_grid(self, size, tile):
        for r in (2, 4, 8):
            passes = ValidTiledInferer(overlap=r, tile_size=tile).plan(size)
            self.assertTrue(ValidTiledInferer._grid_shared(passes), (size, tile, r))
            self.assertEqual(len({p.tile_size for p in passes}), 1)
