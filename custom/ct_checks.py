"""Is this a CT the network can segment? Plausibility checks of a loaded volume and of a voxel-to-world geometry.

- :func:`affine_problems`: what is impossible about an affine for a human CT (singular, non-finite, voxel spacing
  outside :data:`SPACING_RANGE_MM`, extent above :data:`MAX_EXTENT_MM`); the NIfTI and DICOM readers refuse those.
- :func:`check_ct_volume` (or :class:`CheckCT` / :class:`CheckCTd`, used right after ``LoadImaged`` +
  ``EnsureChannelFirstd``) squeezes a size-1 fourth axis, rejects 2D and 4D inputs, fills NaN/Inf, warns about
  intensities that are not Hounsfield units and clips the padding below -1024 HU.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from custom.errors import InputError, warn_input

__all__ = ["HU_AIR", "SPACING_RANGE_MM", "MAX_EXTENT_MM", "affine_problems", "check_ct_volume", "CheckCT", "CheckCTd"]

HU_AIR = -1024.0
#: voxel spacing (mm) a human CT can have: below is a header in metres or a typo, above is a typo (200 mm slices)
SPACING_RANGE_MM = (0.05, 20.0)
#: largest physical extent (mm) along one axis: a whole-body CT is under 2 m
MAX_EXTENT_MM = 2500.0


def affine_problems(affine: Any, shape: Sequence[int], what: str = "the affine") -> list[str]:
    """What is impossible about a voxel-to-world ``affine`` for a human CT of ``shape``; empty if nothing.

    Refused: non-finite entries, a singular (or nearly singular) 3x3 part, a voxel spacing outside
    :data:`SPACING_RANGE_MM`, a physical extent above :data:`MAX_EXTENT_MM` along an axis. MONAI's ``NibabelReader``
    replaces a singular or non-finite affine by one built from the voxel sizes without a word, and a 200 mm slice
    spacing typo would resample a 400-slice CT to ~50,000 slices: these are checked before MONAI sees the file.

    >>> affine_problems(np.diag([0.8, 0.8, 200.0, 1.0]), (512, 512, 100))[0]
    'the affine: voxel spacing [0.8, 0.8, 200] mm: 200 mm along axis 2 is outside (0.05, 20] mm for a CT'
    """
    a = np.asarray(affine, dtype=np.float64)
    shown = np.array2string(a[:3] if a.shape == (4, 4) else a, precision=4, separator=", ").replace("\n", "")
    if a.shape != (4, 4):
        return [f"{what}: expected a 4x4 matrix, got shape {a.shape}"]
    if not np.all(np.isfinite(a)):
        return [f"{what} has NaN or infinite entries: {shown}"]
    sv = np.linalg.svd(a[:3, :3], compute_uv=False)
    if sv.min() <= 1e-6 * max(sv.max(), 1e-12):
        return [f"{what} is singular (an axis of zero length, or two axes along one direction): {shown}"]
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    problems = []
    lo, hi = SPACING_RANGE_MM
    off = [(i, float(v)) for i, v in enumerate(spacing) if not lo < v <= hi]
    if off:
        axes = ", ".join(f"{v:g} mm along axis {i}" for i, v in off)
        problems.append(
            f"{what}: voxel spacing {[float(f'{v:.4g}') for v in spacing]} mm: {axes} is outside "
            f"({lo:g}, {hi:g}] mm for a CT"
        )
    extent = spacing * np.asarray((list(shape)[:3] + [1, 1, 1])[:3], dtype=np.float64)  # a 2D image: 1 slice
    far = [(i, float(v)) for i, v in enumerate(extent) if v > MAX_EXTENT_MM]
    if far:
        axes = ", ".join(f"{v:.0f} mm along axis {i}" for i, v in far)
        problems.append(
            f"{what}: physical extent {[round(float(v)) for v in extent]} mm ({axes}) is larger than any human body "
            f"(limit {MAX_EXTENT_MM:g} mm): a wrong voxel size in the header?"
        )
    return problems


def _source(img: Any, path: str | os.PathLike | None) -> str | None:
    if path is not None:
        return str(path)
    meta = getattr(img, "meta", None)
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return None


def check_ct_volume(
    img: MetaTensor | torch.Tensor | np.ndarray,
    path: str | os.PathLike | None = None,
    *,
    min_slices: int = 8,
    nonfinite: Literal["fill", "error"] = "fill",
    strict: bool = False,
    check_hu: bool = True,
    clip_min: float | None = HU_AIR,
) -> MetaTensor | torch.Tensor | np.ndarray:
    """Check a channel-first CT volume ``(1, X, Y, Z)`` and return it cleaned, of the same type (metadata kept).

    - ``(C, X, Y, Z, 1)`` (a NIfTI with a size-1 fourth axis after ``EnsureChannelFirst``) is squeezed to
      ``(C, X, Y, Z)``; then ``C`` must be 1: a series of several volumes (time points, phases) is an error, because
      a CT network must never take time points for channels.
    - 2D images, and any spatial axis shorter than ``min_slices``, are errors before any computation.
    - NaN/Inf voxels: with ``nonfinite="fill"`` replaced by the smallest finite value (with a warning giving the
      count), with ``"error"`` an error. A volume without any finite voxel is always an error.
    - Intensities that do not look like HU (no air: minimum above -200, e.g. an MR, a normalised image, or raw stored
      values without the rescale intercept): a warning, an error with ``strict=True``.
    - Values below ``clip_min`` (-1024: padding outside the reconstruction circle is often -2048 or -3024) are clipped.

    ``path`` names the file in messages; by default ``img.meta["filename_or_obj"]``.

    >>> import numpy as np
    >>> vol = np.full((1, 16, 16, 16), -1000.0, dtype=np.float32)
    >>> vol[0, 4:12, 4:12, 4:12] = 40.0
    >>> vol[0, 0, 0, 0] = -3024.0
    >>> float(check_ct_volume(vol, "ct.nii.gz").min())
    -1024.0
    """
    src = _source(img, path)
    is_torch = isinstance(img, torch.Tensor)
    shape = tuple(img.shape)
    if len(shape) > 4:
        extra = shape[4:]
        if any(s != 1 for s in extra):
            raise InputError(
                src,
                f"image of shape {shape} has extra axes {extra} beyond (C, X, Y, Z): a time series or vector image; "
                "select one 3D volume first",
            )
        img = img.reshape(shape[:4]) if not is_torch else img[(Ellipsis,) + (0,) * len(extra)]
        shape = tuple(img.shape)
        meta = getattr(img, "meta", None)
        if isinstance(meta, dict) and len(np.atleast_1d(meta.get("spatial_shape", ()))) > 3:
            meta["spatial_shape"] = np.asarray(shape[1:])
    if len(shape) < 4:
        what = "a 2D image" if len(shape) <= 2 or (len(shape) == 3 and shape[0] == 1) else "no channel axis"
        raise InputError(
            src, f"expected a 3D volume, channel first (1, X, Y, Z); got shape {shape} ({what}; 2D images are refused)"
        )
    if shape[0] != 1:
        raise InputError(
            src,
            f"image of shape {shape} holds {shape[0]} volumes (a 4D series: time points or phases?); the network takes "
            "one CT volume and never treats time points as channels: select one volume first",
        )
    short = [(ax, n) for ax, n in zip("XYZ", shape[1:], strict=True) if n < min_slices]
    if short:
        desc = ", ".join(f"{ax} = {n}" for ax, n in short)
        raise InputError(
            src,
            f"too few slices ({desc}; at least {min_slices} needed along every axis): a 2D image or a slab, "
            f"shape {shape[1:]}",
        )

    floating = img.dtype.is_floating_point if is_torch else np.issubdtype(img.dtype, np.floating)
    if floating:
        finite = torch.isfinite(img) if is_torch else np.isfinite(img)
        n_bad = int(np.prod(shape)) - int(finite.sum())
        if n_bad:
            if n_bad == int(np.prod(shape)):
                raise InputError(src, "every voxel is NaN or infinite")
            if nonfinite == "error":
                raise InputError(src, f"{n_bad} voxels are NaN or infinite")
            if nonfinite != "fill":
                raise ValueError(f"nonfinite must be 'fill' or 'error', got {nonfinite!r}")
            fill = float(img[finite].min())
            warn_input(src, f"{n_bad} NaN/infinite voxels replaced by {fill:g} (the smallest finite value)")
            nan_to_num = torch.nan_to_num if is_torch else np.nan_to_num
            img = nan_to_num(img, nan=fill, posinf=fill, neginf=fill)
    lo, hi = float(img.min()), float(img.max())
    if check_hu and lo > -200.0:
        if lo >= 0.0 and hi <= 1.0:
            why = "range within [0, 1]: a normalised image?"
        elif lo >= 0.0 and hi < 100.0:
            why = "small non-negative values: an MR or a normalised image?"
        elif lo >= 0.0:
            why = "no negative values: an MR, or raw stored values without the rescale intercept (-1024)?"
        else:
            why = "no air (about -1000 HU) in the volume: an MR, a windowed or a normalised image?"
        message = f"intensities [{lo:g}, {hi:g}] do not look like CT Hounsfield units ({why})"
        if strict:
            raise InputError(src, message)
        warn_input(src, message)
    if clip_min is not None and lo < clip_min:
        img = img.clamp(min=clip_min) if is_torch else np.maximum(img, np.asarray(clip_min, dtype=img.dtype))
    return img


class CheckCT(Transform):
    """Array transform for :func:`check_ct_volume` (same arguments)."""

    def __init__(
        self,
        min_slices: int = 8,
        nonfinite: Literal["fill", "error"] = "fill",
        strict: bool = False,
        check_hu: bool = True,
        clip_min: float | None = HU_AIR,
    ):
        if nonfinite not in ("fill", "error"):
            raise ValueError(f"nonfinite must be 'fill' or 'error', got {nonfinite!r}")
        self.kwargs = dict(min_slices=min_slices, nonfinite=nonfinite, strict=strict, check_hu=check_hu)
        self.kwargs["clip_min"] = clip_min

    def __call__(self, img: Any, path: str | os.PathLike | None = None) -> Any:
        return check_ct_volume(img, path, **self.kwargs)


class CheckCTd(MapTransform):
    """Dictionary wrapper of :class:`CheckCT`, placed right after ``LoadImaged`` + ``EnsureChannelFirstd``.

    Config use::

        {"_target_": "custom.ct_checks.CheckCTd", "keys": "image", "strict": false}
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        min_slices: int = 8,
        nonfinite: Literal["fill", "error"] = "fill",
        strict: bool = False,
        check_hu: bool = True,
        clip_min: float | None = HU_AIR,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.checker = CheckCT(min_slices, nonfinite, strict, check_hu, clip_min)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = _source(d[key], None)
            if path is None:
                meta = d.get(f"{key}_meta_dict")
                path = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
            d[key] = self.checker(d[key], path)
        return d
