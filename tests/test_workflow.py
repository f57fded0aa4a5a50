import inspect

import pytest

from custom.workflow import SeededSampler


def test_seeded_sampler_depends_on_epoch_not_on_history():
    a = SeededSampler(10, seed=3)
    a.set_epoch(1)
    first = list(a)
    a.set_epoch(2)
    second = list(a)
    resumed = SeededSampler(10, seed=3)  # a new process resuming at epoch 2
    resumed.set_epoch(2)
    assert list(resumed) == second
    assert first != second
    assert sorted(i for i, _ in second) == list(range(10))


def test_datalist_rejects_unknown_split(tmp_path):
    from bundle_utils import write_tiny_dataset

    from custom.workflow import datalist

    ds = write_tiny_dataset(tmp_path, n_train=2, n_test=1)
    with pytest.raises(ValueError, match="unknown split"):
        datalist(str(ds), split="nope")
    assert {c["case_id"] for c in datalist(str(ds), split="all")} == {"phantom_0000", "phantom_0001"}


def _batch():
    import torch

    return {"image": torch.rand(1, 1, 4, 4, 4), "label": torch.ones(1, 1, 4, 4, 4), "c1": torch.zeros(1, 1, 4, 4, 4)}


@pytest.mark.parametrize("stage", [(), ("stage2.json",)])
def test_validation_batches_pass_the_candidate_region_as_the_inferers_mask(stage):
    """train.json's validator uses MONAI's PrepareBatchExtraInput: image and label as they were, the candidate key
    of the stage (c1, or c2 with stage2.json) as the ``mask`` keyword the tiled inferer takes."""
    import torch
    from bundle_utils import config_files
    from monai.bundle import ConfigParser

    from custom.inferer import ValidTiledInferer

    parser = ConfigParser()
    parser.read_config(config_files("common.json", "train.json", *stage))
    key = "c2" if stage else "c1"
    batch = _batch()
    batch[key] = (torch.rand(1, 1, 4, 4, 4) > 0.5).float()
    image, label, args, kwargs = parser.get_parsed_content("validate#prepare_batch")(batch, torch.device("cpu"))
    assert torch.equal(image, batch["image"]) and torch.equal(label, batch["label"]) and args == ()
    assert list(kwargs) == ["mask"] and torch.equal(kwargs["mask"], batch[key])
    assert "mask" in inspect.signature(ValidTiledInferer.__call__).parameters


def test_candidate_prepare_batch_without_the_candidate_key_infers_everywhere():
    import torch

    from custom.workflow import CandidatePrepareBatch

    batch = _batch()
    image, label, args, kwargs = CandidatePrepareBatch("c1")(batch)
    assert torch.equal(kwargs["mask"], batch["c1"]) and torch.equal(label, batch["label"])
    del batch["c1"]
    assert CandidatePrepareBatch("c1")(batch)[3] == {}
    assert CandidatePrepareBatch(None)(_batch())[3] == {}
    batch["label"] = "labelsTr/case.nii.gz"  # a path, not loaded: no target
    image, label, _, _ = CandidatePrepareBatch("c1")(batch)
    assert label is None and torch.equal(image, batch["image"])
