"""Out-of-fold C2: ``train.json``'s ``fold`` option (k-fold split, one run folder per fold) and ``candidates.json``'s
per-fold stage-1 weights (each case's C2 from the model whose validation fold held it, never from one that trained on
it), through the real configs on tiny phantoms."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import TINY, config_files, write_tiny_dataset
from monai.bundle import ConfigParser, ConfigWorkflow

from custom.cascade import OutOfFoldRunner
from custom.data import load_datalist, split_folds, train_val_split
from custom.network import ValidUNet3D
from custom.workflow import datalist

N_CASES = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("phantoms"), n_train=N_CASES, n_test=1)


def _ids(cases):
    return [c["case_id"] for c in cases]


def _parse(files, **over):
    parser = ConfigParser()
    parser.read_config(config_files(*files))
    parser.update(over)
    return parser


@pytest.mark.parametrize("n_folds", [2, 3, 4])
def test_fold_datalists_partition_the_training_cases(dataset, n_folds):
    ds = dataset
    everything = _ids(load_datalist(str(ds), key="training"))
    vals = []
    for k in range(n_folds):
        train = _ids(datalist(str(ds), split="train", fold=k, n_folds=n_folds))
        val = _ids(datalist(str(ds), split="val", fold=k, n_folds=n_folds))
        assert val and not set(train) & set(val), "a case is in the training and the validation set of one fold"
        assert sorted(train + val) == sorted(everything)
        assert (train, val) == tuple(_ids(x) for x in split_folds(load_datalist(str(ds)), n_folds, seed=0)[k])
        vals += val
    assert sorted(vals) == sorted(everything), "every case is validated by exactly one fold"


def test_fold_none_keeps_the_holdout_split_and_bad_folds_fail(dataset):
    ds = dataset
    train, val = train_val_split(load_datalist(str(ds)), val_fraction=0.25, seed=0)
    assert _ids(datalist(str(ds), split="train", val_fraction=0.25)) == _ids(train)
    assert _ids(datalist(str(ds), split="val", val_fraction=0.25)) == _ids(val)
    for fold in (-1, 2):
        with pytest.raises(ValueError, match="fold must be in 0..1"):
            datalist(str(ds), split="val", fold=fold, n_folds=2)
    with pytest.raises(ValueError, match="cannot fill 5 folds"):  # 4 cases, 5 folds
        datalist(str(ds), split="val", fold=0, n_folds=5)


def test_train_config_fold_option(dataset):
    base = {"dataset_dir": str(dataset.parent)}
    plain = _parse(["common.json", "train.json"], **base)
    assert plain.get_parsed_content("output_dir") == str(Path("runs") / "stage1")
    assert plain["fold"] is None
    p = _parse(["common.json", "train.json"], **base, fold=1, n_folds=2)
    assert p.get_parsed_content("output_dir") == str(Path("runs") / "stage1_fold1")
    assert p.get_parsed_content("ckpt_dir") == str(Path("runs") / "stage1_fold1" / "checkpoints")
    train, val = split_folds(load_datalist(str(dataset)), n_folds=2, seed=0)[1]
    assert _ids(p.get_parsed_content("train#datalist")) == _ids(train)
    assert _ids(p.get_parsed_content("validate#datalist")) == _ids(val)
    # the stage-2 and fine-tuning run folders carry the fold too
    s2 = _parse(["common.json", "train.json", "stage2.json"], fold=0)
    assert s2.get_parsed_content("output_dir") == str(Path("runs") / "stage2_fold0")
    ft = _parse(["common.json", "train.json", "finetune.json"], fold=3)
    assert ft.get_parsed_content("output_dir") == str(Path("runs") / "finetune_stage1_fold3")


def test_candidates_config_paths():
    p = _parse(["common.json", "inference.json", "candidates.json"])
    assert p.get_parsed_content("output_dir") == str(Path("runs") / "stage1" / "candidates")
    assert p.get_parsed_content("stage1_weights") == str(Path("runs") / "stage1" / "checkpoints" / "model_final.pt")
    p = _parse(["common.json", "inference.json", "candidates.json"], stage1_dir="runs/finetune_stage1")
    assert p.get_parsed_content("output_dir") == str(Path("runs") / "finetune_stage1" / "candidates")
    p = _parse(["common.json", "inference.json", "candidates.json"], out_of_fold=True)
    pattern = p.get_parsed_content("stage1_fold_weights")
    assert pattern == str(Path("runs") / "stage1_fold{fold}" / "checkpoints" / "model_final.pt")
    # the config's own stage-1 network starts from fold 0's file; the runner loads each fold's in turn
    assert p.get_parsed_content("stage1_weights") == pattern.format(fold=0)


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
    """Stands in for :class:`custom.cascade.CascadeEvaluator`: records which cases each run gets, with which weights."""
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
    assert calls == [] and not (tmp_path / "out").exists(), "nothing may run before every fold is checked"
