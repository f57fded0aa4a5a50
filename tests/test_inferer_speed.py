"""Speed lever of the tiled inferer: the encoder shared by the pooling-phase passes of ``overlap`` (exactness, cost).
The other lever, the mask-aware tile choice, is tested in test_tile_choice.py."""

from __future__ import annotations

import unittest

import pytest
import torch
from parameterized import parameterized

from custom.inferer import ValidTiledInferer
from custom.network import ValidUNet3D
from tests.test_network import randomize_bn

torch.manual_seed(0)
NET2 = randomize_bn(ValidUNet3D(out_channels=3, features=2), 2).eval()  # the narrowest net: these tests run many tiles


def blobs(size, boxes) -> torch.Tensor:
    """(1, 1, *size) bool mask with the given boxes ((x0, x1), (y0, y1), (z0, z1)) set."""
    m = torch.zeros(1, 1, *size, dtype=torch.bool)
    for (x0, x1), (y0, y1), (z0, z1) in boxes:
        m[0, 0, x0:x1, y0:y1, z0:z1] = True
    return m


class TestSharedEncoder(unittest.TestCase):
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


if __name__ == "__main__":
    unittest.main()
