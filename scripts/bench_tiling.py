"""Benchmark the tilings of ValidTiledInferer on one volume: time, analytic FLOPs, peak memory, as a markdown table.

Configurations (``--configs``):

- ``paper``: the paper's non-overlapping 44x44x28 output tiles (132x132x116 inputs);
- ``paper4``: the paper's overlapping mode, stride halved in x and y (every interior voxel predicted 4 times);
- ``aligned``: exact aligned tiling with tiles chosen from the memory budget (the bundle's default);
- ``aligned4``: the same with ``overlap=4``: four passes shifted by 4 voxels (pooling phases), averaged;
- ``onepass``: aligned tiling with unlimited memory: one pass over the whole volume, or the fewest tiles that keep
  every activation below 2**31 elements.

Full runs take long on a CPU (the paper tiling of a 256x256x250 volume at the paper's widths is ~10 minutes on 2
cores). ``--extrapolate`` times single tiles through the same code path (a volume of exactly one output tile) and
multiplies by the number of tiles of the full volume; the table says which rows were extrapolated.

Example (reduced CPU run; the lead's full run drops ``--extrapolate``)::

    python scripts/bench_tiling.py --size 256,256,250 --dtype bf16 --extrapolate --configs paper,aligned
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.inferer import ValidTiledInferer, estimate_tile_bytes  # noqa: E402
from custom.network import ValidUNet3D, forward_flops  # noqa: E402

CONFIGS = ("paper", "paper4", "aligned", "aligned4", "onepass")


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def _reset_peak(device: torch.device) -> int:
    """Start a peak-memory window; returns the baseline in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
        return _status_kb("VmRSS") * 1024
    except OSError:
        return 0


def _peak(device: torch.device, base: int) -> float | None:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        return (_status_kb("VmHWM") * 1024 - base) / 2**20
    except OSError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def make_inferer(name: str, amp: bool, budget_mb: float | None, sw_batch_size: int) -> ValidTiledInferer:
    common = {"amp": amp, "sw_batch_size": sw_batch_size}
    if name == "paper":
        return ValidTiledInferer(mode="paper", **common)
    if name == "paper4":
        return ValidTiledInferer(mode="paper", overlap=4, **common)
    if name == "aligned":
        return ValidTiledInferer(mode="aligned", memory_budget_mb=budget_mb, **common)
    if name == "aligned4":
        return ValidTiledInferer(mode="aligned", memory_budget_mb=budget_mb, overlap=4, **common)
    if name == "onepass":
        return ValidTiledInferer(mode="aligned", memory_budget_mb=1e12, **common)
    raise ValueError(f"unknown config {name!r}; known: {CONFIGS}")


def bench(args: argparse.Namespace) -> tuple[list[dict], torch.device, tuple[int, ...]]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    size = tuple(int(s) for s in args.size.split(","))
    amp = args.dtype == "bf16"
    torch.manual_seed(0)
    net = ValidUNet3D(in_channels=1, out_channels=args.classes, features=args.features).to(device).eval()
    n_vox = math.prod(size)
    rows = []
    for name in args.configs.split(","):
        inferer = make_inferer(name, amp, args.memory_budget_mb, args.sw_batch_size)
        # the tiles of the full volume, chosen exactly as a full call would choose them
        tile = None
        if inferer.mode == "aligned":
            budget = inferer._default_budget(device, n_vox * args.classes * 4)
            tile = inferer.choose_tile_size(
                size, budget, 1, args.classes, args.features, 2 if amp else 4, True, device.type
            )
        passes = inferer.plan(size, tile)
        tiles = sum(len(p.starts) for p in passes)
        in_tile = [t + 88 for t in passes[0].tile_size]
        flops = sum(
            len(p.starts) * forward_flops([t + 88 for t in p.tile_size], 1, args.classes, args.features) for p in passes
        )
        est_mb = (
            estimate_tile_bytes(
                in_tile,
                1,
                args.classes,
                args.features,
                args.sw_batch_size,
                2 if amp else 4,
                True,
                inferer.channels_last,
                device.type,
            )
            / 2**20
        )
        row = {
            "config": name,
            "tiles": tiles,
            "out_tile": "x".join(map(str, passes[0].tile_size)),
            "in_tile": "x".join(map(str, in_tile)),
            "tflop": flops / 1e12,
            "mflop_vox": flops / n_vox / 1e6,
            "est_mb": est_mb,
            "how": "",
            "seconds": None,
            "peak_mb": None,
        }
        if device.type == "cpu" and args.max_est_mb and est_mb > args.max_est_mb:
            row["how"] = f"skipped: estimated {est_mb / 1024:.1f} GB > --max-est-mb"
            rows.append(row)
            print(f"# {name}: {row['how']}", flush=True)
            continue
        if args.extrapolate:
            # one output tile of the config's size: exactly one tile through the same path (pad, fold, cast, stitch)
            # (aligned: one pass with the chosen tile; the shifted passes run tiles of the same size)
            vol = passes[0].tile_size
            if inferer.mode == "aligned":
                inferer = ValidTiledInferer(mode="aligned", tile_size=vol, amp=amp, sw_batch_size=args.sw_batch_size)
            runs = tiles
        else:
            vol = size
            runs = 1
        x = torch.randn(1, 1, *vol, device=device)
        times, peaks = [], []
        for rep in range(args.warmup + args.repeats):
            base = _reset_peak(device)
            t0 = time.perf_counter()
            inferer(x, net)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            if rep >= args.warmup:
                times.append(dt)
                peaks.append(_peak(device, base))
            print(f"# {name}: run {rep + 1} {dt:.2f} s ({inferer.last_stats['tiles_run']} tiles)", flush=True)
        per_run = statistics.median(times)
        row["seconds"] = per_run * runs
        row["peak_mb"] = max(p for p in peaks if p is not None) if any(p is not None for p in peaks) else None
        row["how"] = (
            f"extrapolated: {per_run:.2f} s/tile x {tiles}"
            if args.extrapolate
            else f"measured, median of {args.repeats}"
        )
        rows.append(row)
    return rows, device, size


def report(rows: list[dict], device: torch.device, size: tuple[int, ...], args: argparse.Namespace) -> str:
    import monai

    rate_unit, scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    lines = [
        f"Device: {device_name(device)}; torch {torch.__version__}, monai {monai.__version__}; "
        f"{datetime.date.today().isoformat()}",
        f"Volume {'x'.join(map(str, size))}, features {args.features}, K = {args.classes}, {args.dtype}, "
        f"sw_batch_size {args.sw_batch_size}, BatchNorm folded, channels-last",
        "",
        f"| config | tiles | output tile | input tile | TFLOP | MFLOP/voxel | time (s) | {rate_unit} "
        "| peak MB (measured) | est. MB | how |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["seconds"]
        rate = f"{r['tflop'] * 1e12 / t / scale:.1f}" if t else "-"
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(
            f"| {r['config']} | {r['tiles']} | {r['out_tile']} | {r['in_tile']} | {r['tflop']:.3g} | "
            f"{r['mflop_vox']:.2f} | {'-' if t is None else f'{t:.1f}'} | {rate} | "
            f"{peak} | {r['est_mb']:.0f} | {r['how']} |"
        )
    by = {r["config"]: r for r in rows}
    if by.get("paper", {}).get("seconds") and by.get("aligned", {}).get("seconds"):
        lines.append("")
        lines.append(
            f"aligned vs paper tiles: {by['paper']['seconds'] / by['aligned']['seconds']:.2f}x faster "
            f"({by['paper']['tflop'] / by['aligned']['tflop']:.2f}x fewer FLOPs)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="256,256,250", help="volume x,y,z (a 512x512x500 CT after x2 downsampling)")
    p.add_argument("--features", type=int, default=32, help="network width f (paper: 32)")
    p.add_argument("--classes", type=int, default=8, help="output classes K")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=0, help="untimed runs before the timed ones")
    p.add_argument("--extrapolate", action="store_true", help="time one tile per config and scale by the tile count")
    p.add_argument("--memory-budget-mb", type=float, default=None, help="aligned mode budget (default: automatic)")
    p.add_argument("--sw-batch-size", type=int, default=1)
    p.add_argument(
        "--max-est-mb",
        type=float,
        default=None,
        help="CPU: skip configs whose estimated tile memory exceeds this (default: half the free RAM)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_est_mb is None:
        from custom.tile_choice import available_ram_bytes

        avail = available_ram_bytes()
        args.max_est_mb = 0.5 * avail / 2**20 if avail else None
    rows, device, size = bench(args)
    print(report(rows, device, size, args))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
