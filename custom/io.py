"""Reading inference inputs safely: a user path as cases, each loaded checked; the facade of the input/output modules.

Users hand the bundle whatever their scanner or archive produced. Wrong input must fail early with a message that
names the file and the problem, never give a silently wrong segmentation: a truncated download, a DICOM folder that
mixes two series or misses slices, a 4D series whose time axis MONAI would take for channels, an MR or a normalised
image where the network expects Hounsfield units.

Here:

- :func:`list_inputs` turns a user path into cases (:class:`CaseInput`).
- :func:`load_image_checked` (or the transforms :class:`CheckedLoadImage` / :class:`CheckedLoadImaged`) loads one
  case, a NIfTI file or a DICOM series folder, as a MONAI ``MetaTensor``; every read error becomes an
  :class:`InputError` naming the file.

The rest lives in one module per responsibility, re-exported here so that ``custom.io.<name>`` keeps working in
configs and scripts: :mod:`custom.errors` (``InputError``, ``InputWarning``), :mod:`custom.nifti_io` (checked NIfTI
reading and writing), :mod:`custom.dicom_io` (DICOM series), :mod:`custom.ct_checks` (``check_ct_volume``,
``CheckCTd``, ``affine_problems``) and :mod:`custom.outputs` (``atomic_write``, ``safe_case_id``, ``path_inside``,
``check_output_dir``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from custom.ct_checks import (
    HU_AIR,
    MAX_EXTENT_MM,
    SPACING_RANGE_MM,
    CheckCT,
    CheckCTd,
    affine_problems,
    check_ct_volume,
)
from custom.dicom_io import (
    SERIES_UID_ADVICE,
    NoImageSlices,
    choose_series,
    is_broken_link,
    is_dicom_file,
    load_dicom_metatensor,
    load_dicom_series,
    scan_dicom_series,
    visible_files,
)
from custom.errors import InputError, InputWarning, find_input_error, warn_input
from custom.nifti_io import (
    NIFTI_SUFFIXES,
    check_nifti_header,
    describe_read_error,
    load_nifti_checked,
    nifti_case_id,
    nifti_header_problems,
    write_nifti_safely,
)
from custom.outputs import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
    check_output_dir,
    path_inside,
    remove_stale_temps,
    safe_case_id,
    temp_name,
)

logger = logging.getLogger(__name__)

__all__ = [
    # this module
    "CaseInput",
    "list_inputs",
    "load_image_checked",
    "CheckedLoadImage",
    "CheckedLoadImaged",
    # re-exported
    "InputError",
    "InputWarning",
    "find_input_error",
    "NIFTI_SUFFIXES",
    "nifti_case_id",
    "nifti_header_problems",
    "check_nifti_header",
    "describe_read_error",
    "write_nifti_safely",
    "SERIES_UID_ADVICE",
    "is_dicom_file",
    "scan_dicom_series",
    "load_dicom_series",
    "HU_AIR",
    "SPACING_RANGE_MM",
    "MAX_EXTENT_MM",
    "affine_problems",
    "check_ct_volume",
    "CheckCT",
    "CheckCTd",
    "safe_case_id",
    "path_inside",
    "atomic_write",
    "atomic_write_with",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "temp_name",
    "remove_stale_temps",
    "check_output_dir",
]


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
    if is_broken_link(p):
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
    files = visible_files(p, broken=True)
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
        sub = [f for f in visible_files(d) if is_dicom_file(f)]
        if sub:
            try:
                cases.append(_dicom_case(d, sub, series_uid))
            except NoImageSlices as e:  # e.g. the dose report exported as a series of its own: not a case
                warn_input(d, f"not a case: {e.message}")
            except InputError as e:  # one bad series folder fails as its own case (loading raises this again)
                logger.warning("%s", e)
                cases.append(CaseInput(d.name, "dicom", d, series_uid))
    if cases:  # a broken link beside series folders was a series folder: a case that fails on loading
        cases += [CaseInput(f.name, "dicom", f) for f in files if is_broken_link(f)]
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
    uid = choose_series(folder, series, series_uid)
    return CaseInput(folder.name, "dicom", folder, uid)


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
    if is_broken_link(p):
        raise InputError(p, f"broken symbolic link (points to {os.readlink(p)}, which does not exist)")
    if not p.exists():
        raise InputError(p, "file not found")
    if p.is_dir():
        return load_dicom_metatensor(p, series_uid, ensure_channel_first, dtype, mixed_rescale)
    if nifti_case_id(p) is None:
        raise InputError(p, "not a NIfTI file (.nii or .nii.gz) or a DICOM series folder")
    return load_nifti_checked(p, ensure_channel_first, dtype)


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
