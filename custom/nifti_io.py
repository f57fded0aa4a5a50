"""Reading and writing NIfTI files with checks: a damaged file or an impossible header fails naming the file.

- :func:`load_nifti_checked` reads a NIfTI as MONAI's ``LoadImage`` does (same metadata), after
  :func:`check_nifti_header` (colour images, singular or non-finite affines, implausible voxel sizes: MONAI would
  silently replace a broken affine); every read error becomes an :class:`~custom.errors.InputError` with a short
  statement of what is wrong (:func:`describe_read_error`: truncated gzip, truncated header, ...).
- :func:`write_nifti_safely` writes atomically (:func:`custom.outputs.atomic_write`) and refuses to overwrite
  unless asked.

Why not ``LoadImaged(reader=...)`` with a checking reader: when a user-named reader raises, ``LoadImage`` silently
falls back to its default readers.
"""

from __future__ import annotations

import functools
import gzip
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader
from monai.transforms import LoadImage

from custom.ct_checks import affine_problems
from custom.errors import InputError, warn_input
from custom.outputs import atomic_write

__all__ = [
    "NIFTI_SUFFIXES",
    "nifti_case_id",
    "nifti_header_problems",
    "check_nifti_header",
    "describe_read_error",
    "load_nifti_checked",
    "write_nifti_safely",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_case_id(path: str | os.PathLike) -> str | None:
    """File name without its NIfTI extension, or ``None`` if the name does not end in ``.nii``/``.nii.gz``.

    >>> nifti_case_id("/data/imagesTs/case_0001.nii.gz")
    'case_0001'
    """
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def nifti_header_problems(img: Any) -> list[str]:
    """Problems of a NIfTI image as nibabel reads it (header only): colour data, and :func:`affine_problems` of the
    affine nibabel picks (the sform if its code is set, else the qform, else the voxel sizes)."""
    hdr = img.header
    problems = []
    dtype = img.get_data_dtype()
    if dtype.fields is not None or int(hdr.get("datatype", 0)) in (128, 2304):
        kind = {128: "RGB24", 2304: "RGBA32"}.get(int(hdr.get("datatype", 0)), str(dtype))
        problems.append(
            f"an RGB colour image (NIfTI datatype {kind}): a screenshot, a rendered overlay or a photograph, not a CT "
            "volume; convert the scan itself (grey values in HU)"
        )
    codes = (int(hdr["sform_code"]), int(hdr["qform_code"])) if "sform_code" in hdr else (0, 0)
    which = "the sform" if codes[0] else "the qform" if codes[1] else "the voxel sizes (pixdim; no sform or qform)"
    try:
        affine = img.affine
    except Exception as e:
        return problems + [f"{which} cannot be read ({type(e).__name__}: {e})"]
    problems += affine_problems(affine, img.shape, f"{which} (the voxel-to-world affine)")
    return problems


def check_nifti_header(path: str | os.PathLike) -> Any:
    """Read a NIfTI header with nibabel and raise :class:`InputError` naming ``path`` on any
    :func:`nifti_header_problems`; returns the (lazy) nibabel image."""
    try:
        img = nib.load(path)
    except Exception as e:
        raise InputError(path, describe_read_error(e, path)) from e
    problems = nifti_header_problems(img)
    if problems:
        raise InputError(path, "; ".join(problems))
    return img


def describe_read_error(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """Turn a nibabel/gzip/OS exception into a short statement of what is wrong with the file.

    With ``path``, a file that nibabel finds no header in is looked at once more: a ``.gz`` whose compressed stream
    stops early is reported as a truncated gzip (cut inside the header), a short ``.nii`` as a truncated header.
    """
    msg = str(exc)
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, EOFError):
        return "truncated gzip: the compressed data end before the image does (interrupted download or copy?)"
    if isinstance(exc, (gzip.BadGzipFile, zlib.error)):
        return f"corrupt gzip data ({msg})"
    if isinstance(exc, nib.filebasedimages.ImageFileError):
        if "not a gzip file" in msg:
            return "not a gzip file although the name ends in .gz"
        if "Empty file" in msg:
            return "empty file (0 bytes)"
        return _diagnose_headerless(path) or "not a NIfTI file (no valid NIfTI header)"
    if isinstance(exc, OSError) and "Expected" in msg and "bytes" in msg:
        return f"truncated NIfTI: the file is shorter than its header says ({msg.splitlines()[0]})"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"unreadable ({type(exc).__name__}: {msg})"


def _diagnose_headerless(path: str | os.PathLike | None) -> str | None:
    if path is None or not os.path.isfile(path):
        return None
    try:
        if str(path).lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                head = f.read(540)
                f.read()  # to the end: a stream cut anywhere raises EOFError
        else:
            with open(path, "rb") as f:
                head = f.read(540)
    except EOFError:
        return "truncated gzip: the compressed data end before the image does (interrupted download or copy?)"
    except (OSError, zlib.error) as e:
        return f"corrupt gzip data ({e})"
    if head[:2] == b"\x1f\x8b":
        return "a gzip-compressed file named .nii: rename it to .nii.gz"
    # a NIfTI file starts with sizeof_hdr = 348 (NIfTI-1) or 540 (NIfTI-2), little- or big-endian
    for size in (348, 540):
        if head[:4] in (size.to_bytes(4, "little"), size.to_bytes(4, "big")) and len(head) < size:
            return f"truncated NIfTI header: {len(head)} bytes, the header alone is {size}"
    return None


@functools.lru_cache(maxsize=8)
def _nifti_loader(ensure_channel_first: bool, dtype: Any) -> LoadImage:
    # LoadImage registers every default reader on construction (one warns about nvImageCodec): build it once, quietly.
    # The reader is passed per call, so that a failure is raised here instead of falling back to another reader.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoadImage(image_only=True, dtype=dtype, ensure_channel_first=ensure_channel_first)


def load_nifti_checked(p: Path, ensure_channel_first: bool = True, dtype: Any = np.float32) -> MetaTensor:
    """Read the NIfTI ``p`` with MONAI's ``NibabelReader`` (the metadata ``LoadImaged`` gives), voxel data included,
    after :func:`check_nifti_header`; warns when the header has no orientation or its qform and sform disagree."""
    check_nifti_header(p)
    try:
        img = _nifti_loader(ensure_channel_first, dtype)(p, NibabelReader())
    except Exception as e:  # every failure becomes one clear message
        raise InputError(p, describe_read_error(e, p)) from e
    if int(img.meta.get("qform_code", 1)) == 0 and int(img.meta.get("sform_code", 1)) == 0:
        warn_input(p, "NIfTI header has no orientation (qform_code = sform_code = 0): left/right may be wrong")
    _warn_qform_sform(p)
    return img


def _warn_qform_sform(p: Path, tol_mm: float = 0.1) -> None:
    """Warn when the header's qform and sform (both set) place the voxels differently: viewers that prefer the qform
    show another orientation or position than the one used here (the sform's, as nibabel and MONAI read it)."""
    try:
        hdr = nib.load(str(p)).header
        if int(hdr["qform_code"]) == 0 or int(hdr["sform_code"]) == 0:
            return
        q, s = np.asarray(hdr.get_qform(), np.float64), np.asarray(hdr.get_sform(), np.float64)
    except Exception:
        return
    diff = float(np.abs(q - s).max())
    if diff > tol_mm:
        warn_input(
            p,
            f"qform and sform disagree (largest difference {diff:.3g}; qform_code {int(hdr['qform_code'])}, "
            f"sform_code {int(hdr['sform_code'])}): the sform is used; viewers that read the qform show it elsewhere",
        )


def write_nifti_safely(
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    overwrite: bool = False,
    dtype: Any = None,
    channel_dim: int | None = None,
) -> Path:
    """Write a 3D array (or a 4D channel-last one) as NIfTI atomically: to a temporary file in the same folder, then
    renamed into place.

    A reader never sees a half-written file, and an interrupted run leaves no truncated output behind. An existing
    file is kept unless ``overwrite=True`` (``FileExistsError`` naming it). Both qform and sform are set (code 1,
    scanner) so that every viewer agrees on the orientation.

    Shapes: ``(X, Y, Z)``; ``(1, X, Y, Z)`` (the channel is dropped); ``(X, Y, Z, C)`` written as a 4D NIfTI (the
    NIfTI convention). A 4D array whose first axis is the smallest, ``(C, X, Y, Z)``, is refused unless
    ``channel_dim=0`` says so (it is then moved last): written as is, its channels would become a spatial axis.
    Types: NIfTI has no float16 (written as float32) and nibabel refuses int64 by default (written as the smallest of
    uint8/int16/int32 that holds the values); ``dtype`` forces a type.

    >>> write_nifti_safely(np.zeros((4, 4, 4), np.uint8), np.eye(4), "out/seg.nii.gz")  # doctest: +SKIP
    PosixPath('out/seg.nii.gz')
    """
    p = Path(path).expanduser()
    if nifti_case_id(p) is None:
        raise ValueError(f"{p}: output name must end in .nii or .nii.gz")
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if channel_dim is not None:
        if data.ndim != 4:
            raise ValueError(f"{p}: channel_dim={channel_dim} needs a 4D array, got shape {data.shape}")
        data = np.moveaxis(data, channel_dim, -1)
    elif data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    elif data.ndim == 4 and data.shape[0] < data.shape[-1]:
        raise ValueError(
            f"{p}: 4D array of shape {data.shape} looks channel-first (C, X, Y, Z); NIfTI stores channels last: "
            "pass channel_dim=0, or channel_dim=-1 if it really is (X, Y, Z, C)"
        )
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise ValueError(f"{p}: expected a 3D array (or a 4D channel-last one), got shape {data.shape}")
    if dtype is not None:
        data = data.astype(dtype)
    elif data.dtype == bool:
        data = data.astype(np.uint8)
    elif data.dtype == np.float16:
        data = data.astype(np.float32)
    elif data.dtype in (np.int64, np.uint64):
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        for t in (np.uint8, np.int16, np.int32):
            if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                data = data.astype(t)
                break
        else:
            raise ValueError(f"{p}: integer values [{lo}, {hi}] do not fit int32; pass dtype= explicitly")
    aff = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    aff = np.asarray(aff, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ValueError(f"{p}: affine must be a finite, invertible 4x4 matrix, got\n{aff}")
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p}: file exists; pass overwrite=True to replace it")
    img = nib.Nifti1Image(data, aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    suffix = ".nii.gz" if p.name.lower().endswith(".nii.gz") else ".nii"
    with atomic_write(p, overwrite=overwrite, suffix=suffix) as tmp:
        nib.save(img, str(tmp))
    return p
