"""custom.tile_executor: the one loop over tiles (plain and shared-encoder strategies give the same result), the
out-of-memory ladder, and the progress bar."""

from __future__ import annotations

import logging

import pytest
import torch

from custom.inferer import ValidTiledInferer
from custom.tile_executor import (
    PlainForward,
    SharedEncoderForward,
    TileExecutor,
    is_out_of_memory,
    run_with_fallbacks,
)
from custom.tiling import TileGrid
from tests.test_precision import make_net


@pytest.mark.parametrize("mask_box", [None, (slice(0, 9), slice(0, 6), slice(0, 4))])
def test_strategies_agree_through_the_executor(mask_box):
    """The same plan through both strategies: equal probabilities, tile counts and runs per pass; only the shared
    one counts FLOPs and encoder tiles."""
    net = make_net(2)
    size = (26, 14, 10)
    x = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(7))
    mask = None
    if mask_box is not None:
        mask = torch.zeros(1, 1, *size, dtype=torch.bool)
        mask[(0, 0, *mask_box)] = True
    passes = TileGrid(overlap=4).plan(size, (20, 20, 12))
    run = TileExecutor(44, channels_last=False)
    args = (mask, torch.device("cpu"), torch.device("cpu"), None, 3, 2)
    plain, sp = run.run(x, net, PlainForward(passes, 44), *args, averaged=True)
    shared, ss = run.run(x, net, SharedEncoderForward(passes, 44, 1, 3, 4), *args, averaged=True)
    torch.testing.assert_close(plain, shared, rtol=1e-5, atol=1e-6)
    assert {k: sp[k] for k in sp} == {k: ss[k] for k in sp}
    assert ss["shared_encoder"] and ss["encoder_tiles"] <= len(passes[0].starts) and ss["flops"] > 0
    if mask is not None:
        assert sp["tiles_skipped"] > 0 and bool((plain[:, 0][~mask[:, 0]] == 1).all())


def test_unknown_class_count_with_nothing_to_run_is_an_error():
    passes = TileGrid().plan((10, 10, 10))
    with pytest.raises(ValueError, match="no tile was run"):
        TileExecutor(44).run(
            torch.zeros(1, 1, 10, 10, 10),
            make_net(),
            PlainForward(passes, 44),
            torch.zeros(1, 1, 10, 10, 10, dtype=torch.bool),
            torch.device("cpu"),
            torch.device("cpu"),
            None,
            None,
            1,
            averaged=False,
        )


def test_fallback_ladder_steps_and_final_error(caplog):
    """One tile per forward first, then halved tiles until the smallest; other errors pass through untouched."""
    grid = TileGrid()
    tried = []

    def run(passes, sw_batch, out_device):
        tried.append((passes[0].tile_size, sw_batch))
        raise RuntimeError("CPU out of memory: can't allocate memory")

    with caplog.at_level(logging.WARNING, logger="custom.tile_executor"):
        with pytest.raises(RuntimeError, match=r"out of memory with output tiles \[12, 12, 12\]"):
            run_with_fallbacks(
                lambda t: grid.plan((60, 60, 60), t), run, (44, 44, 44), 2, torch.device("cpu"),
                torch.device("cpu"), grid.halved_tile, "aligned",
            )  # fmt: skip
    # 44 wanted on a 60-voxel domain: 2 tiles of 36 per axis; halved: 18, rounded down to a valid 12 (the smallest)
    assert tried == [((36, 36, 36), 2), ((36, 36, 36), 1), ((12, 12, 12), 1)]
    assert len([r for r in caplog.records if "Out of memory" in r.getMessage()]) == 2
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(ValueError("out of memory"))

    def broken(passes, sw_batch, out_device):
        raise ValueError("not an allocation failure")

    with pytest.raises(ValueError, match="not an allocation"):
        run_with_fallbacks(lambda t: grid.plan((9, 9, 9), t), broken, None, 1, *[torch.device("cpu")] * 2, None, "x")


class TestProgress:
    def test_forced_bar_shows_the_tiles(self, capsys, caplog):
        inf = ValidTiledInferer(tile_size=(12, 12, 12), amp=False, channels_last=True, progress=True, name="stage 1")
        with caplog.at_level(logging.INFO, logger="custom.inferer"):
            inf(torch.randn(1, 1, 20, 13, 9), make_net())
        err = capsys.readouterr().err
        assert inf.last_stats["tiles_run"] == 4
        assert "stage 1" in err and "4/4" in err and "tile/s" in err or "s/tile" in err
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage 1: 4 tiles run")]
        assert len(lines) == 1 and "0 skipped" in lines[0] and "float32, channels_last_3d" in lines[0]

    def test_shared_encoder_bar_counts_passes(self, capsys):
        inf = ValidTiledInferer(overlap=4, amp=False, channels_last=True, progress=True)
        inf(torch.randn(1, 1, 14, 12, 10), make_net())
        err = capsys.readouterr().err
        assert (
            inf.last_stats["shared_encoder"] and f"{inf.last_stats['tiles_run']}/{inf.last_stats['tiles_run']}" in err
        )

    @pytest.mark.parametrize("progress", ["auto", False, "false"])
    def test_quiet_when_not_a_terminal_or_asked(self, capsys, progress):
        inf = ValidTiledInferer(tile_size=(12, 12, 12), amp=False, channels_last=True, progress=progress)
        inf(torch.randn(1, 1, 20, 13, 9), make_net())
        assert capsys.readouterr().err == ""  # pytest's captured stderr is not a terminal
