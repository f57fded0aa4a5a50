"""Class-weighted CE of the paper (eq. 3-4) inside the candidate region, its weights, and the Dice + CE variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.transforms import SpatialCropd
from parameterized import parameterized

from custom.loss import (
    IGNORE_INDEX,
    CandidateDiceCELoss,
    CandidateWeightedCELoss,
    ClassWeightsd,
    _class_counts,
    class_weights,
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def _lambdas(labels: np.ndarray, k: int) -> np.ndarray:
    """Eq. 3 by hand: (1 - N_k / N_C) / (K - 1) over the non-ignored voxels."""
    lab = labels[labels != IGNORE_INDEX]
    n_c = lab.size
    return np.array([(1 - ((lab == c).sum() / n_c if n_c else 0.0)) / (k - 1) for c in range(k)])


def ref_ce(logits, target, weighting, volume_weights=None, reduction="mean", denominator="candidate"):
    """Eq. 4 by hand, voxel by voxel, in float64."""
    logp = _log_softmax(logits.astype(np.float64))
    b, k = logits.shape[:2]
    total = 0.0
    for i in range(b):
        if weighting == "batch":
            lam = _lambdas(target, k)
        elif weighting == "sample":
            lam = _lambdas(target[i], k)
        elif weighting == "volume":
            lam = volume_weights[i]
        else:
            lam = np.ones(k)
        for idx in np.ndindex(target.shape[1:]):
            t = target[(i, *idx)]
            if t != IGNORE_INDEX:
                total -= lam[t] * logp[(i, t, *idx)]
    if reduction == "sum":
        return total
    n = (target != IGNORE_INDEX).sum() if denominator == "candidate" else target.size
    return total / max(n, 1)


def _case(seed, b=2, k=4, shape=(5, 4, 3), p_ignore=0.3, absent=None):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (b, k, *shape)).astype(np.float32)
    target = rng.integers(0, k, (b, *shape))
    if absent is not None:
        target[target == absent] = 0
    target[rng.random(target.shape) < p_ignore] = IGNORE_INDEX
    return logits, target


# ---------------------------------------------------------------- eq. 3


def test_class_weights_by_hand():
    # N_C = 3 (255 ignored), N_0 = 2, N_1 = 1, N_2 = 0 -> ((1 - 2/3) / 2, (1 - 1/3) / 2, 1 / 2)
    w = class_weights(np.array([[0, 0], [1, 255]]), num_classes=3)
    assert w.dtype == torch.float32 and w.shape == (3,)
    np.testing.assert_allclose(w.numpy(), [1 / 6, 1 / 3, 1 / 2], rtol=1e-6)
    assert float(w.sum()) == pytest.approx(1.0)


@parameterized.expand([(k, s) for k in (2, 3, 8) for s in (0, 1)])
def test_class_weights_random(k, seed):
    _, target = _case(seed, k=k)
    np.testing.assert_allclose(class_weights(torch.from_numpy(target), k).numpy(), _lambdas(target, k), rtol=1e-6)
    assert float(class_weights(target.astype(np.float32), k).sum()) == pytest.approx(1.0, abs=1e-6)


@parameterized.expand([(1,), (3,)])
def test_counting_paths_agree(b):
    _, target = _case(13, b=b, k=5)
    tgt = torch.from_numpy(target)
    valid = tgt != IGNORE_INDEX
    by_bincount = _class_counts(tgt, valid, 5, use_bincount=True)
    by_compare = _class_counts(tgt, valid, 5, use_bincount=False)  # the CUDA path (deterministic)
    torch.testing.assert_close(by_bincount, by_compare)
    expected = [[int(((target[i] == c) & (target[i] != 255)).sum()) for c in range(5)] for i in range(b)]
    assert by_bincount.tolist() == expected


def test_class_weights_empty_region_and_errors():
    np.testing.assert_allclose(class_weights(np.full(5, 255), 3).numpy(), [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="num_classes"):
        class_weights(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match=">= 2"):
        class_weights(np.array([0]), 1)


def test_class_weights_d_meta_mask_collate_and_crop():
    labels = [MetaTensor(torch.tensor([[[[0, 1], [2, 1]], [[0, 0], [1, 255]]]])) for _ in range(2)]
    labels[1][0, 0, 0, 0] = 2
    mask = torch.ones(1, 2, 2, 2, dtype=torch.uint8)
    mask[0, 1] = 0
    tf = ClassWeightsd("label", num_classes=3)
    d0 = tf({"label": labels[0]})
    np.testing.assert_allclose(d0["class_weights"].numpy(), _lambdas(labels[0].numpy(), 3), rtol=1e-6)
    assert d0["class_weights"].dtype == torch.float32
    torch.testing.assert_close(d0["label"].meta["class_weights"], d0["class_weights"])
    masked = ClassWeightsd("label", num_classes=3, mask_key="c1", to_meta=False)(
        {"label": labels[1].clone(), "c1": mask}
    )
    np.testing.assert_allclose(masked["class_weights"].numpy(), _lambdas(labels[1][:, 0].numpy(), 3), rtol=1e-6)
    assert "class_weights" not in masked["label"].meta
    d1 = tf({"label": labels[1]})
    # the per-volume weights survive a crop and collate to (B, K), both in the dict and in the label's meta
    crop = SpatialCropd("label", roi_start=(0, 0, 0), roi_end=(1, 2, 2))
    batch = list_data_collate([crop(d0), crop(d1)])
    assert batch["class_weights"].shape == (2, 3)
    torch.testing.assert_close(batch["label"].meta["class_weights"], batch["class_weights"])
    assert batch["label"].shape == (2, 1, 1, 2, 2)


# ---------------------------------------------------------------- eq. 4

CE_CASES = [
    ("batch", "batch", 2, 4, "mean", "candidate"),
    ("sample", "sample", 2, 4, "mean", "candidate"),
    ("none", "none", 2, 4, "mean", "candidate"),
    ("volume", "volume", 2, 4, "mean", "candidate"),
    ("k2", "batch", 1, 2, "mean", "candidate"),
    ("k8_sample", "sample", 3, 8, "mean", "candidate"),
    ("sum", "batch", 2, 3, "sum", "candidate"),
    ("paper_n", "batch", 2, 3, "mean", "all"),
]


@parameterized.expand(CE_CASES)
def test_ce_matches_hand_computation(_name, weighting, b, k, reduction, denominator):
    logits, target = _case(7, b=b, k=k, absent=1 if k > 2 else None)
    vol = np.random.default_rng(1).dirichlet(np.ones(k), size=b).astype(np.float32)
    loss = CandidateWeightedCELoss(k, weighting=weighting, reduction=reduction, denominator=denominator)
    tgt = MetaTensor(torch.from_numpy(target)[:, None])
    if weighting == "volume":
        tgt.meta["class_weights"] = torch.from_numpy(vol)
    got = loss(torch.from_numpy(logits), tgt)
    assert got.shape == ()
    assert float(got) == pytest.approx(ref_ce(logits, target, weighting, vol, reduction, denominator), rel=1e-5)


def test_ce_tiny_example_by_hand():
    # 4 voxels, K = 3: labels 0, 0, 1, ignored. lambdas 1/6, 1/3, 1/2 (class 2 absent).
    logits = torch.tensor([[[2.0, 0.0, 0.0, 5.0], [0.0, 0.0, 1.0, 5.0], [0.0, 1.0, 0.0, 5.0]]]).view(1, 3, 4, 1, 1)
    target = torch.tensor([0, 0, 1, 255]).view(1, 1, 4, 1, 1)
    lse = [np.log(np.exp(2) + 2), np.log(2 + np.e), np.log(2 + np.e)]
    expected = ((lse[0] - 2) / 6 + lse[1] / 6 + (lse[2] - 1) / 3) / 3
    assert float(CandidateWeightedCELoss(3)(logits, target)) == pytest.approx(expected, rel=1e-6)


def test_reduction_none_and_target_forms():
    logits, target = _case(3)
    x = torch.from_numpy(logits)
    loss = CandidateWeightedCELoss(4, reduction="none")
    per_voxel = loss(x, torch.from_numpy(target)[:, None])
    assert per_voxel.shape == (2, 1, 5, 4, 3)
    assert (per_voxel[:, 0][torch.from_numpy(target) == 255] == 0).all()
    mean = CandidateWeightedCELoss(4)
    v = mean(x, torch.from_numpy(target))
    torch.testing.assert_close(v, mean(x, torch.from_numpy(target).float()[:, None]))  # (B, ...) / float labels
    torch.testing.assert_close(v, per_voxel.sum() / (target != 255).sum())


def test_ignored_voxels_do_not_matter():
    logits, target = _case(4)
    x = torch.from_numpy(logits)
    y = torch.from_numpy(target)[:, None]
    changed = x.clone()
    changed[(y == 255).expand_as(x)] = 100.0
    for loss in (CandidateWeightedCELoss(4, weighting="sample"), CandidateDiceCELoss(4)):
        torch.testing.assert_close(loss(x, y), loss(changed, y))


def test_gradients_only_on_candidate_voxels():
    logits, target = _case(5)
    x = torch.from_numpy(logits).requires_grad_(True)
    y = torch.from_numpy(target)[:, None]
    CandidateWeightedCELoss(4)(x, y).backward()
    g = x.grad.abs().sum(1, keepdim=True)
    assert (g[y == 255] == 0).all() and (g[y != 255] > 0).all()


@parameterized.expand([("ce", CandidateWeightedCELoss), ("dice_ce", CandidateDiceCELoss)])
def test_all_ignored_gives_zero_with_grad(_name, cls):
    x = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    y = torch.full((2, 1, 4, 4, 4), 255)
    for weighting in ("batch", "sample", "none"):
        loss = cls(3, weighting=weighting)(x, y)
        assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
        loss.backward()
        assert torch.isfinite(x.grad).all()
        x.grad = None


@parameterized.expand([("ce", CandidateWeightedCELoss), ("dice_ce", CandidateDiceCELoss)])
def test_absent_classes_and_single_class_patch(_name, cls):
    x = torch.randn(2, 5, 4, 4, 4, requires_grad=True)
    y = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)  # background only: classes 1-4 absent, lambda_0 = 0
    y[1, 0, :2] = 3
    for weighting in ("batch", "sample"):
        loss = cls(5, weighting=weighting)(x, y)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        x.grad = None


def test_include_background_false():
    logits, target = _case(6, k=3)
    x, y = torch.from_numpy(logits), torch.from_numpy(target)
    got = CandidateWeightedCELoss(3, include_background=False, reduction="sum")(x, y)
    lam = _lambdas(target, 3)
    lam[0] = 0.0
    logp = _log_softmax(logits.astype(np.float64))
    valid = target != 255
    t = np.where(valid, target, 0)
    expected = -(lam[t] * np.take_along_axis(logp, t[:, None], 1)[:, 0] * valid).sum()
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_bfloat16_input_is_computed_in_float32():
    logits, target = _case(8)
    x = torch.from_numpy(logits)
    y = torch.from_numpy(target)
    loss = CandidateWeightedCELoss(4)
    out = loss(x.bfloat16(), y)
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(float(loss(x.bfloat16().float(), y)), rel=1e-6)


def test_volume_weights_argument_and_errors():
    logits, target = _case(9, b=2, k=3)
    x, y = torch.from_numpy(logits), torch.from_numpy(target)
    loss = CandidateWeightedCELoss(3, weighting="volume")
    w = torch.tensor([0.2, 0.3, 0.5])
    assert float(loss(x, y, class_weights=w)) == pytest.approx(
        ref_ce(logits, target, "volume", np.stack([w.numpy()] * 2)), rel=1e-5
    )
    with pytest.raises(ValueError, match="per-volume weights"):
        loss(x, y)
    with pytest.raises(ValueError, match="per-volume weights"):
        loss(x, MetaTensor(y))
    with pytest.raises(ValueError, match="shape"):
        loss(x, y, class_weights=torch.ones(3, 3))


@parameterized.expand(
    [
        ("channels", (2, 4, 5, 4, 3), (2, 1, 5, 4, 3), 3, "channels"),
        ("label_value", (2, 3, 5, 4, 3), (2, 1, 5, 4, 3), 3, "num_classes"),
        ("spatial", (2, 3, 5, 4, 3), (2, 1, 5, 4, 4), 3, "spatial shape"),
        ("target_channels", (2, 3, 5, 4, 3), (2, 2, 5, 4, 3), 3, r"\(B, 1"),
    ]
)
def test_shape_and_class_errors(_name, in_shape, t_shape, k, match):
    x = torch.zeros(in_shape)
    y = torch.zeros(t_shape, dtype=torch.long)
    if _name == "label_value":
        y[0, 0, 0, 0, 0] = 3
    for loss in (CandidateWeightedCELoss(k), CandidateDiceCELoss(k)):
        with pytest.raises(ValueError, match=match):
            loss(x, y)


@parameterized.expand(
    [({"weighting": "paper"},), ({"reduction": "max"},), ({"denominator": "n"},), ({"num_classes": 1},)]
)
def test_bad_constructor_arguments(kwargs):
    args = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError):
        CandidateWeightedCELoss(**args)


# ---------------------------------------------------------------- Dice + CE


def ref_dice(logits, target, include_background=True, batch=False, smooth=1e-5):
    """Soft Dice by hand over the candidate voxels: ignored voxels leave numerator and denominator."""
    p = np.exp(_log_softmax(logits.astype(np.float64)))
    k = logits.shape[1]
    valid = (target != IGNORE_INDEX)[:, None]
    onehot = np.stack([(target == c) for c in range(k)], 1) & valid
    p = p * valid
    axes = tuple(range(2, p.ndim))
    inter, denom = (p * onehot).sum(axes), p.sum(axes) + onehot.sum(axes)
    if batch:
        inter, denom = inter.sum(0), denom.sum(0)
    d = 1 - (2 * inter + smooth) / (denom + smooth)
    return (d if include_background else d[..., 1:]).mean()


@parameterized.expand(
    [
        ("default", 1.0, 1.0, True, False),
        ("no_background", 1.0, 1.0, False, False),
        ("batch_dice", 0.5, 2.0, True, True),
        ("dice_only", 1.0, 0.0, True, False),
    ]
)
def test_dice_ce_matches_hand_computation(_name, l_dice, l_ce, include_background, batch):
    logits, target = _case(10, k=4, absent=2)
    loss = CandidateDiceCELoss(4, l_dice, l_ce, include_background=include_background, batch=batch)
    got = loss(torch.from_numpy(logits), torch.from_numpy(target)[:, None])
    expected = l_ce * ref_ce(logits, target, "batch") + l_dice * ref_dice(logits, target, include_background, batch)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_dice_ce_volume_weighting_reads_meta():
    logits, target = _case(11, k=3)
    vol = np.array([[0.1, 0.3, 0.6], [0.5, 0.25, 0.25]], np.float32)
    y = MetaTensor(torch.from_numpy(target)[:, None])
    y.meta["class_weights"] = torch.from_numpy(vol)
    got = CandidateDiceCELoss(3, weighting="volume")(torch.from_numpy(logits), y)
    assert float(got) == pytest.approx(ref_ce(logits, target, "volume", vol) + ref_dice(logits, target), rel=1e-5)


@pytest.mark.gpu
def test_cuda_deterministic_bf16_autocast():
    """On CUDA: same value as on the CPU, under deterministic algorithms and bf16 autocast, weights from meta."""
    logits, target = _case(12, b=2, k=4, shape=(12, 10, 8))
    vol = np.random.default_rng(2).dirichlet(np.ones(4), size=2).astype(np.float32)
    y = MetaTensor(torch.from_numpy(target)[:, None])
    y.meta["class_weights"] = torch.from_numpy(vol)  # stays on the CPU, as after collation
    torch.use_deterministic_algorithms(True)
    try:
        for weighting in ("batch", "sample", "volume"):
            for cls in (CandidateWeightedCELoss, CandidateDiceCELoss):
                loss = cls(4, weighting=weighting)
                cpu = loss(torch.from_numpy(logits), y)
                x = torch.from_numpy(logits).cuda().requires_grad_(True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    gpu = loss(x.bfloat16(), y.cuda())
                gpu.backward()
                assert gpu.dtype == torch.float32 and torch.isfinite(x.grad).all()
                assert float(gpu) == pytest.approx(float(cpu), rel=2e-2)  # bf16 rounding of the logits
    finally:
        torch.use_deterministic_algorithms(False)
