"""Training patches drawn inside the candidate region (C1 for stage 1, C2 for stage 2), never short at borders.

The paper draws every training sub-volume "from C1 or C2" (section 2.3); the authors' code puts patch centres only
where the label is not 255 (255 marks voxels outside the candidate region). MONAI's ``RandWeightedCropd`` and
``RandCropByPosNegLabeld`` return short patches or raise near borders unless the whole volume is padded first, which
costs a full copy per volume. :class:`RandCandidateCropd` instead pads lazily: it allocates only the box it returns,
fills it with the pad value and copies in the part that overlaps the volume.

The box is ``patch_size + 2 * aug_margin`` per axis: the network input (``patch_size``) plus room for the on-device
augmentation (:class:`custom.augment.RandElasticRigid3D`) to rotate, translate and deform without running out of data.
The drawn candidate voxel sits at the centre voxel of the network's output region (index ``output_size // 2``).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.transforms.traits import MultiSampleTrait

__all__ = [
    "RandCandidateCropd",
    "crop_box",
    "draw_candidate_voxels",
    "as_triple",
]


def as_triple(value: int | float | Sequence[int] | Sequence[float], name: str = "value") -> tuple:
    """Expand a scalar to three per-axis values (x, y, z); pass a length-3 sequence through.

    >>> as_triple(4), as_triple((1, 2, 3))
    ((4, 4, 4), (1, 2, 3))
    """
    if isinstance(value, (int, float, np.integer, np.floating)):
        return (value, value, value)
    out = tuple(value)
    if len(out) != 3:
        raise ValueError(f"{name} needs one value or three (x, y, z), got {value!r}")
    return out


def crop_box(img, start: Sequence[int], size: Sequence[int], pad_value: float = 0.0):
    """Crop the box ``[start, start + size)`` of the spatial axes of a channel-first array, padding what lies outside.

    Only the returned box is allocated (no padded copy of the volume). ``start`` may be negative and the box may run
    past the far border. A MetaTensor keeps its meta data with the affine moved to the box origin, so the crop stays in
    the right place in world coordinates; its transform history is dropped (the crop is not invertible).

    >>> x = torch.arange(4.0).reshape(1, 4, 1, 1)
    >>> crop_box(x, (-1, 0, 0), (3, 1, 1), pad_value=-9).flatten().tolist()
    [-9.0, 0.0, 1.0]
    """
    spatial = img.shape[1:]
    if len(start) != len(spatial) or len(size) != len(spatial):
        raise ValueError(f"start {start} and size {size} must have one entry per spatial axis of shape {img.shape}")
    src, dst = [slice(None)], [slice(None)]
    for s0, n, dim in zip(start, size, spatial, strict=True):
        lo, hi = max(int(s0), 0), min(int(s0) + int(n), int(dim))
        if hi <= lo:  # box entirely outside the volume along this axis
            lo = hi = 0
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s0), hi - int(s0)))
    shape = (img.shape[0], *(int(n) for n in size))
    if isinstance(img, np.ndarray):
        out = np.full(shape, pad_value, dtype=img.dtype)
        out[tuple(dst)] = img[tuple(src)]
        return out
    data = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
    out = torch.full(shape, pad_value, dtype=data.dtype, device=data.device)
    out[tuple(dst)] = data[tuple(src)]
    if isinstance(img, MetaTensor):
        affine = img.affine.clone().to(torch.float64)
        shift = torch.as_tensor([float(s) for s in start], dtype=torch.float64)
        affine[:-1, -1] = affine[:-1, -1] + affine[:-1, :-1] @ shift
        meta = dict(img.meta)
        meta.pop("affine", None)
        out = MetaTensor(out, affine=affine, meta=meta)
    return out


def draw_candidate_voxels(mask, num: int, rng: np.random.RandomState) -> tuple[np.ndarray, bool]:
    """Draw ``num`` voxels uniformly (with replacement) among the true voxels of a channel-first mask.

    Returns ``(voxels (num, 3) int array, found)``; ``found`` is False when the mask is empty, in which case the voxels
    are drawn uniformly over the whole volume. Cost: one pass to count true voxels per x-slice, then an index search
    inside the chosen slices only, instead of materialising the indices of all true voxels (millions for C1).

    >>> m = np.zeros((1, 4, 5, 6), bool); m[0, 1, 2, 3] = True
    >>> draw_candidate_voxels(m, 2, np.random.RandomState(0))[0].tolist()
    [[1, 2, 3], [1, 2, 3]]
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy() if not isinstance(mask, MetaTensor) else mask.as_tensor().cpu().numpy()
    mask = np.asarray(mask)
    m = mask[0] if mask.shape[0] == 1 else mask.any(axis=0)
    m = m if m.dtype == bool else m > 0
    spatial = m.shape
    per_x = np.count_nonzero(m.reshape(spatial[0], -1), axis=1)
    cum = np.cumsum(per_x)
    total = int(cum[-1]) if cum.size else 0
    if total == 0:
        flat = rng.randint(0, int(np.prod(spatial)), size=num)
        return np.stack(np.unravel_index(flat, spatial), axis=1), False
    ranks = rng.randint(0, total, size=num)
    xs = np.searchsorted(cum, ranks, side="right")
    out = np.empty((num, 3), dtype=np.int64)
    for i, (x, r) in enumerate(zip(xs, ranks, strict=True)):
        within = r - (cum[x - 1] if x > 0 else 0)
        flat = np.flatnonzero(m[x])[within]
        out[i] = (x, *np.unravel_index(flat, spatial[1:]))
    return out, True


class RandCandidateCropd(Randomizable, MapTransform, MultiSampleTrait):
    """Crop ``num_samples`` boxes centred on random candidate voxels; image, label and candidate mask identically.

    Args:
        keys: the keys to crop (image and label); the candidate key is cropped as well.
        candidate_key: the candidate-region mask ("c1" for stage 1, "c2" for stage 2), channel-first, true inside.
        patch_size: the network input size (x, y, z).
        margin: the network's margin per side (44 for the valid U-Net); the output region is
            ``patch_size - 2 * margin`` and its centre voxel is the drawn candidate voxel.
        aug_margin: extra voxels per side for the on-device augmentation (see
            :meth:`custom.augment.RandElasticRigid3D.required_margin`); the box is ``patch_size + 2 * aug_margin``.
        num_samples: boxes per input dictionary; the result is a list (MONAI's multi-sample convention).
        image_pad_value: fill value outside the volume for keys not in ``label_keys`` (air after normalisation).
        label_pad_value: fill value outside the volume for ``label_keys`` (255: ignored by the loss).
        label_keys: which of ``keys`` are label maps.
        keep_candidate: also return the cropped candidate mask; False drops the key from the samples (the label
            already marks the outside of the candidate region with 255, so training does not need it: saves a
            third of the crop and collation work).
        allow_missing_keys: skip missing keys (e.g. no label at inference).

    Other keys (e.g. "class_weights") are passed through unchanged; the candidate mask is padded with 0. Each crop's
    meta data gets ``patch_index`` and ``crop_center`` (the drawn voxel, in the input volume). Training only: the
    crop is not invertible.

    >>> img = MetaTensor(torch.rand(1, 20, 20, 20)); lab = torch.zeros(1, 20, 20, 20, dtype=torch.uint8)
    >>> c1 = torch.zeros(1, 20, 20, 20, dtype=torch.bool); c1[0, 0, 0, 0] = True
    >>> crop = RandCandidateCropd(patch_size=(100, 100, 92), aug_margin=2, num_samples=2)
    >>> out = crop({"image": img, "label": lab, "c1": c1})
    >>> len(out), tuple(out[0]["image"].shape), int(out[0]["label"][0, 0, 0, 0])
    (2, (1, 104, 104, 96), 255)
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        candidate_key: str = "c1",
        patch_size: Sequence[int] = (132, 132, 116),
        margin: int | Sequence[int] = 44,
        aug_margin: int | Sequence[int] = 0,
        num_samples: int = 1,
        image_pad_value: float = 0.0,
        label_pad_value: int = 255,
        label_keys: Sequence[str] = ("label",),
        keep_candidate: bool = True,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.candidate_key = candidate_key
        self.patch_size = tuple(int(v) for v in as_triple(patch_size, "patch_size"))
        self.margin = tuple(int(v) for v in as_triple(margin, "margin"))
        self.aug_margin = tuple(int(v) for v in as_triple(aug_margin, "aug_margin"))
        if any(p - 2 * m <= 0 for p, m in zip(self.patch_size, self.margin, strict=True)) or min(self.margin) < 0:
            raise ValueError(f"patch_size {self.patch_size} leaves no output region with margin {self.margin}")
        if min(self.aug_margin) < 0:
            raise ValueError(f"aug_margin must be >= 0, got {self.aug_margin}")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.image_pad_value = float(image_pad_value)
        self.label_pad_value = label_pad_value
        self.label_keys = tuple(label_keys)
        self.keep_candidate = bool(keep_candidate)
        self.box_size = tuple(p + 2 * a for p, a in zip(self.patch_size, self.aug_margin, strict=True))
        # box start = drawn voxel - offset: the drawn voxel lands on the output region's centre voxel
        self.offset = tuple(
            m + (p - 2 * m) // 2 + a for p, m, a in zip(self.patch_size, self.margin, self.aug_margin, strict=True)
        )
        self._centres: np.ndarray | None = None

    def randomize(self, data: Mapping[Hashable, object]) -> None:
        """Draw the crop centres from the candidate mask in ``data``."""
        centres, found = draw_candidate_voxels(data[self.candidate_key], self.num_samples, self.R)
        if not found:
            warnings.warn(
                f"RandCandidateCropd: candidate mask {self.candidate_key!r} is empty; drawing patches anywhere",
                stacklevel=2,
            )
        self._centres = centres

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict[Hashable, object]]:
        d = dict(data)
        if self.candidate_key not in d:
            raise KeyError(f"candidate mask key {self.candidate_key!r} not in data (keys: {list(d)})")
        keys = [k for k in self.key_iterator(d) if k != self.candidate_key]
        reference = d[self.candidate_key].shape[1:]
        for k in keys:
            if tuple(d[k].shape[1:]) != tuple(reference):
                raise ValueError(
                    f"{k!r} has spatial shape {tuple(d[k].shape[1:])}, candidate mask has {tuple(reference)}"
                )
        self.randomize(d)
        out = []
        for i, centre in enumerate(self._centres):
            start = [int(c) - o for c, o in zip(centre, self.offset, strict=True)]
            sample = dict(d)
            if not self.keep_candidate:
                sample.pop(self.candidate_key)
            for k in [*keys, self.candidate_key] if self.keep_candidate else keys:
                if k == self.candidate_key:
                    pad = 0
                else:
                    pad = self.label_pad_value if k in self.label_keys else self.image_pad_value
                crop = crop_box(d[k], start, self.box_size, pad)
                if isinstance(crop, MetaTensor):
                    crop.meta["patch_index"] = i
                    crop.meta["crop_center"] = [int(c) for c in centre]
                sample[k] = crop
            out.append(sample)
        return out
