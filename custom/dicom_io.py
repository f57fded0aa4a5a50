"""Reading DICOM series: listing the series of a folder and stacking one into a checked HU volume.

Why not MONAI's ``PydicomReader`` for DICOM folders: it orders slices by InstanceNumber, only warns when slice sizes
differ, has no gap check and reads every DICOM file of a folder as one series. Here slices are ordered along the
slice normal, gaps, duplicates, mixed sizes/orientations/rescales and truncated pixel data are errors naming the
file, and non-image objects (reports, RT objects, screenshots) are left out with a warning.

- :func:`scan_dicom_series` groups a folder's image files by SeriesInstanceUID; :func:`choose_series` picks one.
- :func:`load_dicom_series` stacks one series into a float32 HU volume and its RAS affine;
  :func:`load_dicom_metatensor` gives it as the ``MetaTensor`` MONAI's loaders would.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst

from custom.ct_checks import affine_problems
from custom.errors import InputError, warn_input

__all__ = [
    "SERIES_UID_ADVICE",
    "NON_IMAGE_MODALITIES",
    "NON_IMAGE_SOP_PREFIXES",
    "NoImageSlices",
    "is_dicom_file",
    "is_broken_link",
    "visible_files",
    "scan_dicom_series",
    "choose_series",
    "load_dicom_series",
    "load_dicom_metatensor",
]

#: how a user chooses one DICOM series, on the bundle command line and in Python
SERIES_UID_ADVICE = (
    "choose one with --datalist#series_uid <SeriesInstanceUID> on the bundle command line (series_uid= in Python), "
    "or put each series in its own folder"
)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a file with the DICOM Part 10 magic ``DICM`` at byte 128 (any extension or none)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_broken_link(p: Path) -> bool:
    """True for a symbolic link whose target does not exist."""
    return p.is_symlink() and not p.exists()


def visible_files(folder: Path, broken: bool = False) -> list[Path]:
    """The files of ``folder`` that can be images, sorted by name."""
    # hidden files (".DS_Store", macOS "._x.nii.gz" resource forks) and DICOMDIR indexes are never images;
    # with broken=True, broken symbolic links are listed too (they fail as cases instead of vanishing)
    return sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() or (broken and is_broken_link(p)))
        and not p.name.startswith(".")
        and p.name.upper() != "DICOMDIR"
    )


_NO_UID = ""  # key for files without a SeriesInstanceUID (anonymised exports often blank it)


#: Modalities of DICOM objects that are not slices of an image volume (reports, RT objects, annotations)
NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "SEG", "DOC"})
#: SOP Class UID prefixes of non-image objects: SR and key objects (88.), presentation states (11.), RT (481.),
#: encapsulated documents (104.), raw data (66), secondary captures (7: screenshots such as dose reports)
NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.481.",
    "1.2.840.10008.5.1.4.1.1.104.",
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.7",
)


class NoImageSlices(InputError):
    """A DICOM folder that holds only non-image objects (a dose report exported as its own series)."""


def _non_image_reason(ds: Any) -> str | None:
    """Why a DICOM header is not a slice of an image volume, or ``None`` if it is one."""
    modality = str(getattr(ds, "Modality", "") or "").upper()
    sop = str(getattr(ds, "SOPClassUID", "") or "")
    sop_name = getattr(getattr(ds, "SOPClassUID", None), "name", sop)
    if modality in NON_IMAGE_MODALITIES:
        return f"modality {modality} ({sop_name})"
    if sop.startswith(NON_IMAGE_SOP_PREFIXES):
        return f"{sop_name} (modality {modality or '?'})"
    if "Rows" not in ds:
        return f"no image (no Rows/Columns; {sop_name}, modality {modality or '?'})"
    return None


def scan_dicom_series(folder: str | os.PathLike, files: Sequence[Path] | None = None) -> dict[str, list[Path]]:
    """Group the DICOM image files of a folder by SeriesInstanceUID (headers only; ``""`` for files without one).

    Non-image objects (structured and dose reports, presentation states, key objects, RT dose/structures, secondary
    captures, anything without Rows/Columns) are left out with an :class:`InputWarning` that names them.
    """
    import pydicom

    folder = Path(folder)
    if files is None:
        files = [f for f in visible_files(folder) if is_dicom_file(f)]
    if not files:
        raise InputError(folder, "no DICOM files (with the DICM magic) in this folder")
    groups: dict[str, list[Path]] = {}
    skipped: list[str] = []
    for f in files:
        try:
            ds = pydicom.dcmread(
                f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPClassUID", "Modality", "Rows"]
            )
        except Exception as e:  # any parse error is a bad file
            raise InputError(f, f"unreadable DICOM file ({type(e).__name__}: {e})") from e
        why = _non_image_reason(ds)
        if why is not None:
            skipped.append(f"{f.name}: {why}")
            continue
        groups.setdefault(str(getattr(ds, "SeriesInstanceUID", "") or _NO_UID), []).append(f)
    if skipped:
        listed = "; ".join(skipped[:5]) + (f"; ... ({len(skipped)} in all)" if len(skipped) > 5 else "")
        warn_input(folder, f"skipped {len(skipped)} DICOM object(s) that are not image slices: {listed}")
    if not groups:
        raise NoImageSlices(
            folder, f"no DICOM image slices in this folder, only other objects: {'; '.join(skipped[:5])}"
        )
    return groups


def _describe_series(series: Mapping[str, Sequence[Path]]) -> str:
    import pydicom

    lines = []
    for uid, files in series.items():
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        desc = getattr(ds, "SeriesDescription", "") or ""
        lines.append(f"  {uid or '(no SeriesInstanceUID)'}: {len(files)} files, {getattr(ds, 'Modality', '?')} {desc}")
    return "\n".join(lines)


def choose_series(folder: Path, series: Mapping[str, Sequence[Path]], series_uid: str | None) -> str:
    """The SeriesInstanceUID to read: ``series_uid`` if the folder has it, else the only series (else an error)."""
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(
                folder, f"no series with SeriesInstanceUID {series_uid!r}; found:\n{_describe_series(series)}"
            )
        return series_uid
    if len(series) > 1:
        raise InputError(
            folder,
            f"folder holds {len(series)} DICOM series of images; {SERIES_UID_ADVICE}:\n{_describe_series(series)}",
        )
    return next(iter(series))


def _dicom_tag(ds: Any, name: str, f: Path) -> Any:
    value = getattr(ds, name, None)
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        raise InputError(f, f"DICOM tag {name} is missing: cannot place this slice in space")
    return value


def load_dicom_series(
    folder: str | os.PathLike,
    series_uid: str | None = None,
    gap_tolerance: float = 1.5,
    mixed_rescale: Literal["error", "per_slice"] = "error",
) -> tuple[np.ndarray, np.ndarray]:
    """Stack one DICOM series into a float32 HU volume and its RAS affine.

    The array is indexed (column, row, slice), as MONAI's ``PydicomReader`` gives it, so that ``affine`` maps
    voxel indices to RAS world millimetres like a NIfTI affine. Slices are ordered by their position along the slice
    normal (not by InstanceNumber). Each slice's RescaleSlope/RescaleIntercept is applied.

    Errors (:class:`InputError` naming the folder or file): several series without ``series_uid``; slices of different
    size, pixel spacing or orientation; two slices at one position; a gap between neighbouring slices larger than
    ``gap_tolerance`` times the median spacing (missing slices); pixel data that are missing, truncated or cannot be
    decoded; a geometry no human CT has (:func:`affine_problems`); a broken symbolic link in the folder.

    RescaleSlope/RescaleIntercept must be present on every slice or on none (then stored values are taken as HU)
    and equal across the series: a slice without them would be read ~1024 HU too bright. Slices that disagree are an
    error naming them; ``mixed_rescale="per_slice"`` applies each slice's own values instead (what the DICOM
    standard allows), with a warning.

    >>> vol, affine = load_dicom_series("patient1/CT_series")  # doctest: +SKIP
    >>> vol.shape, affine[:3, :3].diagonal()  # doctest: +SKIP
    ((512, 512, 20), array([-0.977, -0.977,  2.]))
    """
    vol, affine, _ = _read_dicom_series(Path(folder), series_uid, gap_tolerance, mixed_rescale)
    return vol, affine


def _rescale_of(headers: Sequence[Any], files: Sequence[Path], folder: Path, mixed: str) -> list[tuple[float, float]]:
    """(slope, intercept) per slice, checked for slices without them and for values that differ across the series."""
    if mixed not in ("error", "per_slice"):
        raise ValueError(f"mixed_rescale must be 'error' or 'per_slice', got {mixed!r}")
    has = ["RescaleSlope" in ds or "RescaleIntercept" in ds for ds in headers]
    if any(has) and not all(has):
        without = [f.name for f, h in zip(files, has, strict=True) if not h]
        raise InputError(
            folder,
            f"RescaleSlope/RescaleIntercept missing on {len(without)} of {len(files)} slices "
            f"({', '.join(without[:10])}{', ...' if len(without) > 10 else ''}): those slices cannot be put in "
            "Hounsfield units (they would be ~1024 HU too bright); re-export the series or convert it to NIfTI",
        )
    values = [
        (float(getattr(ds, "RescaleSlope", 1.0) or 1.0), float(getattr(ds, "RescaleIntercept", 0.0) or 0.0))
        for ds in headers
    ]
    distinct = sorted(set(values))
    if len(distinct) > 1:
        ref = max(distinct, key=values.count)
        odd = [f"{f.name} {v}" for f, v in zip(files, values, strict=True) if v != ref]
        detail = (
            f"{len(odd)} of {len(files)} slices differ from (slope, intercept) = {ref} of the others: "
            f"{', '.join(odd[:10])}{', ...' if len(odd) > 10 else ''}"
        )
        if mixed == "error":
            raise InputError(
                folder,
                f"RescaleSlope/RescaleIntercept differ across the series: {detail}. Pass mixed_rescale='per_slice' "
                "to apply each slice's own values (as the DICOM standard allows), or re-export the series",
            )
        warn_input(
            folder, f"RescaleSlope/RescaleIntercept differ across the series, each slice's own applied: {detail}"
        )
    return values


def _pixel_problem(ds: Any) -> str | None:
    """Why the pixel data of an uncompressed slice cannot be right (missing or short), before decoding."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return "no pixel data: a DICOM object without an image (a report, or a header-only export)"
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and getattr(ts, "is_compressed", False):
        return None
    try:
        expected = int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1) or 1)
        expected *= int(getattr(ds, "NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8
        got = len(ds.PixelData) if "PixelData" in ds else expected
    except Exception:
        return None
    if got < expected:
        return (
            f"truncated: the pixel data hold {got} bytes, {int(ds.Rows)}x{int(ds.Columns)} pixels of "
            f"{int(ds.BitsAllocated)} bits need {expected} (an interrupted copy or download?)"
        )
    return None


def _read_dicom_series(
    folder: Path, series_uid: str | None, gap_tolerance: float, mixed_rescale: str = "error"
) -> tuple[np.ndarray, np.ndarray, dict]:
    import pydicom

    if not folder.exists():
        raise InputError(folder, "file not found")
    if not folder.is_dir():
        raise InputError(folder, "not a folder: a DICOM series is read from the folder that holds its files")
    broken = [f for f in visible_files(folder, broken=True) if is_broken_link(f)]
    if broken:
        raise InputError(
            folder,
            f"{len(broken)} broken symbolic link(s) in the series folder ({', '.join(f.name for f in broken[:5])}): "
            "their slices would be missing",
        )
    series = scan_dicom_series(folder)
    uid = choose_series(folder, series, series_uid)
    files = series[uid]
    if len(files) < 2:
        raise InputError(folder, f"the DICOM series has {len(files)} file: a volume needs several slices")

    headers = []
    for f in files:
        try:
            headers.append(pydicom.dcmread(f))
        except Exception as e:
            raise InputError(f, f"unreadable DICOM file ({type(e).__name__}: {e})") from e

    ref, ref_file = headers[0], files[0]
    frames = int(getattr(ref, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(ref_file, f"multi-frame DICOM ({frames} frames) is not supported; convert it to NIfTI first")
    iop = np.asarray(_dicom_tag(ref, "ImageOrientationPatient", ref_file), dtype=float)
    spacing = np.asarray(_dicom_tag(ref, "PixelSpacing", ref_file), dtype=float)
    size = (int(_dicom_tag(ref, "Rows", ref_file)), int(_dicom_tag(ref, "Columns", ref_file)))
    positions = []
    for ds, f in zip(headers, files, strict=True):
        if not np.allclose(np.asarray(_dicom_tag(ds, "ImageOrientationPatient", f), dtype=float), iop, atol=1e-4):
            raise InputError(
                folder,
                f"inconsistent orientation across files: {f.name} has {list(ds.ImageOrientationPatient)}, "
                f"{ref_file.name} has {iop.tolist()}",
            )
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise InputError(
                folder,
                f"inconsistent slice size across files: {f.name} is {int(ds.Rows)}x{int(ds.Columns)}, "
                f"{ref_file.name} is {size[0]}x{size[1]}",
            )
        if not np.allclose(np.asarray(_dicom_tag(ds, "PixelSpacing", f), dtype=float), spacing, atol=1e-4):
            raise InputError(
                folder,
                f"inconsistent pixel spacing across files: {f.name} has {list(ds.PixelSpacing)}, "
                f"{ref_file.name} has {spacing.tolist()}",
            )
        positions.append(np.asarray(_dicom_tag(ds, "ImagePositionPatient", f), dtype=float))

    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    along = np.array([p @ normal for p in positions])
    order = np.argsort(along, kind="stable")
    along = along[order]
    steps = np.diff(along)
    names = [files[i].name for i in order]
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise InputError(
            folder,
            f"two slices at the same position {along[i]:.2f} mm ({names[i]} and {names[i + 1]}): "
            "duplicated files or several series without SeriesInstanceUID",
        )
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > gap_tolerance * median)
    if gaps.size:
        details = "; ".join(
            f"{steps[i]:.2f} mm between {names[i]} ({along[i]:.2f} mm) and {names[i + 1]} ({along[i + 1]:.2f} mm), "
            f"~{round(steps[i] / median) - 1} slice(s) missing"
            for i in gaps[:5]
        )
        raise InputError(
            folder, f"missing slices: gap larger than {gap_tolerance}x the median spacing {median:.2f} mm: {details}"
        )
    if np.max(np.abs(steps - median)) > 0.1 * median:
        warn_input(
            folder,
            f"uneven slice spacing ({steps.min():.2f}-{steps.max():.2f} mm, median {median:.2f}): "
            "the volume uses the mean spacing",
        )

    first, last = positions[order[0]], positions[order[-1]]
    step_vec = (last - first) / (len(files) - 1)
    shear = np.linalg.norm(step_vec - (step_vec @ normal) * normal)
    if shear > 0.01 * abs(step_vec @ normal):
        warn_input(
            folder, f"slices are sheared ({shear:.2f} mm in-plane shift per slice: gantry tilt?); the affine keeps it"
        )

    rescale = _rescale_of(headers, files, folder, mixed_rescale)
    volume = np.empty((size[1], size[0], len(files)), dtype=np.float32)
    for k, i in enumerate(order):
        ds, f = headers[i], files[i]
        problem = _pixel_problem(ds)
        if problem is not None:
            raise InputError(f, problem)
        try:
            pixels = ds.pixel_array
        except Exception as e:
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            ts_name = getattr(ts, "name", ts)
            advice = (
                "Compressed DICOM needs a decoder plugin (pylibjpeg, pillow with openjpeg, or gdcm)"
                if getattr(ts, "is_compressed", False)
                else "The file is uncompressed, so no plugin helps: the file is damaged; re-export or copy it again"
            )
            raise InputError(
                f, f"cannot decode the pixel data (transfer syntax {ts_name}): {type(e).__name__}: {e}. {advice}"
            ) from e
        slope, intercept = rescale[i]
        volume[:, :, k] = (pixels.astype(np.float32) * slope + intercept).T

    # DICOM: pixel (row r, column c) of a slice sits at position + c * dc * row_dir + r * dr * col_dir (LPS)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = step_vec
    affine[:3, 3] = first
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS
    problems = affine_problems(affine, volume.shape, "the DICOM geometry")
    if problems:
        raise InputError(folder, "; ".join(problems))
    modality = str(getattr(ref, "Modality", "") or "")
    if modality and modality != "CT":
        warn_input(folder, f"the DICOM series is modality {modality}, not CT")
    info = {"series_uid": uid, "modality": modality, "files": [str(files[i]) for i in order]}
    return volume, affine, info


def load_dicom_metatensor(
    folder: Path,
    series_uid: str | None = None,
    ensure_channel_first: bool = True,
    dtype: Any = np.float32,
    mixed_rescale: Literal["error", "per_slice"] = "error",
) -> MetaTensor:
    """:func:`load_dicom_series` as a ``MetaTensor`` with the metadata ``LoadImaged`` gives a NIfTI (affine,
    ``original_affine``, ``spatial_shape``, ``filename_or_obj``), plus ``series_uid`` and ``modality``."""
    vol, affine, info = _read_dicom_series(folder, series_uid, gap_tolerance=1.5, mixed_rescale=mixed_rescale)
    meta = {
        "filename_or_obj": str(folder),
        "affine": torch.as_tensor(affine, dtype=torch.float64),
        "original_affine": affine.copy(),
        "spatial_shape": np.asarray(vol.shape),
        "space": "RAS",
        "original_channel_dim": float("nan"),
        "series_uid": info["series_uid"],
        "modality": info["modality"],
    }
    img = MetaTensor(torch.from_numpy(vol.astype(dtype, copy=False)), meta=meta)
    return EnsureChannelFirst()(img) if ensure_channel_first else img
