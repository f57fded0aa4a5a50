"""Out-of-fold C2 (:class:`custom.out_of_fold.OutOfFoldRunner`): each case's C2 from the stage-1 model whose
validation fold held it, through ``candidates.json`` on tiny phantoms and with a stand-in evaluator; refusals before
any work."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import TINY, config_files
from monai.bundle import ConfigWorkflow

from custom.data import load_datalist, split_folds
from custom.network import ValidUNet3D
from custom.out_of_fold import OutOfFoldRunner

N_CASES = 4


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset(n_train=N_CASES, n_test=1)


def _ids(cases):
    return [c["case_id"] for c in cases]


def _constant_stage1(path: Path, cls: int, num_classes: int = 8) -> Path:
    """Stage-1 weights that label every voxel ``cls``: a zero head with a one-hot bias (distinct per fold)."""
    torch.manual_seed(cls)
    net = ValidUNet3D(in_channels=1, out_channels=num_classes, features=TINY["features"])
    with torch.no_grad():
        net.head.conv.weight.zero_()
        net.head.conv.bias.fill_(-10.0)
        net.head.conv.bias[cls] = 10.0
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network": net.state_dict()}, path)
    return path


def test_out_of_fold_candidates_use_each_fold_model(dataset, tmp_path):
    pattern = str(tmp_path / "stage1_fold{fold}" / "checkpoints" / "model_final.pt")
    for k in range(2):
        _constant_stage1(Path(pattern.format(fold=k)), cls=k + 1)  # fold 0 predicts artery (1), fold 1 portal vein (2)
    out = tmp_path / "candidates"
    wf = ConfigWorkflow(
        config_file=config_files("common.json", "inference.json", "candidates.json"),
        workflow_type=None,
        **{k: TINY[k] for k in ("features", "patch_size", "target_spacing")},
        dataset_dir=str(dataset.parent),
        output_dir=str(out),
        out_of_fold=True,
        n_folds=2,
        stage1_fold_weights=pattern,
    )
    wf.initialize()
    wf.run()
    wf.finalize()  # exits non-zero if a case failed
    folds = split_folds(load_datalist(str(dataset)), n_folds=2, seed=0)
    expected = {c["case_id"]: k for k, (_, val) in enumerate(folds) for c in val}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["succeeded"] == N_CASES and not summary["failed"]
    assert summary["case_fold"] == expected
    assert {int(k): f["weights"] for k, f in summary["folds"].items()} == {k: pattern.format(fold=k) for k in (0, 1)}
    for case_id, k in expected.items():
        stage1 = np.asarray(nib.load(str(out / f"{case_id}_stage1.nii.gz")).dataobj)
        c2 = np.asarray(nib.load(str(out / f"{case_id}_c2.nii.gz")).dataobj)
        # the stage-1 labels of this case are those of its own fold's model, and only those
        assert set(np.unique(stage1)) - {0} == {k + 1}, (case_id, k, np.unique(stage1))
        assert c2.any() and c2.shape == stage1.shape


def _stub_runner(cases, out: Path):
    """Stands in for :class:`custom.evaluator.CascadeEvaluator`: records which cases each run gets, with which
    weights."""
    calls = []
    net = ValidUNet3D(in_channels=1, out_channels=8, features=TINY["features"])

    def run(check=True):
        calls.append(([c["case_id"] for c in stub.data], net.head.conv.bias.argmax().item()))
        stub.case_seconds.update({c["case_id"]: {"total": 0.0} for c in stub.data})

    stub = SimpleNamespace(
        data=list(cases),
        inferer=SimpleNamespace(stage1_network=net),
        failures=[],
        case_seconds={},
        run=run,
        check_existing=lambda: None,
    )
    return stub, calls


def test_out_of_fold_runner_without_config(dataset, tmp_path):
    ds = dataset
    cases = load_datalist(str(ds))
    pattern = str(tmp_path / "f{fold}.pt")
    for k in range(2):
        _constant_stage1(Path(pattern.format(fold=k)), cls=k + 3)
    stub, calls = _stub_runner(cases, tmp_path / "out")
    summary = OutOfFoldRunner(stub, pattern, dataset_json=str(ds), n_folds=2, output_dir=str(tmp_path / "out")).run()
    folds = split_folds(cases, n_folds=2, seed=0)
    # one runner pass per fold, over that fold's validation cases, with that fold's weights loaded
    assert calls == [(_ids(val), k + 3) for k, (_, val) in enumerate(folds)]
    assert stub.data == cases, "the runner gets its full case list back"
    assert summary["succeeded"] == N_CASES
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["case_fold"] == summary["case_fold"]
    # without fold weights it is the runner's own run
    stub, calls = _stub_runner(cases, tmp_path / "out2")
    OutOfFoldRunner(stub, None).run()
    assert calls == [(_ids(cases), calls[0][1])]


REFUSALS = [
    ({"n_folds": 3}, FileNotFoundError, "missing for 1 of 3 folds"),  # fold 2's weights file was never trained
    ({"extra_case": True}, ValueError, "in no fold"),  # a case the stage-1 folds never held out
    ({"pattern": "w.pt"}, ValueError, "must contain"),  # one file for every fold: not out of fold
]


@pytest.mark.parametrize("opts, error, message", REFUSALS)
def test_out_of_fold_runner_refuses_before_running(dataset, tmp_path, opts, error, message):
    n_folds = opts.get("n_folds", 2)
    pattern = str(tmp_path / opts.get("pattern", "f{fold}.pt"))
    for k in range(2):  # files for folds 0 and 1 only
        _constant_stage1(Path(pattern.replace("{fold}", str(k))), cls=1)
    cases = load_datalist(str(dataset))
    if opts.get("extra_case"):
        cases = [*cases, {"case_id": "not_in_the_dataset", "image": "x.nii.gz"}]
    stub, calls = _stub_runner(cases, tmp_path / "out")
    with pytest.raises(error, match=message):
        OutOfFoldRunner(
            stub, pattern, dataset_json=str(dataset), n_folds=n_folds, output_dir=str(tmp_path / "out")
        ).run()
