"""Per-organ metrics of the paper's evaluation: Dice per class, and C2 recall / false-positive rate against r.

Conventions (as MONAI's ``DiceMetric(ignore_empty=True)``): the Dice of a class absent from the ground truth is NaN,
and summaries average with ``nanmean``; the case is reported as "absent" for that organ rather than scored 0 or 1.

A structure the dataset does not label at all (``absent``, from ``custom.label_presets``: AMOS has no portal vein)
is unlabelled, not background: whatever the network predicts there cannot be scored, so its Dice is NaN in every
case and it leaves the mean. After ``source_labels`` mapping such a class never occurs in the ground truth, so the
NaN rule above already gives this; ``absent`` makes it explicit (and holds even if the prediction has the class).
Predicting an absent class does not lower the Dice of the labelled classes, except where it overlaps them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage


def dice_per_class(
    pred: np.ndarray, gt: np.ndarray, labels: Mapping[str, int], absent: Sequence[str] = ()
) -> dict[str, float]:
    """Dice of each named class between two integer label maps of the same shape; NaN where ``gt`` lacks the class
    or where the class is ``absent`` (not labelled in the dataset).

    >>> dice_per_class(np.array([1, 1, 0, 2]), np.array([1, 0, 0, 2]), {"a": 1, "b": 2, "c": 3})
    {'a': 0.6666666666666666, 'b': 1.0, 'c': nan}
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    unknown = sorted(set(absent) - set(labels))
    if unknown:
        raise ValueError(f"absent structure(s) {unknown} are not in the label set {sorted(labels)}")
    n = int(max(pred.max(initial=0), gt.max(initial=0), *labels.values())) + 1
    # one joint histogram instead of K passes over the volume
    joint = np.bincount(gt.astype(np.int64).ravel() * n + pred.astype(np.int64).ravel(), minlength=n * n)
    joint = joint.reshape(n, n)
    out = {}
    for name, k in labels.items():
        g, p, tp = joint[k, :].sum(), joint[:, k].sum(), joint[k, k]
        out[name] = float("nan") if g == 0 or name in absent else float(2.0 * tp / (g + p))
    return out


def candidate_recall_fpr(
    stage1: np.ndarray,
    gt: np.ndarray,
    body: np.ndarray | None,
    labels: Mapping[str, int],
    radii: Sequence[int] = (0, 1, 2, 3, 4, 5, 6),
) -> list[dict]:
    """Recall and false-positive rate of the dilated stage-1 prediction, per organ and radius (the paper's Fig. 6).

    For organ k and radius r, with D = stage-1 mask of k dilated by a ball of radius r (inside ``body`` when given)
    and G = ground truth of k: recall = |D ∩ G| / |G| and FPR = |D \\ G| / |B \\ G| with B the body mask (C1), so FPR is
    the fraction of the non-organ body that the candidate region keeps. ``"all"`` is the same for the whole foreground,
    i.e. for C2 itself. Rows: ``{"organ", "r", "recall", "fpr", "c2_fraction"}``.
    """
    body = np.ones(gt.shape, bool) if body is None else np.asarray(body, bool)
    rows = []
    items = [(name, stage1 == k, gt == k) for name, k in labels.items()] + [("all", stage1 > 0, gt > 0)]
    for name, p, g in items:
        # distance from the prediction: dilation by a ball of radius r = {dist <= r}; one EDT serves every radius
        dist = ndimage.distance_transform_edt(~p) if p.any() else np.full(p.shape, np.inf)
        n_g, n_neg = g.sum(), (body & ~g).sum()
        for r in radii:
            d = (dist <= r) & body
            rows.append(
                {
                    "organ": name,
                    "r": int(r),
                    "recall": float((d & g).sum() / n_g) if n_g else float("nan"),
                    "fpr": float((d & ~g).sum() / n_neg) if n_neg else float("nan"),
                    "c2_fraction": float(d.mean()),
                }
            )
    return rows


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, std, median, min, max ignoring NaN (absent organs), and the number of cases scored."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {
            "mean": float("nan"),
            "std": float("nan"),
            "median": float("nan"),
            "min": float("nan"),
            "max": float("nan"),
            "n": 0,
        }
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.size),
    }
