"""The compute precision and memory layout of tiled inference, and the network copy that runs in them.

- :class:`Precision`: dtype and layout of a run and why they were chosen;
- :func:`resolve_precision`: ``amp`` / ``channels_last`` (``"auto"`` or forced) to a :class:`Precision`, from the
  device's capability and, on the CPU, a short probe (:func:`probe`) of the network at its own widths; cached per
  process (:data:`PRECISION_CACHE`) and logged once per decision;
- :class:`ComputeCopies`: the network as it runs: a cached copy with BatchNorm folded
  (:func:`custom.network.fold_batchnorm`) in the run's dtype and layout, optionally compiled;
- :func:`autocast_for`: bfloat16 autocast for an unfolded network.
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from custom import runtime
from custom.network import ValidUNet3D, fold_batchnorm
from custom.options import as_bool

__all__ = ["PRECISION_CACHE", "ComputeCopies", "Precision", "auto_or_bool", "autocast_for", "resolve_precision"]

logger = logging.getLogger(__name__)

#: bfloat16 must beat the best float32 configuration by this factor to be chosen (float32 is exact, so a tie or a
#: few percent of timing noise keeps float32).
BF16_MARGIN = 0.9
#: A warm-up this many times faster than every other decides the probe without timed runs (warm-ups include
#: oneDNN's kernel creation, which costs bfloat16 relatively more, so this never favours it wrongly).
PROBE_CLEAR = 1.5
#: A probed configuration whose warm-up takes this many times the fastest warm-up is not timed again (the slow
#: reference kernels of a CPU without native bfloat16 are 20-70x slower).
PROBE_DROP = 4.0
_NO_BF16 = "oneDNN reports no native bfloat16 on this CPU (bfloat16 convolutions would use the slow reference kernel)"

#: A probed configuration: (dtype, channels-last).
Config = tuple[torch.dtype, bool]


@dataclass(frozen=True)
class Precision:
    """The compute precision and layout of a tiled run, and why they were chosen.

    ``source`` is ``"forced"`` (``amp`` / ``channels_last`` given as booleans), ``"capability"`` (decided from
    what the device reports, without a probe) or ``"probe"`` (a short timed run of the network at its own widths;
    ``probe_seconds`` gives the best time per configuration (the warm-up's for one too slow to time again).
    """

    dtype: torch.dtype
    channels_last: bool
    source: str
    reason: str
    probe_seconds: dict[str, float | None] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "dtype": str(self.dtype).replace("torch.", ""),
            "channels_last": self.channels_last,
            "source": self.source,
            "reason": self.reason,
            "probe_seconds": None if self.probe_seconds is None else dict(self.probe_seconds),
        }


#: Decisions of ``amp="auto"`` / ``channels_last="auto"``, per process: key = network shape, device, threads, ISA.
PRECISION_CACHE: dict[tuple, Precision] = {}


def auto_or_bool(value: Any, name: str) -> bool | str:
    """``"auto"`` (any case) or a boolean through :func:`custom.options.as_bool` (CLI strings accepted)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return as_bool(value, name)


def config_name(dtype: torch.dtype, channels_last: bool) -> str:
    return f"{str(dtype).replace('torch.', '')}, {'channels_last_3d' if channels_last else 'NCDHW'}"


def autocast_for(device: torch.device, dtype: torch.dtype, cast: torch.dtype | None):
    """bfloat16 autocast for an unfolded network (``cast`` None) in bfloat16; nothing otherwise."""
    if dtype == torch.bfloat16 and cast is None:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


class ComputeCopies:
    """The module that runs for a network, dtype and layout: with ``fold_bn``, a :class:`ValidUNet3D` runs as a cached
    copy with BatchNorm folded, cast to the dtype, in the layout, optionally ``torch.compile``-d; any other network
    as given. One copy per network (weakly keyed), rebuilt when the network's weights or the configuration change."""

    def __init__(self) -> None:
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(
        self, network: Callable, dtype: torch.dtype, channels_last: bool, fold_bn: bool, compile: bool
    ) -> tuple[Callable, bool, torch.dtype | None]:
        """(module to run, whether it is the folded copy, dtype to cast tiles to or None for autocast/fp32)."""
        if not (fold_bn and isinstance(network, ValidUNet3D)):
            return network, False, None
        state = tuple((t.data_ptr(), t._version, t.dtype, str(t.device)) for t in network.state_dict().values())
        key = (state, dtype, channels_last, compile)
        cached = self._cache.get(network)
        if cached is not None and cached[0] == key:
            return cached[1], True, dtype
        folded = fold_batchnorm(network).to(dtype=dtype)
        if channels_last:
            folded = folded.to(memory_format=torch.channels_last_3d)
        if compile:
            folded = torch.compile(folded, dynamic=False)
        self._cache[network] = (key, folded)
        return folded, True, dtype


def resolve_precision(
    network: Callable,
    device: torch.device,
    amp: bool | str,
    channels_last: bool | str,
    probe_fn: Callable[[list[Config]], dict[Config, float | None]],
    folds: bool,
    compile: bool,
    label: str = "tiles",
) -> Precision:
    """The dtype and layout for ``network`` on ``device``: forced values as given, ``"auto"`` from the device's
    capability and (on the CPU) ``probe_fn(configs)``; cached per process in :data:`PRECISION_CACHE` (key: network
    shape, device, threads, ``ONEDNN_MAX_CPU_ISA``, the settings). Logs each new decision once, as ``label``."""
    key = (
        type(network).__name__,
        tuple((n, tuple(t.shape), t.dtype) for n, t in network.named_parameters())
        if isinstance(network, nn.Module)
        else id(network),
        str(device),
        torch.get_num_threads(),
        os.environ.get("ONEDNN_MAX_CPU_ISA"),
        amp,
        channels_last,
        folds,
        compile,
    )
    cached = PRECISION_CACHE.get(key)
    if cached is not None:
        return cached
    prec = decide_precision(device, amp, channels_last, probe_fn)
    PRECISION_CACHE[key] = prec
    logger.info(
        "%s: %s on %s (%s: %s)", label, config_name(prec.dtype, prec.channels_last), device, prec.source, prec.reason
    )
    return prec


def decide_precision(
    device: torch.device,
    amp: bool | str,
    cl: bool | str,
    probe_fn: Callable[[list[Config]], dict[Config, float | None]],
) -> Precision:
    """The decision itself, uncached: see ``amp`` and ``channels_last`` of the tiled inferer."""
    bf16, fp32 = torch.bfloat16, torch.float32
    if amp != "auto" and cl != "auto":
        return Precision(bf16 if amp else fp32, bool(cl), "forced", f"amp={amp}, channels_last={cl}")
    if device.type == "cuda":
        ok = bool(torch.cuda.is_bf16_supported())
        dtype = (bf16 if ok else fp32) if amp == "auto" else (bf16 if amp else fp32)
        why = f"CUDA, bfloat16 {'supported' if ok else 'not supported'} by {torch.cuda.get_device_name(device)}"
        return Precision(dtype, True if cl == "auto" else bool(cl), "capability", why)
    if device.type != "cpu":
        dtype = fp32 if amp == "auto" else (bf16 if amp else fp32)
        return Precision(
            dtype,
            False if cl == "auto" else bool(cl),
            "capability",
            f"no measured fast path on {device.type}: float32, NCDHW unless forced",
        )
    native = runtime.cpu_bf16_supported()
    if amp == "auto":
        dtypes = [fp32, bf16] if native else [fp32]
    else:
        dtypes = [bf16 if amp else fp32]
    # channels-last unless forced: oneDNN ran it as fast as NCDHW or faster in every configuration measured
    # here but one (f = 32 under AVX2 kernels, ~10 %), and probing a second layout cost 2-5 s in a fresh process
    # (kernel creation for new shapes), more than it could win (bundle/docs/performance.md)
    layouts = [True] if cl == "auto" else [bool(cl)]
    configs = [(d, c) for d in dtypes for c in layouts]
    if len(configs) == 1:
        if amp == "auto":
            return Precision(configs[0][0], configs[0][1], "capability", _NO_BF16)
        return Precision(configs[0][0], configs[0][1], "forced", f"amp={amp}, channels-last unless forced")
    try:
        times = probe_fn(configs)
    except Exception as e:  # noqa: BLE001 - a probe that cannot run must not stop inference: float32 then
        logger.warning("precision probe failed (%s: %s); using float32", type(e).__name__, e)
        return Precision(
            fp32 if amp == "auto" else (bf16 if amp else fp32),
            layouts[0],
            "capability",
            f"probe failed ({type(e).__name__})",
        )
    return choose(times, amp, native)


def choose(times: dict[Config, float | None], amp: bool | str, native: bool) -> Precision:
    """The decision from probe times (seconds per run, None = not run): the fastest layout per
    dtype; bfloat16 only when it beats the best float32 by :data:`BF16_MARGIN`."""

    def best(dtype):
        got = [(t, c) for (d, c), t in times.items() if d == dtype and t is not None]
        return min(got, key=lambda tc: tc[0]) if got else None

    named = {config_name(d, c): (None if t is None else round(t, 4)) for (d, c), t in times.items()}
    f32, b16 = best(torch.float32), best(torch.bfloat16)
    if f32 is not None and b16 is not None:
        if b16[0] < BF16_MARGIN * f32[0]:
            why = f"bfloat16 {b16[0] * 1e3:.0f} ms vs float32 {f32[0] * 1e3:.0f} ms per run"
            return Precision(torch.bfloat16, b16[1], "probe", why, named)
        why = (
            f"bfloat16 {b16[0] * 1e3:.0f} ms not at least {1 - BF16_MARGIN:.0%} faster than float32 "
            f"{f32[0] * 1e3:.0f} ms per run"
        )
        return Precision(torch.float32, f32[1], "probe", why, named)
    dtype, (t, c) = (torch.float32, f32) if f32 is not None else (torch.bfloat16, b16)
    if amp == "auto" and not native:
        why = f"{_NO_BF16}; fastest layout {t * 1e3:.0f} ms per run"
    elif amp == "auto":
        why = f"bfloat16 not run; float32 {t * 1e3:.0f} ms per run"
    else:
        why = f"amp={amp} forced; fastest layout {t * 1e3:.0f} ms per run"
    return Precision(dtype, c, "probe", why, named)


def probe(
    build: Callable[[Config], tuple[Callable, bool, torch.dtype | None]],
    device: torch.device,
    configs: list[Config],
    in_channels: int,
    input_size: tuple[int, int, int],
) -> dict[Config, float | None]:
    """Seconds per forward of each configuration on an ``input_size`` input (``build(config)``: the module as
    inference runs it, e.g. the folded copy in that dtype and layout). Every configuration runs once as a warm-up
    (oneDNN creates its kernels). When the fastest warm-up is :data:`PROBE_CLEAR` times faster than every other, it
    wins on those times; otherwise the configurations within :data:`PROBE_DROP` x the fastest run twice more (once
    when a warm-up took over a second), interleaved, and the best run counts; the slower ones (the slow-kernel
    trap) keep their warm-up time."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, in_channels, *input_size, generator=g).to(device)
    built = {c: build(c) for c in configs}

    def once(c) -> float:
        net, _, cast = built[c]
        tile = x.to(dtype=cast or torch.float32)
        if c[1]:
            tile = tile.contiguous(memory_format=torch.channels_last_3d)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast_for(device, c[0], cast):
            net(tile)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    first: dict = {}
    # warm-up (oneDNN creates its kernels; a slow reference kernel shows here already), bfloat16 first
    for c in sorted(configs, key=lambda c: (not c[1], c[0] != torch.bfloat16)):
        first[c] = once(c)
    fastest = min(first.values())
    times: dict = {c: first.get(c) for c in configs}
    live = [c for c in first if first[c] <= PROBE_DROP * fastest]  # the others keep their warm-up time
    ranked = sorted(first.values())
    if len(ranked) > 1 and ranked[0] * PROBE_CLEAR > ranked[1]:  # no clear winner from the warm-ups
        times.update({c: math.inf for c in live})
        rounds = 1 if fastest > 1.0 else 2  # wide networks: one timed run each keeps the probe short
        for _ in range(rounds):  # interleaved, so that other load on the machine hits every configuration alike
            for c in live:
                times[c] = min(times[c], once(c))
    return times
