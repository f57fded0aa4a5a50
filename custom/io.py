"""Reading inference inputs safely: NIfTI files, folders of them, DICOM series; checking that a volume is a CT.

Users hand the bundle whatever their scanner or archive produced. Wrong input must fail early with a message that
names the file and the problem, never give a silently wrong segmentation: a truncated download, a DICOM folder that
mixes two series or misses slices, a 4D series whose time axis MONAI would take for channels, an MR or a normalised
image where the network expects Hounsfield units.

Main entry points:

- :func:`list_inputs` turns a user path into cases (:class:`CaseInput`).
- :func:`load_image_checked` (or the transforms :class:`CheckedLoadImage` / :class:`CheckedLoadImaged`) loads one
  case as a MONAI ``MetaTensor``; every read error becomes an :class:`InputError` naming the file.
- :func:`check_ct_volume` (or :class:`CheckCT` / :class:`CheckCTd`, used right after ``LoadImaged`` +
  ``EnsureChannelFirstd``) squeezes a size-1 fourth axis, rejects 2D and 4D inputs, fills NaN/Inf and clips the
  padding below -1024 HU.
- :func:`load_dicom_series` stacks one DICOM series with its world geometry (checked for gaps and mixed slices).
- :func:`write_nifti_safely` writes atomically and refuses to overwrite unless asked.

Why not MONAI's ``PydicomReader`` for DICOM folders: it orders slices by InstanceNumber, only warns when slice sizes
differ, has no gap check and reads every DICOM file of a folder as one series. Why not ``LoadImaged(reader=...)`` with
a checking reader: when a user-named reader raises, ``LoadImage`` silently falls back to its default readers.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import os
import re
import secrets
import shutil
import warnings
import zlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.transforms import EnsureChannelFirst, LoadImage, MapTransform, Transform

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
HU_AIR = -1024.0
#: voxel spacing (mm) a human CT can have: below is a header in metres or a typo, above is a typo (200 mm slices)
SPACING_RANGE_MM = (0.05, 20.0)
#: largest physical extent (mm) along one axis: a whole-body CT is under 2 m
MAX_EXTENT_MM = 2500.0
#: how a user chooses one DICOM series, on the bundle command line and in Python
SERIES_UID_ADVICE = (
    "choose one with --datalist#series_uid <SeriesInstanceUID> on the bundle command line (series_uid= in Python), "
    "or put each series in its own folder"
)

__all__ = [
    "InputError",
    "InputWarning",
    "find_input_error",
    "CaseInput",
    "list_inputs",
    "nifti_case_id",
    "safe_case_id",
    "path_inside",
    "affine_problems",
    "nifti_header_problems",
    "check_nifti_header",
    "SERIES_UID_ADVICE",
    "is_dicom_file",
    "scan_dicom_series",
    "load_dicom_series",
    "load_image_checked",
    "describe_read_error",
    "check_ct_volume",
    "CheckCT",
    "CheckCTd",
    "CheckedLoadImage",
    "CheckedLoadImaged",
    "write_nifti_safely",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "temp_name",
    "remove_stale_temps",
    "check_output_dir",
]


class InputError(ValueError):
    """A user input that cannot be used; ``str(err)`` always starts with the offending path.

    >>> str(InputError("/data/ct.nii.gz", "truncated gzip"))
    '/data/ct.nii.gz: truncated gzip'
    """

    def __init__(self, path: str | os.PathLike | None, message: str):
        super().__init__(path, message)  # all arguments: the error pickles (DataLoader workers) and copies intact
        self.path = None if path is None else str(path)
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path is not None else self.message


def find_input_error(exc: BaseException | None) -> InputError | None:
    """The :class:`InputError` behind ``exc``, if any: MONAI's ``Compose`` re-raises every transform error as
    ``RuntimeError("applying transform ...")``, so an inference script can show the user the real message.

    >>> try:
    ...     raise RuntimeError("applying transform") from InputError("ct.nii.gz", "truncated gzip")
    ... except RuntimeError as e:
    ...     str(find_input_error(e))
    'ct.nii.gz: truncated gzip'
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class InputWarning(UserWarning):
    """A suspicious but usable input (non-finite voxels, intensities that do not look like HU, ...)."""


def _warn(path: str | os.PathLike | None, message: str) -> None:
    warnings.warn(f"{path}: {message}" if path is not None else message, InputWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------------
# Listing inputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseInput:
    """One case to segment: a NIfTI file or one DICOM series in a folder.

    ``case_id`` names the outputs: the file name without ``.nii``/``.nii.gz``, or the DICOM folder's name.
    ``series_uid`` is set for DICOM so that loading reads exactly the series that was listed.
    """

    case_id: str
    kind: Literal["nifti", "dicom"]
    path: Path
    series_uid: str | None = None

    def load(self, **kwargs: Any) -> MetaTensor:
        """Load this case with :func:`load_image_checked` (keyword arguments are passed on)."""
        return load_image_checked(self.path, series_uid=self.series_uid, **kwargs)


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


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a file with the DICOM Part 10 magic ``DICM`` at byte 128 (any extension or none)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def safe_case_id(case_id: Any, where: str | os.PathLike | None = None) -> str:
    """``case_id`` if it is safe to build output file names from, else an :class:`InputError` naming ``where``.

    Case ids name the outputs (``<output_dir>/<case_id>_seg.nii.gz``); one taken from a ``dataset.json`` must not
    lead outside ``output_dir``: no path separator (``/`` or ``\\``), not ``.`` or ``..``, no NUL or control
    character, not empty.

    >>> safe_case_id("case_0001")
    'case_0001'
    >>> safe_case_id("../../etc/cron.d/x", "dataset.json")
    Traceback (most recent call last):
    ...
    custom.io.InputError: dataset.json: case id '../../etc/cron.d/x' would write outside the output folder ...
    """
    if not isinstance(case_id, str) or not case_id.strip():
        raise InputError(where, f"case id {case_id!r} is not a non-empty string")
    bad = [c for c in ("/", "\\") if c in case_id]
    if bad or case_id in (".", "..") or any(ord(c) < 32 for c in case_id):
        why = f"contains {' and '.join(repr(c) for c in bad)}" if bad else "is not a file name"
        raise InputError(
            where,
            f"case id {case_id!r} would write outside the output folder or is not a file name ({why}); "
            "case ids name output files: use letters, digits, '_', '-', '.'",
        )
    return case_id


def path_inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name``, refused (:class:`InputError`) unless it resolves inside ``folder`` (symlinks followed).

    For every output path built from input data: ``path_inside(output_dir, f"{case_id}_seg.nii.gz")``.
    """
    base = Path(folder).expanduser()
    target = base / name
    root, resolved = base.resolve(), target.resolve()
    if resolved != root and root not in resolved.parents:
        raise InputError(target, f"resolves to {resolved}, outside the output folder {root}")
    return target


def _is_broken_link(p: Path) -> bool:
    return p.is_symlink() and not p.exists()


def _visible_files(folder: Path, broken: bool = False) -> list[Path]:
    # hidden files (".DS_Store", macOS "._x.nii.gz" resource forks) and DICOMDIR indexes are never images;
    # with broken=True, broken symbolic links are listed too (they fail as cases instead of vanishing)
    return sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() or (broken and _is_broken_link(p)))
        and not p.name.startswith(".")
        and p.name.upper() != "DICOMDIR"
    )


def _as_input_paths(path: Any) -> list[Path] | None:
    """A list, a tuple, the text of a list (``"[a.nii.gz,b.nii.gz]"``) or a glob pattern as the paths it names;
    ``None`` for one plain path."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise InputError(None, "--input is an empty list")
        return [Path(str(x)).expanduser() for x in path]
    text = str(path)
    if text.startswith("[") and text.endswith("]") and not Path(text).expanduser().exists():
        # fire passes --input [a.nii.gz,b.nii.gz] (no quotes inside) as this string, not as a list
        items = [x.strip().strip("'\"") for x in text[1:-1].split(",")]
        return _as_input_paths([x for x in items if x])
    if any(c in text for c in "*?[") and not Path(text).expanduser().exists():
        import glob

        matches = sorted(glob.glob(os.path.expanduser(text)))
        if not matches:
            raise InputError(text, "the pattern matches no file (quote a pattern so that the shell does not expand it)")
        return [Path(m) for m in matches]
    return None


def list_inputs(path: str | os.PathLike | Sequence[str], series_uid: str | None = None) -> list[CaseInput]:
    """List the cases behind a user path, checking that it is something the bundle can read.

    Accepted: a NIfTI file; a folder of NIfTI files (sorted by name); a DICOM series folder (files with the DICM magic,
    any extension); a folder whose subfolders are DICOM series (one case each); a list of any of these, or a glob
    pattern (``"scans/*.nii.gz"``, quoted), whose case ids must be unique. A folder holding several DICOM series is an
    error listing their SeriesInstanceUIDs unless ``series_uid`` chooses one; in a folder of series folders, such a
    folder (or an unreadable one) is listed as a case that fails when it is loaded, so that the other cases run.
    Non-image DICOM objects (structured reports, dose reports, presentation states, ...) are skipped with a warning.
    A broken symbolic link named like a NIfTI file is a case that fails on loading, not a file silently left out.

    >>> [c.case_id for c in list_inputs("scans/")]  # doctest: +SKIP
    ['case_0001', 'case_0002']
    """
    many = _as_input_paths(path)
    if many is not None:
        cases = [c for m in many for c in list_inputs(m, series_uid)]
        _check_unique_ids(Path(str(path)) if not isinstance(path, (list, tuple)) else None, cases)
        return cases
    p = Path(str(path)).expanduser()
    if _is_broken_link(p):
        raise InputError(p, f"broken symbolic link (points to {os.readlink(p)}, which does not exist)")
    if not p.exists():
        raise InputError(p, "file not found")
    if p.is_file():
        case_id = nifti_case_id(p)
        if case_id is not None:
            return [CaseInput(case_id, "nifti", p)]
        if is_dicom_file(p):
            raise InputError(p, "a single DICOM file; pass the folder that holds the whole series")
        raise InputError(p, "not a NIfTI file (.nii or .nii.gz) or a DICOM series folder")
    files = _visible_files(p, broken=True)
    niftis = [f for f in files if nifti_case_id(f) is not None]
    dicoms = [f for f in files if f not in niftis and is_dicom_file(f)]
    if niftis and dicoms:
        raise InputError(
            p, f"folder mixes NIfTI files ({len(niftis)}) and DICOM files ({len(dicoms)}); put each series apart"
        )
    if niftis:
        if series_uid is not None:
            raise InputError(p, f"series_uid={series_uid!r} given but the folder holds NIfTI files, not DICOM")
        cases = [CaseInput(nifti_case_id(f), "nifti", f) for f in niftis]
        _check_unique_ids(p, cases)
        return cases
    if dicoms:
        return [_dicom_case(p, dicoms, series_uid)]
    subdirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    cases = []
    for d in subdirs:
        sub = [f for f in _visible_files(d) if is_dicom_file(f)]
        if sub:
            try:
                cases.append(_dicom_case(d, sub, series_uid))
            except _NoImageSlices as e:  # e.g. the dose report exported as a series of its own: not a case
                _warn(d, f"not a case: {e.message}")
            except InputError as e:  # one bad series folder fails as its own case (loading raises this again)
                logger.warning("%s", e)
                cases.append(CaseInput(d.name, "dicom", d, series_uid))
    if cases:  # a broken link beside series folders was a series folder: a case that fails on loading
        cases += [CaseInput(f.name, "dicom", f) for f in files if _is_broken_link(f)]
        return sorted(cases, key=lambda c: c.case_id)
    if not files and not subdirs:
        raise InputError(p, "empty folder: no NIfTI files and no DICOM series")
    seen = ", ".join(f.name for f in files[:5]) + (", ..." if len(files) > 5 else "")
    raise InputError(
        p, f"no NIfTI (.nii, .nii.gz) or DICOM files found (files seen: {seen or 'none'}; subfolders: {len(subdirs)})"
    )


def _check_unique_ids(folder: Path | None, cases: Sequence[CaseInput]) -> None:
    seen: dict[str, Path] = {}
    for c in cases:
        if c.case_id in seen:
            a, b = (seen[c.case_id].name, c.path.name) if folder is not None else (seen[c.case_id], c.path)
            raise InputError(folder, f"two files give case id {c.case_id!r}: {a} and {b}")
        seen[c.case_id] = c.path


def _dicom_case(folder: Path, files: Sequence[Path], series_uid: str | None) -> CaseInput:
    series = scan_dicom_series(folder, files)
    uid = _choose_series(folder, series, series_uid)
    return CaseInput(folder.name, "dicom", folder, uid)


# ----------------------------------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------------------------------

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


class _NoImageSlices(InputError):
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
        files = [f for f in _visible_files(folder) if is_dicom_file(f)]
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
        _warn(folder, f"skipped {len(skipped)} DICOM object(s) that are not image slices: {listed}")
    if not groups:
        raise _NoImageSlices(
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


def _choose_series(folder: Path, series: Mapping[str, Sequence[Path]], series_uid: str | None) -> str:
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
        _warn(folder, f"RescaleSlope/RescaleIntercept differ across the series, each slice's own applied: {detail}")
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
    broken = [f for f in _visible_files(folder, broken=True) if _is_broken_link(f)]
    if broken:
        raise InputError(
            folder,
            f"{len(broken)} broken symbolic link(s) in the series folder ({', '.join(f.name for f in broken[:5])}): "
            "their slices would be missing",
        )
    series = scan_dicom_series(folder)
    uid = _choose_series(folder, series, series_uid)
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
        _warn(
            folder,
            f"uneven slice spacing ({steps.min():.2f}-{steps.max():.2f} mm, median {median:.2f}): "
            "the volume uses the mean spacing",
        )

    first, last = positions[order[0]], positions[order[-1]]
    step_vec = (last - first) / (len(files) - 1)
    shear = np.linalg.norm(step_vec - (step_vec @ normal) * normal)
    if shear > 0.01 * abs(step_vec @ normal):
        _warn(
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
        _warn(folder, f"the DICOM series is modality {modality}, not CT")
    info = {"series_uid": uid, "modality": modality, "files": [str(files[i]) for i in order]}
    return volume, affine, info


# ----------------------------------------------------------------------------------------------------------------------
# Loading with clear errors
# ----------------------------------------------------------------------------------------------------------------------


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


def load_image_checked(
    path: str | os.PathLike,
    series_uid: str | None = None,
    ensure_channel_first: bool = True,
    dtype: Any = np.float32,
    mixed_rescale: Literal["error", "per_slice"] = "error",
) -> MetaTensor:
    """Load a NIfTI file or a DICOM series folder as a MetaTensor, re-raising any read error as :class:`InputError`.

    NIfTI goes through MONAI's ``NibabelReader``, so the metadata (affine, ``original_affine``, ``spatial_shape``,
    ``filename_or_obj``) is what ``LoadImaged`` gives and ``Invertd``/``SaveImaged`` work unchanged. The voxel data are
    read here, so a truncated file fails now, naming the file, and not in a worker process later. A NIfTI whose
    qform and sform codes are both 0 (no orientation stored) loads with a warning. The header is checked with
    :func:`check_nifti_header` first (colour images, singular or non-finite affines, implausible voxel sizes), because
    MONAI would silently replace a broken affine. ``mixed_rescale`` is passed to :func:`load_dicom_series`.

    >>> img = load_image_checked("ct.nii.gz")  # doctest: +SKIP
    >>> img.shape  # channel first  # doctest: +SKIP
    torch.Size([1, 512, 512, 200])
    """
    p = Path(path).expanduser()
    if _is_broken_link(p):
        raise InputError(p, f"broken symbolic link (points to {os.readlink(p)}, which does not exist)")
    if not p.exists():
        raise InputError(p, "file not found")
    if p.is_dir():
        vol, affine, info = _read_dicom_series(p, series_uid, gap_tolerance=1.5, mixed_rescale=mixed_rescale)
        meta = {
            "filename_or_obj": str(p),
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
    if nifti_case_id(p) is None:
        raise InputError(p, "not a NIfTI file (.nii or .nii.gz) or a DICOM series folder")
    check_nifti_header(p)
    try:
        img = _nifti_loader(ensure_channel_first, dtype)(p, NibabelReader())
    except Exception as e:  # every failure becomes one clear message
        raise InputError(p, describe_read_error(e, p)) from e
    if int(img.meta.get("qform_code", 1)) == 0 and int(img.meta.get("sform_code", 1)) == 0:
        _warn(p, "NIfTI header has no orientation (qform_code = sform_code = 0): left/right may be wrong")
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
        _warn(
            p,
            f"qform and sform disagree (largest difference {diff:.3g}; qform_code {int(hdr['qform_code'])}, "
            f"sform_code {int(hdr['sform_code'])}): the sform is used; viewers that read the qform show it elsewhere",
        )


class CheckedLoadImage(Transform):
    """Array form of :func:`load_image_checked` (path in, channel-first MetaTensor out)."""

    def __init__(
        self,
        ensure_channel_first: bool = True,
        series_uid: str | None = None,
        dtype: Any = np.float32,
        mixed_rescale: Literal["error", "per_slice"] = "error",
    ):
        self.ensure_channel_first = ensure_channel_first
        self.series_uid = series_uid
        self.dtype = dtype
        self.mixed_rescale = mixed_rescale

    def __call__(self, path: str | os.PathLike, series_uid: str | None = None) -> MetaTensor:
        uid = series_uid if series_uid is not None else self.series_uid
        return load_image_checked(path, uid, self.ensure_channel_first, self.dtype, self.mixed_rescale)


class CheckedLoadImaged(MapTransform):
    """Drop-in for ``LoadImaged`` + ``EnsureChannelFirstd`` that reads NIfTI and DICOM folders with clear errors.

    A DICOM case's ``series_uid`` item (set by :func:`custom.workflow.inference_datalist` when the user chose a
    series) selects the series of that case; ``series_uid`` here applies to every case without one.

    Config use::

        {"_target_": "custom.io.CheckedLoadImaged", "keys": ["image", "label"]}
    """

    def __init__(
        self,
        keys: KeysCollection,
        ensure_channel_first: bool = True,
        series_uid: str | None = None,
        dtype: Any = np.float32,
        allow_missing_keys: bool = False,
        mixed_rescale: Literal["error", "per_slice"] = "error",
    ):
        super().__init__(keys, allow_missing_keys)
        self.loader = CheckedLoadImage(ensure_channel_first, series_uid, dtype, mixed_rescale)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key], d.get("series_uid") if key == "image" else None)
        return d


# ----------------------------------------------------------------------------------------------------------------------
# Checking a loaded volume
# ----------------------------------------------------------------------------------------------------------------------


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
            _warn(src, f"{n_bad} NaN/infinite voxels replaced by {fill:g} (the smallest finite value)")
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
        _warn(src, message)
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

        {"_target_": "custom.io.CheckCTd", "keys": "image", "strict": false}
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


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------


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


def _link_no_clobber(tmp: str, p: Path) -> None:
    # os.link fails if the target appeared meanwhile (another process): no silent overwrite, even in a race
    try:
        os.link(tmp, p)
    except FileExistsError as e:
        raise FileExistsError(f"{p}: file exists; pass overwrite=True to replace it") from e
    except OSError:  # file systems without hard links
        if p.exists():
            raise FileExistsError(f"{p}: file exists; pass overwrite=True to replace it") from None
        os.replace(tmp, p)


# ----------------------------------------------------------------------------------------------------------------------
# Atomic writing: the one helper every writer of the bundle's outputs uses
# ----------------------------------------------------------------------------------------------------------------------

_TEMP_RE = r"\.{name}\.[0-9a-f]{{12}}\.tmp(\..*)?"


def temp_name(path: str | os.PathLike, suffix: str = "") -> Path:
    """The hidden temporary file beside ``path`` that :func:`atomic_write` writes first:
    ``.<name>.<12 hex>.tmp<suffix>``; :func:`remove_stale_temps` recognises the pattern (left after a hard kill)."""
    p = Path(path)
    return p.parent / f".{p.name}.{secrets.token_hex(6)}.tmp{suffix}"


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of ``path`` that a killed run left (``.<name>.<12 hex>.tmp*``); returns them."""
    p = Path(path)
    if not p.parent.is_dir():
        return []
    pattern = re.compile(_TEMP_RE.format(name=re.escape(p.name)))
    removed = []
    for q in p.parent.glob(f".{glob_escape(p.name)}.*.tmp*"):
        if pattern.fullmatch(q.name) and q.is_file():
            logger.warning("removing an unfinished temporary file left by an interrupted run: %s", q)
            q.unlink(missing_ok=True)
            removed.append(q)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, overwrite: bool = True, suffix: str = ""):
    """Context manager yielding the path of a temporary file beside ``path``; on a normal exit it is moved into place
    (``os.replace``; with ``overwrite=False`` by a hard link that fails if ``path`` exists, ``FileExistsError``).

    A reader never sees a half-written ``path``. The temporary file is removed on any exception, ``KeyboardInterrupt``
    and ``SystemExit`` included; after a hard kill it may remain, named as :func:`temp_name` says, and
    :func:`remove_stale_temps` (called by the inference before it writes) removes it. ``suffix`` is appended to the
    temporary name for writers that choose the format from the extension (``.nii.gz``, ``.png``).

    >>> with atomic_write("out/summary.json") as tmp:  # doctest: +SKIP
    ...     tmp.write_text("{}")
    """
    p = Path(path).expanduser()
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p}: file exists; pass --overwrite true to replace it")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(p, suffix)
    # created with mode 0o666 minus the umask, as a plain open() would (mkstemp would leave it private: 0o600)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, p)
        else:
            _link_no_clobber(str(tmp), p)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    """``data`` into ``path`` through :func:`atomic_write` (fsynced before the rename)."""
    with atomic_write(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", overwrite=overwrite)


def check_output_dir(path: Any, min_free_mb: float = 100.0, option: str = "output_dir") -> Path:
    """The output folder, checked before any case is computed: created if missing; refused (``ValueError`` naming
    ``--<option>``) if it is a file, cannot be created or written (a probe file is created and removed), or has less
    than ``min_free_mb`` MB free. ``path`` may be a number (``--output_dir 20241201`` reaches the config as an int)."""
    if path is None or isinstance(path, bool) or not isinstance(path, (str, int, os.PathLike)):
        raise ValueError(f"--{option} must be a folder path, got {path!r}")
    p = Path(str(path)).expanduser()
    if not str(path).strip():
        raise ValueError(f"--{option} must be a folder path, got an empty string")
    if p.exists() and not p.is_dir():
        raise ValueError(f"--{option} {p}: exists and is not a folder; pass another --{option}")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--{option} {p}: cannot be created ({e.strerror or e}); pass another --{option}") from e
    try:
        fd, probe = _probe(p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--{option} {p}: not writable ({e.strerror or e}); pass another --{option}") from e
    free_mb = shutil.disk_usage(p).free / 2**20
    if free_mb < float(min_free_mb):
        raise ValueError(
            f"--{option} {p}: only {free_mb:.0f} MB free on its disk, below the {float(min_free_mb):g} MB the outputs "
            f"may need (min_free_mb); free some space or pass another --{option}"
        )
    return p


def _probe(folder: Path) -> tuple[int, str]:
    probe = str(folder / f".write_probe.{secrets.token_hex(6)}")
    return os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), probe
