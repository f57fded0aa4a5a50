"""The bundle's real configs, run with tiny overrides on phantoms: parsing, MONAI's property check, training through
``python -m monai.bundle run`` and through ``ConfigWorkflow``, resume, and the stage-2 override."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from bundle_utils import CONFIGS, ROOT, SUBPROCESS_TIMEOUT, TINY, bundle_cli, config_files
from monai.bundle import ConfigParser, ConfigWorkflow


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset(n_train=3, n_test=1)


def _workflow(files, tmp_path, dataset, workflow_type="train", **over):
    wf = ConfigWorkflow(
        config_file=config_files(*files),
        workflow_type=workflow_type,
        **{**TINY, "dataset_dir": str(dataset.parent), "output_dir": str(tmp_path / "run"), **over},
    )
    return wf


def test_every_config_is_valid_json_and_shared_keys_live_in_common():
    common = json.loads((CONFIGS / "common.json").read_text())
    for path in CONFIGS.glob("*.json"):
        data = json.loads(path.read_text())
        if path.name in ("common.json", "metadata.json"):
            continue
        # what both stages share is written once: no stage config redefines the network or the preprocessing
        assert "network_def" not in data, path.name
        assert "preprocessing_transforms" not in data, path.name
    assert common["network_def"]["_target_"] == "custom.network.ValidUNet3D"


def test_train_properties_and_stage2_override(dataset, tmp_path):
    wf = _workflow(["common.json", "train.json"], tmp_path, dataset)
    wf.initialize()
    assert wf.check_properties() in (None, [])
    parser = ConfigParser()
    parser.read_config(config_files("common.json", "train.json", "stage2.json"))
    assert parser["candidate_key"] == "c2" and parser["stage_name"] == "stage2"
    assert parser["load_keys"] == ["image", "label", "c2"]
    # stage 2 is a small override: everything else comes from the shared files
    assert len(json.loads((CONFIGS / "stage2.json").read_text())) <= 8


def test_train_via_monai_bundle_cli_then_resume(dataset, tmp_path):
    out = tmp_path / "run"
    cmd = bundle_cli(
        ["common.json", "train.json"], {**TINY, "dataset_dir": str(dataset.parent), "output_dir": str(out)}
    )
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = out / "checkpoints"
    final = torch.load(ckpt / "model_final.pt", weights_only=True)
    last = torch.load(ckpt / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == TINY["epoch_length"]
    assert torch.isfinite(next(iter(final["network"].values()))).all()
    assert (ckpt / "model_best.pt").is_file()
    # a second run with one more epoch resumes at the saved iteration instead of starting again
    res = subprocess.run(
        cmd + ["--max_epochs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )
    assert res.returncode == 0, res.stderr[-3000:]
    last = torch.load(ckpt / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 2 * TINY["epoch_length"]


def test_train_via_config_workflow(dataset, tmp_path):
    wf = _workflow(["common.json", "train.json"], tmp_path, dataset, resume=False)
    wf.initialize()
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == TINY["epoch_length"]
    loss = trainer.state.output[0]["loss"] if isinstance(trainer.state.output, list) else trainer.state.output["loss"]
    assert torch.isfinite(torch.as_tensor(loss))
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    assert "val_mean_dice" in metrics
    wf.finalize()
