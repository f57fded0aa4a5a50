import math

import numpy as np
import pytest
from parameterized import parameterized

from custom.metrics import candidate_recall_fpr, dice_per_class, summarize

DICE_CASES = [
    # pred, gt, expected {name: dice}
    ([1, 1, 0, 2], [1, 0, 0, 2], {"a": 2 / 3, "b": 1.0, "c": math.nan}),
    ([0, 0, 0, 0], [1, 1, 0, 0], {"a": 0.0, "b": math.nan, "c": math.nan}),
    ([3, 3, 0, 0], [0, 0, 0, 0], {"a": math.nan, "b": math.nan, "c": math.nan}),  # FP only: absent in gt -> NaN
]


@parameterized.expand(DICE_CASES)
def test_dice_per_class(pred, gt, expected):
    got = dice_per_class(np.array(pred), np.array(gt), {"a": 1, "b": 2, "c": 3})
    for k, v in expected.items():
        assert (math.isnan(v) and math.isnan(got[k])) or got[k] == pytest.approx(v)


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(np.zeros((2, 2)), np.zeros((2, 3)), {"a": 1})


def test_recall_fpr_monotone_and_exact():
    gt = np.zeros((21, 21, 21), np.uint8)
    gt[5:16, 5:16, 5:16] = 1
    pred = np.zeros_like(gt)
    pred[8:13, 8:13, 8:13] = 1  # a core 3 voxels inside the organ on every side
    rows = candidate_recall_fpr(pred, gt, None, {"organ": 1}, radii=[0, 1, 3, 6])
    organ = [r for r in rows if r["organ"] == "organ"]
    assert organ[0]["recall"] == pytest.approx(125 / 1331)
    assert organ[0]["fpr"] == 0.0
    recalls = [r["recall"] for r in organ]
    assert recalls == sorted(recalls)
    # a ball of radius 3 around a cube core does not reach the organ's corners; radius 6 covers everything
    assert organ[2]["recall"] < 1.0 and organ[3]["recall"] == 1.0
    assert organ[3]["fpr"] > 0.0
    assert [r["organ"] for r in rows].count("all") == 4


def test_recall_fpr_empty_prediction():
    gt = np.zeros((9, 9, 9), np.uint8)
    gt[3:6, 3:6, 3:6] = 1
    rows = candidate_recall_fpr(np.zeros_like(gt), gt, None, {"organ": 1}, radii=[0, 3])
    assert all(r["recall"] == 0.0 and r["fpr"] == 0.0 for r in rows)


def test_summarize_ignores_nan():
    s = summarize([0.5, math.nan, 0.7])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.6) and s["min"] == 0.5 and s["max"] == 0.7
    assert summarize([math.nan])["n"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_per_class_equals_monais_dice_metric(seed):
    """The joint-histogram Dice (one pass, no one-hot volume) is MONAI's DiceMetric(ignore_empty=True) per class."""
    import torch
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    rng = np.random.default_rng(seed)
    k = 5
    gt = rng.integers(0, k - 1, size=(12, 10, 8))  # class k - 1 absent from the ground truth: NaN in both
    pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, k, size=gt.shape))
    labels = {f"c{i}": i for i in range(1, k)}
    ours = dice_per_class(pred, gt, labels)
    y_pred, y = (one_hot(torch.as_tensor(a)[None, None], num_classes=k) for a in (pred, gt))
    monai = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(y_pred, y)[0]
    np.testing.assert_allclose(list(ours.values()), monai.double().numpy(), rtol=1e-6)
    assert np.isnan(ours[f"c{k - 1}"])
