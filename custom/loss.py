"""Class-weighted cross-entropy inside a candidate region (paper eq. 3-4), and a Dice + CE variant.

The paper weights the voxel-wise cross-entropy of class k by

    lambda_k = (1 - N_k / N_C) / (K - 1),        (eq. 3; sum_k lambda_k = 1)

where N_C is the number of voxels in the candidate region (C1 in stage 1, C2 in stage 2) and N_k those of class k in
it; K counts the background. Voxels outside the region carry the label :data:`IGNORE_INDEX` (255, set by
``custom.candidates.MaskLabeld``) and do not count, as in the authors' code. Where the lambdas come from is a choice
the paper leaves open (``weighting``): the current batch, each patch, or the whole training volume before cropping
(the authors' code; :class:`ClassWeightsd` computes them in the data pipeline).

Normalisation: eq. 4 divides the weighted sum by N, all voxels. ``reduction="mean"`` divides by the candidate voxels
of the batch instead (MONAI / PyTorch ``ignore_index`` convention), so the scale of the loss does not depend on how
much of a patch lies outside the region; ``denominator="all"`` gives the paper's N. Note that PyTorch's
``cross_entropy(weight=...)`` divides by the sum of the weights instead: none of the two equals it.

Absent classes (``absent_classes``): a structure the training dataset does not label (AMOS has no portal vein; see
``custom.label_presets``) hides in that dataset's background, so a background voxel there means "background or an
absent structure". The losses use the marginal likelihood of that statement (the "marginal loss" of partially
labelled multi-organ segmentation, Shi et al., MedIA 2021; Fang & Yan, IEEE TMI 2020): the cross-entropy of a
background voxel is ``-log(p_0 + sum_a p_a)`` over the absent classes a, and the Dice term scores the merged
channel ``p_0 + sum_a p_a`` against the background and leaves the absent channels out. No voxel pushes an absent
class down merely for lying in the dataset's background, and nothing pushes it up either: what the network predicts
there comes from the other data it is trained or pre-trained on. (nnU-Net's ignore label does not fit: it needs the
unknown voxels marked, and here they are not known.) Voxels of a labelled structure still push every other class,
absent ones included, down. A label map that contains an absent class id is an error.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.losses import DiceLoss
from monai.transforms import MapTransform
from torch.nn.modules.loss import _Loss

__all__ = [
    "IGNORE_INDEX",
    "WEIGHTINGS",
    "class_weights",
    "ClassWeightsd",
    "CandidateWeightedCELoss",
    "CandidateDiceCELoss",
    "merge_absent_logits",
]

#: Label value of voxels outside the candidate region; the losses skip them.
IGNORE_INDEX = 255

#: Where the lambdas of eq. 3 come from: the batch, each sample (patch), the whole volume (precomputed), or none.
WEIGHTINGS = ("batch", "sample", "volume", "none")


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_tensor() if isinstance(t, MetaTensor) else t


def _check_num_classes(num_classes: int) -> int:
    k = int(num_classes)
    if k < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    return k


def _check_labels(label: torch.Tensor, valid: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    bad = valid & ((label < 0) | (label >= num_classes))
    if bool(bad.any()):
        values = torch.unique(label[bad]).tolist()[:10]
        raise ValueError(
            f"label values {values} are outside 0..{num_classes - 1} and not the ignore value {ignore_index}: "
            f"num_classes ({num_classes}) does not match the labels"
        )


def _class_counts(tgt: torch.Tensor, valid: torch.Tensor, k: int, use_bincount: bool | None = None) -> torch.Tensor:
    """(B, K) voxel counts per sample and class among ``valid`` voxels of ``tgt`` (B, ...).

    ``torch.bincount`` on CUDA has no deterministic implementation (it raises under
    ``torch.use_deterministic_algorithms(True)``); there, K comparisons are cheap for a training batch.
    """
    b = tgt.shape[0]
    if use_bincount if use_bincount is not None else tgt.device.type == "cpu":
        offset = torch.arange(b, device=tgt.device).view(-1, *([1] * (tgt.ndim - 1))) * k
        return torch.bincount((tgt + offset)[valid], minlength=b * k).view(b, k)
    flat, vflat = tgt.reshape(b, -1), valid.reshape(b, -1)
    return torch.stack([((flat == c) & vflat).sum(1) for c in range(k)], 1)


def _check_absent(absent_classes, k: int) -> tuple[int, ...]:
    out = tuple(sorted({int(a) for a in (absent_classes or ())}))
    bad = [a for a in out if not 0 < a < k]
    if bad:
        raise ValueError(f"absent_classes {bad} must be foreground class ids in 1..{k - 1} (K = {k})")
    if len(out) >= k - 1:
        raise ValueError(f"absent_classes {list(out)} leave no labelled foreground class (K = {k})")
    return out


def _check_not_absent(tgt: torch.Tensor, valid: torch.Tensor, absent: tuple[int, ...]) -> None:
    for a in absent:
        if bool(((tgt == a) & valid).any()):
            raise ValueError(
                f"label value {a} is marked absent (absent_classes {list(absent)}) but occurs in the label map: "
                "a class cannot be both labelled and unlabelled"
            )


def merge_absent_logits(logits: torch.Tensor, absent: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
    """Logits (B, K', ...) of the classes that remain when the absent classes are merged into background.

    Channel 0 becomes ``logsumexp`` of background and absent logits (so its softmax is ``p_0 + sum_a p_a``); the
    other channels are the labelled classes in order, returned as the list of their original ids.
    """
    k = logits.shape[1]
    keep = [c for c in range(1, k) if c not in absent]
    bg = torch.logsumexp(logits[:, [0, *absent]], dim=1, keepdim=True)
    return torch.cat([bg, logits[:, keep]], dim=1), keep


def _lambdas(counts: torch.Tensor) -> torch.Tensor:
    """Eq. 3 from class counts (..., K); a region without voxels gives 1/(K-1) for every class."""
    k = counts.shape[-1]
    counts = counts.to(torch.float64)
    n_c = counts.sum(-1, keepdim=True)
    frac = torch.where(n_c > 0, counts / n_c.clamp_min(1), torch.zeros_like(counts))
    return ((1.0 - frac) / (k - 1)).to(torch.float32)


def class_weights(label, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Eq. 3 lambdas of one label map: ``(1 - N_k / N_C) / (K - 1)`` over the voxels that are not ``ignore_index``.

    Args:
        label: integer class ids (any shape, numpy or torch; floats holding integers are accepted).
        num_classes: K, background included.
        ignore_index: label of voxels outside the candidate region.

    Returns:
        float32 tensor (K,), summing to 1 (unless the region is empty: then every lambda is 1/(K-1)).

    >>> class_weights(torch.tensor([0, 0, 0, 1, 255]), 2).tolist()
    [0.25, 0.75]
    """
    k = _check_num_classes(num_classes)
    lab = torch.as_tensor(np.asarray(label)) if not isinstance(label, torch.Tensor) else _plain(label)
    lab = lab.detach().reshape(-1).to(torch.int64)
    valid = lab != ignore_index
    _check_labels(lab, valid, k, ignore_index)
    return _lambdas(_class_counts(lab[None], valid[None], k)[0])


class ClassWeightsd(MapTransform):
    """Per-volume lambdas of eq. 3, computed on the whole training volume before cropping (the authors' choice).

    ``d[weights_key]`` = :func:`class_weights` of ``d[key]`` (a float32 tensor (K,); a batch collates it to (B, K)).
    Counting uses the voxels that are not ``ignore_index`` and, when ``mask_key`` is given, lie inside ``d[mask_key]``
    (for a label not yet masked with ``MaskLabeld``). With ``to_meta`` the same tensor is also put into the label's
    meta (``d[key].meta[weights_key]``), where it survives cropping and collation and where
    ``CandidateWeightedCELoss(weighting="volume")`` reads it.

    >>> d = ClassWeightsd("label", num_classes=3)({"label": MetaTensor(torch.tensor([[0, 0, 1, 2]]))})
    >>> d["class_weights"].tolist(), d["label"].meta["class_weights"].tolist()
    ([0.25, 0.375, 0.375], [0.25, 0.375, 0.375])
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        mask_key: str | None = None,
        weights_key: str = "class_weights",
        to_meta: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"ClassWeightsd takes one label key, got {self.keys}")
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = int(ignore_index)
        self.mask_key = mask_key
        self.weights_key = weights_key
        self.to_meta = to_meta

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            lab = _plain(label) if isinstance(label, torch.Tensor) else torch.as_tensor(np.asarray(label))
            if self.mask_key is not None:
                m = d[self.mask_key]
                m = _plain(m) if isinstance(m, torch.Tensor) else torch.as_tensor(np.asarray(m))
                if m.shape[-3:] != lab.shape[-3:]:
                    raise ValueError(f"mask shape {tuple(m.shape)} does not match label shape {tuple(lab.shape)}")
                lab = torch.where(m.to(lab.device) > 0, lab, torch.full_like(lab, self.ignore_index))
            w = class_weights(lab, self.num_classes, self.ignore_index)
            d[self.weights_key] = w
            if self.to_meta and isinstance(label, MetaTensor):
                label.meta[self.weights_key] = w.clone()
        return d


class CandidateWeightedCELoss(_Loss):
    """Weighted voxel-wise cross-entropy of the paper (eq. 3-4), ignoring voxels outside the candidate region.

    loss = sum over candidate voxels x of -lambda_{k(x)} log softmax(input)_{k(x)}(x), divided by the number of
    candidate voxels (``reduction="mean"``, ``denominator="candidate"``; ``denominator="all"``: by all voxels, the N of
    eq. 4), not divided (``"sum"``), or per voxel (``"none"``: (B, 1, *spatial), 0 where ignored).

    ``weighting`` selects the lambdas:

    - ``"batch"``: eq. 3 on the candidate voxels of the whole batch (one lambda vector);
    - ``"sample"``: eq. 3 per sample (patch);
    - ``"volume"``: precomputed per training volume (the authors' code), from the ``class_weights`` argument of
      ``forward`` or else from ``target.meta["class_weights"]`` ((B, K) or (K,), put there by :class:`ClassWeightsd`
      or a batch preparation); missing weights are an error;
    - ``"none"``: all lambdas 1 (plain cross-entropy on the candidate voxels).

    A class absent from the region gets lambda = 1/(K-1) but has no voxels, so it adds nothing; a batch without any
    candidate voxel gives 0 (with a gradient of zeros, not NaN). ``include_background=False`` sets lambda_0 = 0
    (background voxels still count in the denominator). ``absent_classes``: class ids the dataset does not label;
    background voxels then score ``-log(p_0 + sum_a p_a)`` (see the module docstring). The loss is computed in float32
    (safe under autocast).

    >>> loss = CandidateWeightedCELoss(num_classes=3)
    >>> logits = torch.zeros(1, 3, 2, 2, 1, requires_grad=True)
    >>> round(loss(logits, torch.tensor([[[[0], [1]], [[255], [255]]]])).item(), 4)  # (0.25 + 0.25) ln 3 / 2
    0.2747
    """

    def __init__(
        self,
        num_classes: int,
        weighting: str = "batch",
        ignore_index: int = IGNORE_INDEX,
        include_background: bool = True,
        reduction: str = "mean",
        denominator: str = "candidate",
        weights_key: str = "class_weights",
        absent_classes: Sequence[int] | None = None,
    ):
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        super().__init__(reduction=reduction)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if denominator not in ("candidate", "all"):
            raise ValueError(f"denominator must be 'candidate' or 'all', got {denominator!r}")
        self.num_classes = _check_num_classes(num_classes)
        self.weighting = weighting
        self.ignore_index = int(ignore_index)
        self.include_background = include_background
        self.denominator = denominator
        self.weights_key = weights_key
        self.absent_classes = _check_absent(absent_classes, self.num_classes)

    def prepare_target(self, input: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, *spatial) int64 target and its candidate mask, after checking shapes and values against ``input``."""
        if input.ndim < 3:
            raise ValueError(f"input must be (B, K, *spatial), got shape {tuple(input.shape)}")
        if input.shape[1] != self.num_classes:
            raise ValueError(f"input has {input.shape[1]} channels, the loss was built for K = {self.num_classes}")
        tgt = _plain(target)
        if tgt.ndim == input.ndim:
            if tgt.shape[1] != 1:
                raise ValueError(f"target must be (B, 1, *spatial) class ids, got shape {tuple(tgt.shape)}")
            tgt = tgt[:, 0]
        if tgt.shape != input.shape[:1] + input.shape[2:]:
            raise ValueError(
                f"target spatial shape {tuple(tgt.shape)} does not match input {tuple(input.shape)} "
                "(crop the label to the network's output first)"
            )
        if tgt.is_floating_point():
            tgt = tgt.round()
        tgt = tgt.to(device=input.device, dtype=torch.int64)
        valid = tgt != self.ignore_index
        _check_labels(tgt, valid, self.num_classes, self.ignore_index)
        _check_not_absent(tgt, valid, self.absent_classes)
        return tgt, valid

    def weights(
        self, tgt: torch.Tensor, valid: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, K) lambdas for the chosen ``weighting``."""
        b, k = tgt.shape[0], self.num_classes
        if self.weighting == "none":
            lam = torch.ones(b, k, device=tgt.device)
        elif self.weighting == "batch":
            lam = _lambdas(_class_counts(tgt, valid, k).sum(0)).expand(b, k)
        elif self.weighting == "sample":
            lam = _lambdas(_class_counts(tgt, valid, k))
        else:
            w = class_weights
            if w is None:
                w = target.meta.get(self.weights_key) if isinstance(target, MetaTensor) else None
            if w is None:
                raise ValueError(
                    f"weighting='volume' needs per-volume weights: pass class_weights=... or give a MetaTensor target "
                    f"with meta[{self.weights_key!r}] of shape (B, {k}) (see ClassWeightsd)"
                )
            lam = torch.as_tensor(w, dtype=torch.float32, device=tgt.device)
            if lam.ndim == 1:
                lam = lam.expand(b, -1)
            if lam.shape != (b, k):
                raise ValueError(f"class weights have shape {tuple(lam.shape)}, expected ({b}, {k}) or ({k},)")
        lam = lam.to(device=tgt.device, dtype=torch.float32)
        if not self.include_background:
            lam = lam.clone()
            lam[:, 0] = 0.0
        return lam

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            input: logits (B, K, *spatial).
            target: class ids (B, 1, *spatial) or (B, *spatial); ``ignore_index`` outside the candidate region.
            class_weights: optional (B, K) or (K,) lambdas, used by ``weighting="volume"``.
        """
        logits = _plain(input).float()
        tgt, valid = self.prepare_target(logits, target)
        return self._loss(logits, tgt, valid, target, class_weights)

    def _loss(self, logits, tgt, valid, target, class_weights) -> torch.Tensor:
        lam = self.weights(tgt, valid, target, class_weights)
        safe = torch.where(valid, tgt, torch.zeros_like(tgt))
        if self.absent_classes:  # marginal CE: a background voxel is "background or an absent class"
            lse = torch.logsumexp(logits, dim=1)
            picked = torch.gather(logits, 1, safe.unsqueeze(1)).squeeze(1)
            merged_bg = torch.logsumexp(logits[:, [0, *self.absent_classes]], dim=1)
            ce = lse - torch.where(safe == 0, merged_bg, picked)
        else:
            ce = F.cross_entropy(logits, safe, reduction="none")  # (B, *spatial)
        w = torch.gather(lam, 1, safe.flatten(1)).view_as(safe) * valid
        voxel = ce * w
        if self.reduction == "none":
            return voxel.unsqueeze(1)
        total = voxel.sum()
        if self.reduction == "sum":
            return total
        n = valid.sum() if self.denominator == "candidate" else torch.tensor(valid.numel(), device=valid.device)
        return total / n.clamp_min(1)


class CandidateDiceCELoss(_Loss):
    """The weighted cross-entropy plus a soft Dice over the candidate voxels (the paper's "future work").

    loss = ``lambda_ce`` * :class:`CandidateWeightedCELoss` + ``lambda_dice`` * MONAI ``DiceLoss`` with
    ``ignore_index``, which zeroes ignored voxels in both prediction and one-hot target, so they leave numerator and
    denominator alike. A class absent from both prediction and target of a sample gives (smooth_nr) / (smooth_dr +
    small), finite; with ``batch=True`` the Dice sums over the batch first (fewer absent-class terms).
    ``include_background`` applies to the Dice term only (as in MONAI's ``DiceCELoss``). With ``absent_classes`` the
    Dice term scores the merged background ``p_0 + sum_a p_a`` and the labelled classes only, and the CE term is the
    marginal CE (module docstring).

    >>> loss = CandidateDiceCELoss(num_classes=2)
    >>> torch.isfinite(loss(torch.zeros(1, 2, 4, 4, 4), torch.full((1, 1, 4, 4, 4), 255))).item()
    True
    """

    def __init__(
        self,
        num_classes: int,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        weighting: str = "batch",
        ignore_index: int = IGNORE_INDEX,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        squared_pred: bool = False,
        weights_key: str = "class_weights",
        absent_classes: Sequence[int] | None = None,
    ):
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0:
            raise ValueError(f"lambda_dice and lambda_ce must be >= 0, got {lambda_dice}, {lambda_ce}")
        self.ce = CandidateWeightedCELoss(
            num_classes, weighting, ignore_index, weights_key=weights_key, absent_classes=absent_classes
        )
        self.absent_classes = self.ce.absent_classes
        dice = dict(
            include_background=include_background,
            squared_pred=squared_pred,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
        )
        # with absent classes: Dice over the merged background and the labelled classes (probabilities given)
        self.dice_merged = DiceLoss(to_onehot_y=False, softmax=False, **dice)
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, ignore_index=int(ignore_index), **dice)
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = _plain(input).float()
        tgt, valid = self.ce.prepare_target(logits, target)  # checks shapes and values once for both terms
        ce = self.ce._loss(logits, tgt, valid, target, class_weights)
        if self.absent_classes:
            merged, keep = merge_absent_logits(logits, self.absent_classes)
            index = torch.zeros(self.ce.num_classes, dtype=torch.int64, device=tgt.device)
            index[keep] = torch.arange(1, len(keep) + 1, device=tgt.device)
            safe = torch.where(valid, tgt, torch.zeros_like(tgt))
            onehot = F.one_hot(index[safe], len(keep) + 1).movedim(-1, 1).to(merged.dtype)
            mask = valid.unsqueeze(1).to(merged.dtype)  # ignored voxels leave prediction and target alike
            dice = self.dice_merged(torch.softmax(merged, 1) * mask, onehot * mask)
        else:
            dice = self.dice(logits, tgt.unsqueeze(1))
        return self.lambda_ce * ce + self.lambda_dice * dice
