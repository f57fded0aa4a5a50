"""Fine-tuning to a larger label set (paper section 4) through ``finetune.json``: pretrained weights everywhere but
the head, the head re-initialised for the new classes, a 10x smaller learning rate, resume from the run's own
checkpoint (not from the pretrained file), then C2 from the fine-tuned stage 1 and stage 2 fine-tuned on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_utils import CONFIGS, TINY, config_files, write_tiny_dataset
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow

from custom.labels import EXTENDED_LABELS, PAPER_LABELS
from custom.network import ValidUNet3D

#: One iteration per epoch and no validation: what is checked here is the state at the first iteration.
FAST = {**TINY, "epoch_length": 1, "val_interval": 100}
HEAD = "head."


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("phantoms"), n_train=3, n_test=0, labels="extended")


def _pretrained(path: Path, seed: int) -> dict[str, torch.Tensor]:
    """A stage-1/2 network for the paper's 7 structures (8 classes), He-initialised as trained weights would not be."""
    torch.manual_seed(seed)
    net = ValidUNet3D(in_channels=1, out_channels=len(PAPER_LABELS) + 1, features=TINY["features"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network": net.state_dict()}, path)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _first_iteration_state(wf: ConfigWorkflow) -> dict:
    """Run the workflow, recording the network and learning rate when its first iteration starts (after resume)."""
    trainer = wf.parser.get_parsed_content("train#trainer")
    seen: dict = {}

    def record(engine):
        if not seen:
            seen["iteration"] = engine.state.iteration
            seen["lr"] = engine.optimizer.param_groups[0]["lr"]
            seen["state"] = {k: v.detach().clone() for k, v in engine.network.state_dict().items()}

    trainer.add_event_handler(Events.ITERATION_STARTED, record)
    wf.run()
    wf.finalize()
    return seen


def _finetune(dataset, out: Path, pretrained: Path, files=("common.json", "train.json", "finetune.json"), **over):
    wf = ConfigWorkflow(
        config_file=config_files(*files),
        workflow_type="train",
        **{**FAST, "dataset_dir": str(dataset.parent), "output_dir": str(out), "pretrained_weights": str(pretrained)}
        | over,
    )
    wf.initialize()
    return wf


@pytest.fixture(scope="module")
def stage1_run(dataset, tmp_path_factory):
    """Stage 1 pretrained on 8 classes, fine-tuned for one iteration to the 11 extended classes."""
    tmp = tmp_path_factory.mktemp("ft1")
    pre = _pretrained(tmp / "pretrained" / "stage1.pt", seed=1)
    wf = _finetune(dataset, tmp / "run", tmp / "pretrained" / "stage1.pt")
    seen = _first_iteration_state(wf)
    return {"pretrained": pre, "pretrained_path": tmp / "pretrained" / "stage1.pt", "run": tmp / "run", "seen": seen}


def test_finetune_config_stage1_and_stage2():
    train = json.loads((CONFIGS / "train.json").read_text())
    for files, stage in [(["train.json"], "stage1"), (["train.json", "stage2.json"], "stage2")]:
        p = ConfigParser()
        p.read_config(config_files("common.json", *files, "finetune.json"))
        lr = p.get_parsed_content("optimizer#lr")
        assert lr == pytest.approx(train["learning_rate"] / 10), "the paper fine-tunes 10x slower"
        assert p.get_parsed_content("labels") == EXTENDED_LABELS and p.get_parsed_content("num_classes") == 11
        assert p.get_parsed_content("output_dir") == str(Path("runs") / f"finetune_{stage}")
        assert p.get_parsed_content("pretrained_weights") == str(Path("bundle") / "models" / f"{stage}.pt")
        cands = p.get_parsed_content("candidates_dir")
        # stage 2 is fine-tuned inside the C2 of the fine-tuned stage 1, not of the pretrained one
        assert cands == (str(Path("runs") / "finetune_stage1" / "candidates") if stage == "stage2" else None)
    # relative to whatever base optimiser comes before it (demo.json: Adam at 0.002 -> 0.0002)
    p = ConfigParser()
    p.read_config(config_files("common.json", "train.json", "demo.json", "finetune.json"))
    demo = json.loads((CONFIGS / "demo.json").read_text())
    assert p.get_parsed_content("optimizer#lr") == pytest.approx(demo["learning_rate"] / 10)
    assert p.get_parsed_content("learning_rate") == demo["learning_rate"]
    # inference workflows: right after common.json, finetune.json contributes only its labels
    p = ConfigParser()
    p.read_config(config_files("common.json", "finetune.json", "inference.json"))
    assert p.get_parsed_content("num_classes") == 11
    assert p["network"]["path"] == "@stage2_weights" and p["output_dir"] == "outputs"


def test_finetune_keeps_pretrained_weights_except_the_head(stage1_run):
    pre, seen = stage1_run["pretrained"], stage1_run["seen"]
    assert seen["iteration"] == 1
    assert seen["lr"] == pytest.approx(json.loads((CONFIGS / "train.json").read_text())["learning_rate"] / 10)
    state = seen["state"]
    assert set(state) == set(pre)
    body = [k for k in pre if not k.startswith(HEAD)]
    assert len(body) > 50
    for k in body:
        assert torch.equal(state[k], pre[k]), f"{k} is not the pretrained tensor at iteration 0"
    for k in [k for k in pre if k.startswith(HEAD)]:
        assert state[k].shape[0] == len(EXTENDED_LABELS) + 1 and pre[k].shape[0] == len(PAPER_LABELS) + 1, k
    assert state["head.conv.weight"].abs().sum() > 0, "the new head is initialised, not zero"
    final = torch.load(stage1_run["run"] / "checkpoints" / "model_final.pt", weights_only=True)["network"]
    assert final["head.conv.weight"].shape[0] == 11


def test_finetune_resumes_from_its_checkpoint_not_from_pretrained(stage1_run, dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stage1_run["run"], run)
    ckpt = torch.load(run / "checkpoints" / "checkpoint_last.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 1
    pre = stage1_run["pretrained"]
    seen = _first_iteration_state(_finetune(dataset, run, stage1_run["pretrained_path"], max_epochs=2))
    assert seen["iteration"] == 2, "the second run continues after the saved iteration"
    for k, v in ckpt["network"].items():
        assert torch.equal(seen["state"][k], v), f"{k} does not come from checkpoint_last.pt"
    # one SGD step and the BatchNorm statistics moved the weights away from the pretrained file
    changed = [k for k in pre if not k.startswith(HEAD) and not torch.equal(seen["state"][k], pre[k])]
    assert changed, "the resumed network equals the pretrained one: resume loaded the wrong file"
    last = torch.load(run / "checkpoints" / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 2


def test_candidates_then_stage2_finetune(stage1_run, dataset, tmp_path):
    # C2 for every case from the fine-tuned stage 1 (11 classes): right after common.json, finetune.json gives only the
    # labels (inference.json and candidates.json replace its network and output_dir); --stage1_dir: the fine-tuned run
    wf = ConfigWorkflow(
        config_file=config_files("common.json", "finetune.json", "inference.json", "candidates.json"),
        workflow_type=None,
        **{k: TINY[k] for k in ("features", "patch_size", "target_spacing")},
        dataset_dir=str(dataset.parent),
        stage1_dir=str(stage1_run["run"]),
    )
    assert wf.parser.get_parsed_content("num_classes") == 11
    assert wf.parser.get_parsed_content("network") is None, "the candidates step needs no stage-2 network"
    wf.initialize()
    wf.run()
    wf.finalize()
    cand = stage1_run["run"] / "candidates"
    summary = json.loads((cand / "summary.json").read_text())
    assert summary["succeeded"] == 3 and not summary["failed"]
    import nibabel as nib

    for case in json.loads(dataset.read_text())["training"]:
        cid = Path(case["image"]).name.split(".")[0]
        stage1 = np.asarray(nib.load(str(cand / f"{cid}_stage1.nii.gz")).dataobj)
        assert stage1.max() <= 10 and (cand / f"{cid}_c2.nii.gz").is_file()
    # stage 2: pretrained on 8 classes, fine-tuned inside that C2
    tmp = tmp_path / "s2"
    pre2 = _pretrained(tmp / "pretrained" / "stage2.pt", seed=2)
    wf = _finetune(
        dataset,
        tmp / "run",
        tmp / "pretrained" / "stage2.pt",
        files=("common.json", "train.json", "stage2.json", "finetune.json"),
        candidates_dir=str(cand),
    )
    assert wf.parser.get_parsed_content("candidate_key") == "c2"
    assert wf.parser.get_parsed_content("train#datalist")[0]["c2"].startswith(str(cand))
    seen = _first_iteration_state(wf)
    for k in pre2:
        if not k.startswith(HEAD):
            assert torch.equal(seen["state"][k], pre2[k]), k
    assert seen["state"]["head.conv.weight"].shape[0] == 11
    assert (tmp / "run" / "checkpoints" / "model_final.pt").is_file()
