"""Folds for out-of-fold C2: ``train.json``'s ``fold`` option (k-fold split, one run folder per fold) and
``candidates.json``'s per-fold paths, through the real configs on tiny phantoms. The runner that uses them is
``tests/test_out_of_fold.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from bundle_utils import config_files
from monai.bundle import ConfigParser

from custom.data import load_datalist, split_folds, train_val_split
from custom.workflow import datalist

N_CASES = 4


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset(n_train=N_CASES, n_test=1)


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
