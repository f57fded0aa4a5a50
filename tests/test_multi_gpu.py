"""The multi-GPU mixins run under torchrun with 2 CPU processes on the gloo backend (PyTorch's DDP, not a home-made
engine): training with DistributedSampler and DDP, and batch inference sharded across ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from bundle_utils import ROOT, SUBPROCESS_TIMEOUT, TINY, bundle_cli, write_tiny_dataset

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _torchrun(configs, **over):
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        bundle_cli(configs, over, launcher=launcher),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env=env,
    )


def _free_port() -> int:
    """A port nothing listens on now (a fixed one collides with a second test run on the same machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_training_two_cpu_processes(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n_train=4, n_test=2)
    out = tmp_path / "run"
    over = {**TINY, "dataset_dir": str(ds.parent), "output_dir": str(out), "resume": False}
    over.update(val_fraction=0.5, val_max_cases=2)  # every rank needs a validation case
    res = _torchrun(["common.json", "train.json", "multi_gpu_train.json"], **over)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = torch.load(out / "checkpoints" / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 2
    # DDP's wrapper prefix is stripped when saving or loading: the weights load into a plain network
    from custom.network import ValidUNet3D
    from custom.weights import load_weights

    load_weights(out / "checkpoints" / "model_final.pt", network=ValidUNet3D(1, 8, TINY["features"]))

    # sharded batch inference: each rank segments its share of the test cases
    w = out / "checkpoints" / "model_final.pt"
    res = _torchrun(
        ["common.json", "inference.json", "multi_gpu_inference.json"],
        **{k: TINY[k] for k in ("features", "patch_size", "target_spacing")},
        input=str(ds.parent / "imagesTs"),
        output_dir=str(tmp_path / "pred"),
        stage1_weights=str(w),
        stage2_weights=str(w),
        stage2_overlap=1,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert len(list((tmp_path / "pred").glob("*_seg.nii.gz"))) == 2
    summaries = sorted((tmp_path / "pred").glob("summary_rank*.json"))
    assert [json.loads(p.read_text())["succeeded"] for p in summaries] == [1, 1]
