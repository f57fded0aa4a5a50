"""C2, the candidate region of stage 2 (dilated stage-1 foreground inside C1), and the label masked outside a region.

Both candidate regions do two jobs (paper, section 2.2): training patches are drawn only inside them, and the loss
counts only their voxels (the label is set to :data:`custom.loss.IGNORE_INDEX` = 255 outside, as in the authors' code;
see :class:`MaskLabeld`). At test time stage 2 is only evaluated inside C2. C1, the body mask, is
:mod:`custom.body_mask` (its names are re-exported here for configs written before the split). C2 is the stage-1
argmax foreground dilated by ``r`` voxels (paper: r = 3) and intersected with C1, with a fallback for organs that
stage 1 missed (:class:`CandidateRegiond`). Everything runs on the CPU (:mod:`custom.morphology`).

Spatial axes are (x, y, z) with z the axial (slice) axis, as MONAI's ``LoadImage`` + ``Orientation("RAS")`` give them.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from custom.body_mask import BodyMask, BodyMaskd, body_mask, opening_radii
from custom.labels import resolve_labels
from custom.loss import IGNORE_INDEX
from custom.morphology import ELEMENTS, as_mask_like, dilate, spatial, to_numpy

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "ELEMENTS",
    "candidate_region",
    "organ_flags",
    "CandidateRegion",
    "CandidateRegiond",
    "MaskLabel",
    "MaskLabeld",
    # C1, re-exported from custom.body_mask
    "body_mask",
    "opening_radii",
    "BodyMask",
    "BodyMaskd",
]


def _labels_map(labels) -> dict[str, int]:
    """Label map from a set name, a ``{name: id}`` map (gaps allowed, e.g. the real CTs' scheme) or a list of names."""
    if isinstance(labels, Mapping):
        return {str(k): int(v) for k, v in labels.items() if str(k) != "background"}
    return resolve_labels(labels)


def _label_map_array(pred, name: str = "pred") -> np.ndarray:
    """(X, Y, Z) integer label map from a label map (X, Y, Z) / (1, X, Y, Z) or class scores (K > 1, X, Y, Z)."""
    arr = to_numpy(pred)
    if arr.ndim == 4 and arr.shape[0] > 1:
        arr = arr.argmax(0)
    arr = spatial(arr, name)
    if arr.dtype.kind == "f":
        arr = np.rint(arr)
    return arr.astype(np.int64, copy=False)


def organ_flags(pred, labels, voxel_volume_ml: float, min_ml: float | Mapping[str, float] = 0.0) -> dict[str, float]:
    """Organs of ``labels`` that the stage-1 prediction misses or makes implausibly small.

    A stage-1 miss is a stage-2 miss: C2 is built from the stage-1 foreground, so an organ with no stage-1 voxels has no
    candidate voxels. The flags let :class:`CandidateRegiond` fall back to a wider region for such a case.

    Args:
        pred: label map (X, Y, Z) or (1, X, Y, Z), or class scores (K, X, Y, Z) (argmax taken).
        labels: ``{name: id}`` (gaps allowed), a label-set name (``"paper"``) or a list of names (ids 1, 2, ...).
        voxel_volume_ml: volume of one voxel in ml (mm^3 / 1000).
        min_ml: smallest plausible volume in ml, one number for all organs or ``{name: ml}`` (unnamed organs: 0).

    Returns:
        ``{name: predicted volume in ml}`` for every organ that is empty or below its ``min_ml``, in id order.

    >>> p = np.zeros((10, 10, 10), int); p[:5] = 1; p[0, 0, 0] = 2
    >>> organ_flags(p, {"liver": 1, "spleen": 2, "pancreas": 3}, voxel_volume_ml=0.001, min_ml={"spleen": 0.01})
    {'spleen': 0.001, 'pancreas': 0.0}
    """
    lab = _labels_map(labels)
    arr = _label_map_array(pred)
    top = max(lab.values(), default=0)
    counts = np.bincount(arr.ravel().clip(0, top + 1), minlength=top + 2) if arr.size else np.zeros(top + 2, int)
    flags: dict[str, float] = {}
    for name, idx in sorted(lab.items(), key=lambda kv: kv[1]):
        vol = float(counts[idx]) * float(voxel_volume_ml)
        lim = float(min_ml.get(name, 0.0)) if isinstance(min_ml, Mapping) else float(min_ml)
        if counts[idx] == 0 or vol < lim:
            flags[name] = vol
    return flags


def candidate_region(
    pred,
    radius: int = 3,
    element: str = "ball",
    body=None,
    per_class_radius: Mapping | None = None,
) -> np.ndarray:
    """Candidate region C2: the foreground (``pred > 0``) of a stage-1 prediction dilated by ``radius`` voxels.

    ``element="ball"`` dilates by the Euclidean ball of radius r (all offsets with length <= r; the paper's "voxel
    radius"), computed exactly with a separable truncated squared distance transform; ``"cube"`` by a 3x3x3 cube
    applied r times (a (2r+1)^3 cube; the authors' test-time code used 5 iterations), computed separably. Both equal
    ``scipy.ndimage.binary_dilation`` with the same element and are much faster for r >= 3. The result is intersected
    with ``body`` (C1) when given, so C2 never leaves the body. Radii count voxels of the grid ``pred`` is on: on
    anisotropic grids the region is anisotropic in mm, as in the paper.

    Args:
        pred: label map (X, Y, Z) / (1, X, Y, Z), or class scores (K, X, Y, Z) (argmax taken). Training uses the
            ground truth here (the authors' code dilates the ground truth for training, the prediction for testing).
        radius: dilation radius r in voxels (of the grid ``pred`` is on); 0 keeps the foreground.
        element: ``"ball"`` or ``"cube"``.
        body: optional C1 mask, same spatial shape.
        per_class_radius: ``{class id: r}`` overriding ``radius`` for some classes (keys may be strings, as from JSON),
            e.g. a wider margin for the often under-segmented pancreas.

    Returns:
        bool array (X, Y, Z); empty when ``pred`` has no foreground.

    >>> p = np.zeros((9, 9, 9), int); p[4, 4, 4] = 1
    >>> int(candidate_region(p, 1).sum()), int(candidate_region(p, 1, "cube").sum())
    (7, 27)
    """
    if element not in ELEMENTS:
        raise ValueError(f"element must be one of {ELEMENTS}, got {element!r}")
    arr = _label_map_array(pred)
    if per_class_radius:
        radii = {int(k): int(v) for k, v in per_class_radius.items()}
        present = np.unique(arr[arr > 0])
        groups: dict[int, list[int]] = {}
        for c in present.tolist():
            groups.setdefault(radii.get(c, int(radius)), []).append(c)
        out = np.zeros(arr.shape, dtype=bool)
        for r, ids in groups.items():
            out |= dilate(np.isin(arr, ids), r, element)
    else:
        out = dilate(arr > 0, int(radius), element)
    if body is not None:
        b = spatial(to_numpy(body), "body")
        if b.shape != out.shape:
            raise ValueError(f"body mask shape {b.shape} differs from the prediction's {out.shape}")
        out &= b.astype(bool)
    return out


class CandidateRegion(Transform):
    """Array transform of :func:`candidate_region`: stage-1 label map (1, X, Y, Z) [+ C1] -> uint8 C2 (1, X, Y, Z).

    >>> p = torch.zeros(1, 9, 9, 9); p[0, 4, 4, 4] = 2
    >>> int(CandidateRegion(radius=2)(p).sum())
    33
    """

    def __init__(self, radius: int = 3, element: str = "ball", per_class_radius: Mapping | None = None):
        if element not in ELEMENTS:
            raise ValueError(f"element must be one of {ELEMENTS}, got {element!r}")
        self.radius = int(radius)
        self.element = element
        self.per_class_radius = per_class_radius

    def __call__(self, pred, body=None) -> torch.Tensor:
        mask = candidate_region(pred, self.radius, self.element, body=body, per_class_radius=self.per_class_radius)
        return as_mask_like(mask, pred)


FALLBACKS = ("c1", "wider", "none")


class CandidateRegiond(MapTransform):
    """Dictionary wrapper of :class:`CandidateRegion` with a check for organs that stage 1 missed.

    ``d[output_key]`` = C2 of the label map ``d[key]`` (the stage-1 prediction at test time, the ground truth for
    training as in the authors' code), intersected with ``d[body_key]`` (C1) unless ``body_key`` is None.

    Fallback. Stage 2 sees only C2, so an organ that stage 1 missed cannot be recovered there. When ``labels`` is given,
    :func:`organ_flags` lists the organs that are absent from ``d[key]`` or smaller than ``min_ml`` (with
    ``labels=None`` only an empty foreground is flagged, as ``"foreground"``). For a flagged case:

    - ``fallback="c1"`` (default): C2 = C1 (the whole volume without ``body_key``): stage 2 then works like stage 1 on
      that case, slower but not blind to the missed organ;
    - ``"wider"``: C2 = C1 ∩ (foreground dilated by ``fallback_radius``): cheaper, for organs that stage 1 found too
      small rather than not at all (an empty foreground still gives an empty C2);
    - ``"none"``: C2 as usual; the case is only flagged.

    Output meta: ``"c2_fraction"`` (voxel fraction of C2; the paper reports ~10%), ``"c2_flags"`` (flagged organs, comma
    separated, "" when none: a string collates across a batch) and ``"c2_fallback"`` (bool: a fallback was applied).
    Flags are logged as warnings. Organ volumes use ``voxel_volume_ml``, or the affine of ``d[key]`` when None.

    >>> p = MetaTensor(torch.zeros(1, 8, 8, 8)); p[0, 2, 2, 2] = 1
    >>> d = CandidateRegiond("pred", body_key=None, radius=1, labels={"liver": 1, "spleen": 2})({"pred": p})
    >>> d["c2"].meta["c2_flags"], bool(d["c2"].all())
    ('spleen', True)
    """

    def __init__(
        self,
        keys: KeysCollection,
        body_key: str | None = "c1",
        output_key: str = "c2",
        radius: int = 3,
        element: str = "ball",
        per_class_radius: Mapping | None = None,
        labels: str | Mapping[str, int] | Sequence[str] | None = None,
        min_ml: float | Mapping[str, float] = 0.0,
        fallback: str = "c1",
        fallback_radius: int = 10,
        voxel_volume_ml: float | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"CandidateRegiond takes one label key, got {self.keys}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        self.body_key = body_key
        self.output_key = output_key
        self.op = CandidateRegion(radius, element, per_class_radius)
        self.labels = _labels_map(labels) if labels is not None else None
        self.min_ml = min_ml
        self.fallback = fallback
        self.fallback_radius = int(fallback_radius)
        self.voxel_volume_ml = voxel_volume_ml

    def _voxel_ml(self, pred) -> float:
        if self.voxel_volume_ml is not None:
            return float(self.voxel_volume_ml)
        if isinstance(pred, MetaTensor):
            aff = np.asarray(pred.affine.cpu() if isinstance(pred.affine, torch.Tensor) else pred.affine, dtype=float)
            return float(abs(np.linalg.det(aff[:3, :3]))) / 1000.0
        return 0.001  # 1 mm^3

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            body = d[self.body_key] if self.body_key is not None else None
            mask = self.op(pred, body)
            arr = _label_map_array(pred)
            if self.labels is not None:
                flags = organ_flags(arr, self.labels, self._voxel_ml(pred), self.min_ml)
            else:
                flags = {} if (arr > 0).any() else {"foreground": 0.0}
            applied = bool(flags) and self.fallback != "none"
            if applied:
                logger.warning(
                    "stage-1 prediction %s: missing or small %s; C2 fallback %r",
                    getattr(pred, "meta", {}).get("filename_or_obj", key),
                    {k: round(v, 2) for k, v in flags.items()},
                    self.fallback,
                )
                if self.fallback == "c1":
                    full = np.ones(arr.shape, bool) if body is None else spatial(to_numpy(body), "body").astype(bool)
                    mask = as_mask_like(full, pred)
                else:
                    wider = CandidateRegion(max(self.fallback_radius, self.op.radius), self.op.element)(pred, body)
                    mask = wider | mask
            if not isinstance(mask, MetaTensor):
                mask = MetaTensor(mask)
            mask.meta["c2_fraction"] = float(mask.float().mean()) if mask.numel() else 0.0
            mask.meta["c2_flags"] = ",".join(flags)
            mask.meta["c2_fallback"] = applied
            logger.debug("C2 of %s: %.1f%% of voxels", key, 100 * mask.meta["c2_fraction"])
            d[self.output_key] = mask
        return d


class MaskLabel(Transform):
    """Set a label map to ``ignore_index`` (255) outside a mask, returning a copy; the loss then skips those voxels.

    >>> MaskLabel()(torch.tensor([[1, 2, 0]]), torch.tensor([[1, 0, 1]])).tolist()
    [[1, 255, 0]]
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        self.ignore_index = int(ignore_index)

    def __call__(self, label, mask):
        lab = label.clone() if isinstance(label, torch.Tensor) else torch.as_tensor(np.array(label))
        m = mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(np.asarray(mask))
        m = m.to(lab.device)
        if m.ndim > lab.ndim or m.shape[-3:] != lab.shape[-3:]:
            raise ValueError(f"mask shape {tuple(m.shape)} does not match label shape {tuple(lab.shape)}")
        if lab.dtype in (torch.bool, torch.int8):
            lab = lab.to(torch.int16)
        lab[(m == 0).expand_as(lab)] = self.ignore_index
        return lab


class MaskLabeld(MapTransform):
    """Dictionary wrapper of :class:`MaskLabel`: label = 255 outside ``d[mask_key]`` (C1 for stage 1, C2 for stage 2).

    The masked label goes to ``output_key`` (default: replaces ``d[key]``); ``original_key`` keeps an unmasked copy
    (e.g. for validation Dice on the whole volume).

    >>> d = MaskLabeld("label", mask_key="c1", original_key="label_full")(
    ...     {"label": torch.tensor([[1, 2]]), "c1": torch.tensor([[0, 1]])})
    >>> d["label"].tolist(), d["label_full"].tolist()
    ([[255, 2]], [[1, 2]])
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "c1",
        output_key: str | None = None,
        original_key: str | None = None,
        ignore_index: int = IGNORE_INDEX,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if (output_key is not None or original_key is not None) and len(self.keys) != 1:
            raise ValueError("output_key / original_key need exactly one key")
        self.mask_key = mask_key
        self.output_key = output_key
        self.original_key = original_key
        self.op = MaskLabel(ignore_index)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.original_key is not None:
                d[self.original_key] = d[key]
            d[self.output_key or key] = self.op(d[key], d[self.mask_key])
        return d
