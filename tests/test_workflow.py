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
