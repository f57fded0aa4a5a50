"""custom.runtime: usable cores from affinity and cgroup quota, thread settings, loader workers, CPU description.

Every count here is given to the functions or read from files the test writes: nothing depends on this machine's
cores or ISA.
"""

from __future__ import annotations

import pytest
import torch

from custom import runtime


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n", "job/cpu.max": "50000 100000\n"}, 0.5),  # the process's own group is tighter
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_limit(tmp_path, files, expected):
    root = tmp_path / "cgroup"
    root.mkdir()
    for rel, text in files.items():
        write(root / rel, text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/job\n")
    assert runtime.cgroup_cpu_limit(root, proc) == expected


@pytest.mark.parametrize(
    "affinity, quota, expected",
    [
        (set(range(8)), None, 8),
        (set(range(8)), 2.0, 2),
        (set(range(8)), 1.5, 2),
        ({3}, 4.0, 1),
        (set(range(4)), 0.2, 1),
    ],
)
def test_usable_cpus(affinity, quota, expected):
    assert runtime.usable_cpus(affinity, quota, read_quota=False) == expected


@pytest.mark.parametrize("requested, cpus, expected", [(2, 2, 1), (2, 1, 0), (2, 8, 2), (0, 8, 0), (6, 4, 3)])
def test_loader_workers_leave_a_core_for_the_compute(requested, cpus, expected):
    assert runtime.loader_workers(requested, cpus) == expected


def test_configure_threads_only_lowers(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(runtime, "usable_cpus", lambda: 64)
        assert runtime.configure_threads() == 1 and torch.get_num_threads() == 1  # never raised
        torch.set_num_threads(4)
        monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
        assert runtime.configure_threads() == 2 and torch.get_num_threads() == 2  # lowered to the usable cores
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        assert runtime.configure_threads() == 4  # the user's environment wins
        assert runtime.configure_threads(threads=3) == 3 and torch.get_num_threads() == 3  # explicit
    finally:
        torch.set_num_threads(before)
        monkeypatch.setattr(runtime, "_CONFIGURED", None)


def test_cpu_info_reads_model_and_isa_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_tile "
        "amx_bf16 lm\n\nprocessor\t: 1\nmodel name\t: Test CPU 9000\n"
    )
    got = runtime.cpu_info(info)
    assert got["model"] == "Test CPU 9000"
    assert got["isa_flags"] == ["amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512f", "fma"]
    assert isinstance(got["mkldnn_bf16_supported"], bool) and got["usable_cpus"] >= 1


def test_cpu_bf16_supported_is_false_when_torch_cannot_tell(monkeypatch):
    def broken():
        raise RuntimeError("no such op")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", broken, raising=False)
    assert runtime.cpu_bf16_supported() is False
