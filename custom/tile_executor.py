"""Running a tiling plan: one loop over batches of tiles, with the forward as a strategy, and the OOM ladder.

:class:`TileExecutor` pads the image once per batch element, cuts the input tiles, runs them in batches of
``sw_batch_size``, activates the logits and writes (or, with ``overlap``, adds) each tile's write region into the
output; then sets every voxel outside the mask to background and returns the run's statistics. What a batch of
tiles *is* comes from the strategy:

- :class:`PlainForward`: a job is one tile of one pass, run through the network on its own;
- :class:`SharedEncoderForward`: a job is one tile position of the shared grid (:func:`custom.tiling.grid_shared`)
  with the passes whose tile runs there; its input is grown by ``align / 2`` and the passes share the encoder
  (:meth:`custom.network.ValidUNet3D.phase_shared_forward`).

:func:`run_with_fallbacks` retries a run that ran out of memory with smaller steps (see :mod:`custom.inferer`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from custom.network import _crop, forward_flops
from custom.tile_choice import encoder_flops
from custom.tiling import TilePass

__all__ = ["PlainForward", "SharedEncoderForward", "TileExecutor", "is_out_of_memory", "run_with_fallbacks"]

logger = logging.getLogger(__name__)

#: A job: (batch element, tile index k in the passes' lists, the passes whose k-th tile runs).
Job = tuple[int, int, tuple[int, ...]]
Box = tuple[list[int], list[int]]  # input box: origin (image coordinates) and size


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: ``torch.OutOfMemoryError`` (CUDA) or the ``RuntimeError`` /
    ``MemoryError`` of a CPU or other allocator (\"out of memory\", \"can't allocate memory\")."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def tile_runs(mask: torch.Tensor | None, b: int, w) -> bool:
    """A tile runs when its write region is not empty and (with a mask) holds a candidate voxel."""
    if any(hi <= lo for lo, hi in w):
        return False
    return mask is None or bool(mask[b, 0, w[0][0] : w[0][1], w[1][0] : w[1][1], w[2][0] : w[2][1]].any())


class PlainForward:
    """Each tile of each pass on its own: the network on the tile grown by the margin."""

    def __init__(self, passes: list[TilePass], margin: int) -> None:
        self.passes, self.margin = passes, margin

    def boxes(self) -> Iterator[Box]:
        m = self.margin
        for p in self.passes:
            for st in p.starts:
                yield [s - m for s in st], [t + 2 * m for t in p.tile_size]

    def jobs(self, batch: int, mask: torch.Tensor | None) -> tuple[list[Job], int]:
        jobs, skipped = [], 0
        for b in range(batch):
            for pi, p in enumerate(self.passes):
                for k, w in enumerate(p.write):
                    if tile_runs(mask, b, w):
                        jobs.append((b, k, (pi,)))
                    else:
                        skipped += 1
        return jobs, skipped

    @staticmethod
    def group_key(job: Job) -> tuple:
        return job[0], job[2]  # tiles of the same element and pass (same tile size)

    def box(self, job: Job) -> Box:
        p = self.passes[job[2][0]]
        return [s - self.margin for s in p.starts[job[1]]], [t + 2 * self.margin for t in p.tile_size]

    def forward(self, net: Callable, tiles: torch.Tensor, group: list[Job]) -> list[tuple[int, torch.Tensor]]:
        return [(group[0][2][0], net(tiles))]

    def stats(self, jobs: list[Job]) -> dict[str, Any]:
        return {}


class SharedEncoderForward:
    """The R passes tile by tile: one encoder run on the tile grown by ``align / 2`` (toward negative coordinates,
    where the shifted passes' tiles start), then bottleneck + decoder for each pass whose tile runs; counts its
    FLOPs (``stats``)."""

    def __init__(self, passes: list[TilePass], margin: int, in_channels: int, out_channels: int, features: int) -> None:
        self.passes, self.margin = passes, margin
        self.ext = [max(p.shift[a] for p in passes) for a in range(3)]
        self.in_size = [t + 2 * margin for t in passes[0].tile_size]
        self.grown = [n + e for n, e in zip(self.in_size, self.ext, strict=True)]
        self.enc_flops = encoder_flops(self.grown, in_channels, features)
        self.rest_flops = forward_flops(self.in_size, in_channels, out_channels, features) - encoder_flops(
            self.in_size, in_channels, features
        )
        self.flops = 0

    def boxes(self) -> Iterator[Box]:
        for k in range(len(self.passes[0].starts)):
            yield self.box((0, k, ()))

    def jobs(self, batch: int, mask: torch.Tensor | None) -> tuple[list[Job], int]:
        jobs, skipped = [], 0
        for b in range(batch):
            for k in range(len(self.passes[0].starts)):
                need = tuple(pi for pi, p in enumerate(self.passes) if tile_runs(mask, b, p.write[k]))
                skipped += len(self.passes) - len(need)
                if need:
                    jobs.append((b, k, need))
        return jobs, skipped

    @staticmethod
    def group_key(job: Job) -> int:
        return job[0]  # tiles of the same element

    def box(self, job: Job) -> Box:
        g = self.passes[0].starts[job[1]]  # pass 0 (shift 0); pass p's tile k starts at g - shift_p
        return [g[a] - self.ext[a] - self.margin for a in range(3)], self.grown

    def forward(self, net, tiles: torch.Tensor, group: list[Job]) -> list[tuple[int, torch.Tensor]]:
        phases = sorted(set().union(*(need for _, _, need in group)))
        offsets = [[self.ext[a] - self.passes[pi].shift[a] for a in range(3)] for pi in phases]
        logits = net.phase_shared_forward(tiles, offsets, self.in_size)
        self.flops += len(group) * (self.enc_flops + len(phases) * self.rest_flops)
        return list(zip(phases, logits, strict=True))

    def stats(self, jobs: list[Job]) -> dict[str, Any]:
        return {"flops": self.flops, "shared_encoder": True, "encoder_tiles": len(jobs)}


@dataclass
class TileExecutor:
    """How the tiles of a call run: border padding, activation, tile layout, autocast context, progress bar."""

    margin: int
    padding_mode: str = "constant"
    pad_value: float = 0.0
    activation: str = "softmax"
    channels_last: bool = True
    autocast: Any = None  # a context manager entered around each forward, or None
    progress_bar: Callable[[int], Any] | None = None  # total tiles -> a tqdm-like bar or None

    def run(
        self,
        x: torch.Tensor,
        net: Callable,
        strategy: PlainForward | SharedEncoderForward,
        mask: torch.Tensor | None,
        device: torch.device,
        out_device: torch.device,
        cast: torch.dtype | None,
        out_channels: int | None,
        sw_batch_size: int,
        averaged: bool,
        count: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The probabilities (B, K, X, Y, Z) on ``out_device`` and the statistics (``tiles_run``,
        ``tiles_skipped``, ``candidate_fraction``, ``runs_per_pass`` and the strategy's). ``averaged``: tiles add up
        and the sum is divided by ``count`` (per voxel) or the number of passes; otherwise each voxel is written
        once."""
        batch, _, *spatial = x.shape
        passes = strategy.passes
        # one padded copy of the image serves every tile: pad so that the lowest box start and the highest box end fit
        boxes = list(strategy.boxes())
        lo = [max(-min(o[a] for o, _ in boxes), 0) for a in range(3)]
        hi = [max(max(o[a] + n[a] for o, n in boxes) - spatial[a], 0) for a in range(3)]
        pad = (lo[2], hi[2], lo[1], hi[1], lo[0], hi[0])
        autocast = self.autocast if self.autocast is not None else nullcontext()
        runs_per_pass = [0] * len(passes)
        out: torch.Tensor | None = None
        if out_channels is not None:
            out = torch.zeros((batch, out_channels, *spatial), dtype=torch.float32, device=out_device)
        jobs, skipped = strategy.jobs(batch, mask)
        groups: list[list[Job]] = []
        for job in jobs:
            key = strategy.group_key(job)
            if groups and len(groups[-1]) < sw_batch_size and strategy.group_key(groups[-1][0]) == key:
                groups[-1].append(job)
            else:
                groups.append([job])
        padded, padded_b = None, -1
        bar = self.progress_bar(sum(len(need) for _, _, need in jobs)) if self.progress_bar is not None else None
        with torch.no_grad(), bar if bar is not None else nullcontext():  # the bar is closed on errors too
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
                for job in group:
                    o, n = strategy.box(job)
                    crops.append(_crop(padded, [o[a] + lo[a] for a in range(3)], n)[0])
                tiles = torch.stack(crops).to(device=device, dtype=cast or torch.float32)
                if self.channels_last:
                    tiles = tiles.contiguous(memory_format=torch.channels_last_3d)
                with autocast:
                    outputs = strategy.forward(net, tiles, group)
                for pi, logits in outputs:
                    probs = self._probabilities(logits, tiles, passes[pi].tile_size).to(out_device)
                    if out is None:
                        out = torch.zeros((batch, probs.shape[1], *spatial), dtype=torch.float32, device=out_device)
                    for i, (_, k, need) in enumerate(group):
                        if pi in need:  # else computed for another tile of the batch: outside the mask here
                            _write(out[b], probs[i], passes[pi].starts[k], passes[pi].write[k], averaged)
                    runs_per_pass[pi] += sum(pi in need for _, _, need in group)
                    del probs
                del outputs, tiles
                if bar is not None:
                    bar.update(sum(len(need) for _, _, need in group))
        if out is None:  # nothing ran and the class count is unknown
            raise ValueError("no tile was run and the network's number of classes is unknown (no out_channels)")
        if averaged:
            if count is not None:
                out /= count.clamp_min(1).to(out.dtype)
            else:
                out /= len(passes)
        if mask is not None:  # background outside the mask
            keep = mask.to(out_device).float()
            out.mul_(keep)
            if self.activation != "sigmoid":
                out[:, :1].add_(1.0 - keep)
        stats = {
            "tiles_run": sum(runs_per_pass),
            "tiles_skipped": skipped,
            "candidate_fraction": 1.0 if mask is None else float(mask.float().mean()),
            "runs_per_pass": runs_per_pass,
            **strategy.stats(jobs),
        }
        return out, stats

    def _probabilities(self, logits: torch.Tensor, tiles: torch.Tensor, tile_size: Sequence[int]) -> torch.Tensor:
        logits = logits.float()
        if list(logits.shape[2:]) != list(tile_size):
            raise ValueError(
                f"network output {tuple(logits.shape[2:])} for input {tuple(tiles.shape[2:])}, expected "
                f"{tuple(tile_size)}: margin {self.margin} does not match the network"
            )
        if self.activation == "softmax":
            return torch.softmax(logits, dim=1)
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        return logits


def _write(out: torch.Tensor, probs: torch.Tensor, st: Sequence[int], w, add: bool) -> None:
    """Write region ``w`` (image coordinates) of a tile starting at ``st`` into ``out`` (K, X, Y, Z)."""
    src = probs[
        :,
        w[0][0] - st[0] : w[0][1] - st[0],
        w[1][0] - st[1] : w[1][1] - st[1],
        w[2][0] - st[2] : w[2][1] - st[2],
    ]
    dst = out[:, w[0][0] : w[0][1], w[1][0] : w[1][1], w[2][0] : w[2][1]]
    if add:
        dst += src
    else:
        dst.copy_(src)


def run_with_fallbacks(
    plan: Callable[[Sequence[int] | None], list[TilePass]],
    run: Callable[[list[TilePass], int, torch.device], tuple[torch.Tensor, dict[str, Any]]],
    tile: Sequence[int] | None,
    sw_batch_size: int,
    device: torch.device,
    out_device: torch.device,
    halve: Callable[[tuple[int, ...]], tuple[int, ...] | None] | None,
    mode: str,
) -> tuple[list[TilePass], torch.Tensor, dict[str, Any], list[str]]:
    """``run(plan(tile), sw_batch_size, out_device)``, retried after an out-of-memory error with one tile per batch,
    CPU stitching, then ``halve``-d tiles (aligned mode; None: no halving), until it fits or nothing is left to
    shrink (then the error is raised with the steps). Returns the passes, output, statistics and steps taken."""
    sw_batch = sw_batch_size
    fallbacks: list[str] = []
    while True:
        passes = plan(tile)
        failed = None
        try:
            out, stats = run(passes, sw_batch, out_device)
            return passes, out, stats, fallbacks
        except Exception as e:  # noqa: BLE001 - only allocation failures are retried, the rest is re-raised
            if not is_out_of_memory(e):
                raise
            failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        # outside the except block: the traceback (and the tensors its frames hold) is released before retrying
        if device.type == "cuda":
            torch.cuda.empty_cache()
        current = tuple(passes[0].tile_size)
        halved = halve(current) if halve is not None else None
        if sw_batch > 1:
            sw_batch, step = 1, f"one tile per forward (sw_batch_size {sw_batch_size} -> 1)"
        elif out_device.type != "cpu":
            out_device, step = torch.device("cpu"), "stitching on the CPU"
        elif halved is not None:
            tile, step = halved, f"output tiles {list(current)} -> {list(halved)}"
        else:
            raise RuntimeError(
                f"out of memory with output tiles {list(current)} ({mode} mode) after the fallbacks "
                f"{fallbacks or 'none'}: lower memory_budget_mb / tile_size or free memory ({failed})"
            )
        fallbacks.append(step)
        logger.warning("Out of memory in tiled inference (%s); retrying with %s.", failed, step)


def progress_bar(progress: bool | str, name: str | None, total: int):
    """A tqdm bar over ``total`` tiles on stderr (MONAI's style, with ETA), or None when ``progress`` is off, or
    ``"auto"`` and stderr is not a terminal, or there is nothing to run."""
    show = _stderr_is_tty() if progress == "auto" else progress
    if not show or total <= 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=name or "tiles", unit="tile", file=sys.stderr, leave=True)


def _stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False
