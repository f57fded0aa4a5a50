"""What the machine the bundle runs on can do: usable cores, thread settings, CPU model and ISA, native bfloat16.

Torch's default number of intra-op threads is the number of CPUs in the process's affinity mask; it ignores a cgroup
CPU quota (``docker run --cpus 2`` on a 64-core host gets 64 threads fighting over 2 cores' worth of time). The
functions here give the cores the process may really use (affinity and quota) and set torch's threads to that, and
give a data-loader worker count that does not oversubscribe them. They can be called from a config, e.g.::

    "threads": "$custom.runtime.configure_threads()",
    "num_workers": "$custom.runtime.loader_workers(2)"

:class:`custom.inferer.ValidTiledInferer` calls :func:`configure_threads` once per process before its first CPU run,
so inference needs nothing in the config. An explicit ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` or a lower
``torch.set_num_threads`` set by the user is left alone: the thread count is only ever lowered to the usable cores.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import torch

__all__ = [
    "configure_threads",
    "cpu_bf16_supported",
    "cpu_info",
    "cgroup_cpu_limit",
    "loader_workers",
    "usable_cpus",
]

logger = logging.getLogger(__name__)

_CONFIGURED: int | None = None
#: ISA flags of /proc/cpuinfo that decide which convolution kernels oneDNN can use.
_ISA_PREFIXES = ("avx2", "avx512", "amx", "avx_vnni", "fma", "neon", "asimd", "sve")


def cgroup_cpu_limit(
    root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup"
) -> float | None:
    """CPUs' worth of time the process's cgroup may use (``quota / period``), or None when unlimited or unknown.

    cgroup v2: ``cpu.max`` (``"200000 100000"`` = 2 CPUs, ``"max 100000"`` = no limit) of the process's own group
    (from ``/proc/self/cgroup``) and of its ancestors up to ``root``, the smallest; cgroup v1:
    ``cpu/cpu.cfs_quota_us`` / ``cpu/cpu.cfs_period_us`` (quota -1 = no limit).
    """
    root = Path(root)
    limits: list[float] = []
    candidates = [root]
    try:
        for line in Path(proc_cgroup).read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[0] == "0" and parts[2].strip("/"):
                rel = Path(parts[2].strip("/"))
                candidates += [root / p for p in reversed([rel, *rel.parents]) if str(p) != "."]
    except OSError:
        pass
    for folder in candidates:
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and float(period) > 0:
            limits.append(float(quota) / float(period))
    try:
        quota = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = float((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            limits.append(quota / period)
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def usable_cpus(affinity: set[int] | None = None, quota: float | None = None, *, read_quota: bool = True) -> int:
    """Cores the process may use: the CPUs of its affinity mask, capped by the cgroup quota (rounded up), >= 1."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            affinity = set(range(os.cpu_count() or 1))
    n = max(len(affinity), 1)
    if quota is None and read_quota:
        quota = cgroup_cpu_limit()
    if quota is not None and quota > 0:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return n


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to the usable cores (or ``threads``) and return the number in use.

    Without ``threads`` the count is only lowered, never raised, and an ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` in
    the environment wins. Logs the change once.
    """
    global _CONFIGURED
    current = torch.get_num_threads()
    if threads is not None:
        n = max(int(threads), 1)
    elif os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        n = current
    else:
        n = min(current, usable_cpus())
    if n != current:
        torch.set_num_threads(n)
        logger.info("torch intra-op threads %d -> %d (usable cores: affinity and cgroup quota)", current, n)
    _CONFIGURED = n
    return n


def ensure_threads_configured() -> int:
    """:func:`configure_threads` once per process (later calls return the first result)."""
    return _CONFIGURED if _CONFIGURED is not None else configure_threads()


def loader_workers(requested: int, cpus: int | None = None) -> int:
    """Data-loader workers that leave the compute its cores: ``min(requested, cpus - 1)``, 0 on a single core.

    The workers prepare the next batch while the main process computes on all usable cores with its intra-op
    threads; more workers than ``cpus - 1`` would only take time from the compute (torch runs each worker with one
    thread).
    """
    cpus = usable_cpus() if cpus is None else int(cpus)
    return max(0, min(int(requested), cpus - 1))


def cpu_bf16_supported() -> bool:
    """Whether oneDNN reports native bfloat16 for this CPU (AVX-512 BF16 / AMX; False on AVX2-only CPUs, where a
    bfloat16 Conv3d falls back to the slow reference kernel). False when torch cannot tell."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - private API; absent or failing means "not known to be supported"
        return False


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """CPU model, ISA flags relevant to the convolution kernels, usable cores and torch's view of them."""
    model, flags = None, []
    try:
        text = Path(cpuinfo).read_text()
        m = re.search(r"^(?:model name|Model|Hardware|cpu model)\s*:\s*(.+)$", text, re.M)
        model = m.group(1).strip() if m else None
        f = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
        if f:
            flags = sorted({x for x in f.group(1).split() if x.startswith(_ISA_PREFIXES)})
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        capability = None
    return {
        "model": model,
        "isa_flags": flags,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "cgroup_cpu_limit": cgroup_cpu_limit(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": capability,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "mkldnn_bf16_supported": cpu_bf16_supported(),
    }
