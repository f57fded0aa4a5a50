"""Tests for custom.io: listing inputs, checked loading, CT checks, DICOM series, safe writing.

Helpers at the top break a good input on purpose (truncated gzip, 4D series, missing DICOM slice, ...); every error
test asserts the error type, that the message names the file, and that it states the problem.
"""

from __future__ import annotations

import gzip
import os
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from parameterized import parameterized

from custom.ct_checks import CheckCT, CheckCTd, check_ct_volume
from custom.dicom_io import load_dicom_series
from custom.errors import InputError, InputWarning, find_input_error
from custom.io import CaseInput, CheckedLoadImaged, list_inputs, load_image_checked
from custom.nifti_io import nifti_case_id, write_nifti_safely

AFFINE = np.array([[-0.8, 0, 0, 100.0], [0, 0.8, 0, -50.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])


# ----------------------------------------------------------------------------------------------------------------------
# helpers that build good inputs and break them on purpose
# ----------------------------------------------------------------------------------------------------------------------


def ct_array(shape=(12, 10, 9), seed=0) -> np.ndarray:
    """A small CT-like int16 volume: air around a soft-tissue block with a bone voxel."""
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000, dtype=np.int16)
    vol[2:-2, 2:-2, 1:-1] = 40 + rng.integers(-20, 20, size=(shape[0] - 4, shape[1] - 4, shape[2] - 2))
    vol[shape[0] // 2, shape[1] // 2, shape[2] // 2] = 900
    return vol


def save_nifti(path: Path, data: np.ndarray, affine=AFFINE, qform_code: int = 1, sform_code: int = 1) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    nib.save(img, path)
    return path


def truncated_gzip(path: Path) -> Path:
    good = save_nifti(path.with_name("good_" + path.name), ct_array((20, 20, 20)))
    raw = good.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def truncated_gzip_header(path: Path) -> Path:
    good = save_nifti(path.with_name("good_" + path.name), ct_array((20, 20, 20)))
    path.write_bytes(good.read_bytes()[:60])
    return path


def truncated_nii_header(path: Path) -> Path:
    path.write_bytes(save_nifti(path.with_name("good.nii"), ct_array()).read_bytes()[:200])
    return path


def plain_nifti_named_gz(path: Path) -> Path:
    good = save_nifti(path.with_name("plain.nii"), ct_array())
    path.write_bytes(good.read_bytes())
    return path


def text_file(path: Path) -> Path:
    path.write_bytes(gzip.compress(b"this is not an image\n" * 50) if path.name.endswith(".gz") else b"text\n" * 50)
    return path


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def truncated_nii(path: Path) -> Path:
    good = save_nifti(path.with_name("good.nii"), ct_array((20, 20, 20)))
    raw = good.read_bytes()
    path.write_bytes(raw[:-3000])
    return path


def corrupt_gzip_middle(path: Path) -> Path:
    good = save_nifti(path.with_name("good_" + path.name), ct_array((20, 20, 20)))
    raw = bytearray(good.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(range(64))
    path.write_bytes(bytes(raw))
    return path


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    spacing=(0.7, 0.6),
    slice_step: float = 2.0,
    origin=(-40.0, -30.0, -200.0),
    iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    slope: float = 1.0,
    intercept: float = -1024.0,
    skip=(),
    names=None,
    modality: str = "CT",
    overrides=None,
) -> list[Path]:
    """Write ``volume`` (indexed column, row, slice) as an uncompressed DICOM series, one file per slice.

    ``skip`` drops slices (a gap), ``names`` sets file names (default: no extension, reversed order so that file
    name order differs from position order), ``overrides`` maps slice index -> {tag: value} to break one file.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row_dir, col_dir)
    written = []
    n = volume.shape[2]
    for k in range(n):
        if k in skip:
            continue
        stored = np.round((volume[:, :, k].T.astype(np.float64) - intercept) / slope).astype(np.int16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = f"test series {series_uid[-3:]}"
        ds.InstanceNumber = n - k  # reversed on purpose: order must come from positions
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * slice_step * normal]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        for tag, value in ((overrides or {}).get(k) or {}).items():
            setattr(ds, tag, value)
            if tag in ("Rows", "Columns"):
                ds.PixelData = np.zeros((ds.Rows, ds.Columns), np.int16).tobytes()
        if "PixelData" not in ds:
            ds.PixelData = stored.tobytes()
        name = names[k] if names else f"IM{n - k:04d}"
        ds.save_as(folder / name, enforce_file_format=True)
        written.append(folder / name)
    return written


def dicom_volume(shape=(12, 10, 10)) -> np.ndarray:
    vol = ct_array(shape).astype(np.float32)
    vol[0, 0, :] = np.arange(shape[2]) * 10 - 500  # a slice-dependent marker to check the slice order
    return vol


def assert_input_error(excinfo, path, *phrases):
    msg = str(excinfo.value)
    assert str(path) in msg, msg
    assert excinfo.value.path == str(path)
    for phrase in phrases:
        assert phrase in msg, msg


# ----------------------------------------------------------------------------------------------------------------------
# list_inputs
# ----------------------------------------------------------------------------------------------------------------------


def test_list_inputs_single_nifti(tmp_path):
    p = save_nifti(tmp_path / "case_7.nii.gz", ct_array())
    assert list_inputs(p) == [CaseInput("case_7", "nifti", p)]


def test_list_inputs_nifti_folder_sorted_hidden_ignored(tmp_path):
    for name in ["b.nii.gz", "a.nii", "c_0000.nii.gz"]:
        save_nifti(tmp_path / name, ct_array())
    (tmp_path / "._a.nii.gz").write_bytes(b"macOS resource fork")
    (tmp_path / "notes.txt").write_text("x")
    cases = list_inputs(tmp_path)
    assert [c.case_id for c in cases] == ["a", "b", "c_0000"]
    assert all(c.kind == "nifti" and c.path.parent == tmp_path for c in cases)


def test_list_inputs_dicom_folder_and_series_choice(tmp_path):
    folder = tmp_path / "patient"
    write_dicom_series(folder, dicom_volume(), series_uid="1.2.3.100")
    [case] = list_inputs(folder)
    assert (case.case_id, case.kind, case.path, case.series_uid) == ("patient", "dicom", folder, "1.2.3.100")
    write_dicom_series(folder, dicom_volume(), series_uid="1.2.3.200", names=[f"x{k}.dcm" for k in range(10)])
    with pytest.raises(InputError) as e:
        list_inputs(folder)
    assert_input_error(e, folder, "2 DICOM series", "1.2.3.100", "1.2.3.200", "series_uid")
    [case] = list_inputs(folder, series_uid="1.2.3.200")
    assert case.series_uid == "1.2.3.200"
    vol = case.load(ensure_channel_first=False)
    assert vol.shape == (12, 10, 10)
    with pytest.raises(InputError) as e:
        list_inputs(folder, series_uid="9.9.9")
    assert_input_error(e, folder, "no series with SeriesInstanceUID '9.9.9'", "1.2.3.100")


def test_list_inputs_folder_of_dicom_case_folders(tmp_path):
    write_dicom_series(tmp_path / "p2", dicom_volume())
    write_dicom_series(tmp_path / "p1", dicom_volume())
    assert [(c.case_id, c.kind) for c in list_inputs(tmp_path)] == [("p1", "dicom"), ("p2", "dicom")]


def _mixed(tmp_path):
    write_dicom_series(tmp_path, dicom_volume())
    save_nifti(tmp_path / "x.nii.gz", ct_array())
    return tmp_path


def _dup_ids(tmp_path):
    save_nifti(tmp_path / "a.nii.gz", ct_array())
    save_nifti(tmp_path / "a.nii", ct_array())
    return tmp_path


def _single_dicom(tmp_path):
    return write_dicom_series(tmp_path / "s", dicom_volume())[0]


LIST_ERRORS = [
    ("missing", lambda t: t / "nope.nii.gz", "file not found"),
    ("empty_folder", lambda t: t, "empty folder"),
    ("not_an_image", lambda t: text_file(t / "scan.png"), "not a NIfTI file"),
    ("only_other_files", lambda t: (text_file(t / "a.txt"), t)[1], "no NIfTI (.nii, .nii.gz) or DICOM files"),
    ("single_dicom_file", _single_dicom, "a single DICOM file"),
    ("mixed", _mixed, "mixes NIfTI files (1) and DICOM files (10)"),
    ("duplicate_ids", _dup_ids, "two files give case id 'a'"),
]


@parameterized.expand(LIST_ERRORS)
def test_list_inputs_errors(_, make, phrase):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = make(Path(d))
        with pytest.raises(InputError) as e:
            list_inputs(path)
        assert_input_error(e, path, phrase)


def test_nifti_case_id():
    assert nifti_case_id("x/ct_01.nii.gz") == "ct_01"
    assert nifti_case_id("ct.NII") == "ct"
    assert nifti_case_id("ct.nrrd") is None and nifti_case_id(".nii.gz") is None


# ----------------------------------------------------------------------------------------------------------------------
# load_image_checked: corrupt files
# ----------------------------------------------------------------------------------------------------------------------

LOAD_ERRORS = [
    ("truncated_gzip", "ct.nii.gz", truncated_gzip, "truncated gzip"),
    ("truncated_gzip_in_header", "ct.nii.gz", truncated_gzip_header, "truncated gzip"),
    ("truncated_nii_header", "ct.nii", truncated_nii_header, "truncated NIfTI header: 200 bytes"),
    ("not_gzip", "ct.nii.gz", plain_nifti_named_gz, "not a gzip file"),
    ("text_gz", "ct.nii.gz", text_file, "not a NIfTI file"),
    ("text_nii", "ct.nii", text_file, "not a NIfTI file"),
    ("empty", "ct.nii.gz", empty_file, "empty file"),
    ("truncated_nii", "ct.nii", truncated_nii, "truncated NIfTI"),
    ("corrupt_gzip", "ct.nii.gz", corrupt_gzip_middle, "corrupt gzip"),
    ("missing", "ct.nii.gz", lambda p: p, "file not found"),
    ("wrong_suffix", "ct.mha", text_file, "not a NIfTI file"),
]


@parameterized.expand(LOAD_ERRORS)
def test_load_image_checked_errors(_, name, breaker, phrase):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = breaker(Path(d) / name)
        with pytest.raises(InputError) as e:
            load_image_checked(path)
        assert_input_error(e, path, phrase)


def test_checked_load_matches_loadimaged_and_warns_without_orientation(tmp_path):
    data = ct_array()
    p = save_nifti(tmp_path / "ct.nii.gz", data)
    img = load_image_checked(p)
    ref = Compose([LoadImaged("image"), EnsureChannelFirstd("image")])({"image": str(p)})["image"]
    assert img.shape == ref.shape == (1, *data.shape)
    assert torch.equal(img.as_tensor(), ref.as_tensor())
    assert torch.allclose(img.affine, ref.affine) and np.allclose(img.affine.numpy(), AFFINE)
    assert img.meta["filename_or_obj"] == str(p)
    out = CheckedLoadImaged(["image", "label"], allow_missing_keys=True)({"image": str(p)})
    assert out["image"].shape == (1, *data.shape)
    q = save_nifti(tmp_path / "noorient.nii.gz", data, qform_code=0, sform_code=0)
    with pytest.warns(InputWarning, match="no orientation"):
        load_image_checked(q)


# ----------------------------------------------------------------------------------------------------------------------
# check_ct_volume
# ----------------------------------------------------------------------------------------------------------------------


def meta_ct(shape=(1, 12, 10, 9), fname="ct.nii.gz") -> MetaTensor:
    data = np.broadcast_to(ct_array(shape[1:4]).reshape(shape[1:4] + (1,) * (len(shape) - 4)), shape[1:])
    data = np.broadcast_to(data, shape).astype(np.float32).copy()
    return MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(AFFINE), meta={"filename_or_obj": fname})


SHAPE_ERRORS = [
    ("series_4d", (3, 12, 10, 9), "holds 3 volumes"),
    ("vector_5d", (1, 12, 10, 9, 3), "extra axes (3,)"),
    ("time_then_vector", (2, 12, 10, 9, 1), "holds 2 volumes"),
    ("2d_with_channel", (1, 12, 10), "a 2D image"),
    ("2d", (12, 10), "a 2D image"),
    ("no_channel", (12, 10, 9), "no channel axis"),
    ("single_slice", (1, 12, 10, 1), "too few slices (Z = 1"),
    ("slab", (1, 12, 10, 5), "at least 8 needed"),
    ("thin_x", (1, 3, 10, 9), "X = 3"),
]


@parameterized.expand(SHAPE_ERRORS)
def test_check_ct_shape_errors(_, shape, phrase):
    img = torch.full(shape, -1000.0)
    img = MetaTensor(img, meta={"filename_or_obj": "/data/bad.nii.gz"})
    with pytest.raises(InputError) as e:
        check_ct_volume(img)
    assert_input_error(e, "/data/bad.nii.gz", phrase)
    with pytest.raises(InputError, match="series.nii"):
        check_ct_volume(np.full(shape, -1000.0, np.float32), "series.nii")


def test_check_ct_squeezes_trailing_axis_and_keeps_meta():
    img = meta_ct((1, 12, 10, 9, 1))
    img.meta["spatial_shape"] = np.array([12, 10, 9, 1])
    out = check_ct_volume(img)
    assert isinstance(out, MetaTensor) and out.shape == (1, 12, 10, 9)
    assert np.allclose(out.affine.numpy(), AFFINE) and out.meta["filename_or_obj"] == "ct.nii.gz"
    assert list(out.meta["spatial_shape"]) == [12, 10, 9]
    assert torch.equal(out.as_tensor(), img.as_tensor()[..., 0])
    arr = check_ct_volume(img.numpy(), "x.nii")
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 12, 10, 9)


@pytest.mark.parametrize("shape, expected", [((12, 10, 9, 1), (1, 12, 10, 9)), ((12, 10, 9, 3), "holds 3 volumes")])
def test_check_ct_after_monai_loading_of_4d_nifti(tmp_path, shape, expected):
    p = save_nifti(tmp_path / "ct4d.nii.gz", np.stack([ct_array()] * shape[3], axis=-1))
    pipe = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), CheckCTd("image")])
    if isinstance(expected, str):
        with pytest.raises(RuntimeError) as e:  # MONAI's Compose wraps every transform error
            pipe({"image": str(p)})
        err = find_input_error(e.value)
        assert isinstance(err, InputError) and err.path == str(p) and expected in str(err)
    else:
        assert pipe({"image": str(p)})["image"].shape == expected


@pytest.mark.parametrize("as_numpy", [False, True])
def test_check_ct_fills_nonfinite_with_warning(as_numpy):
    img = meta_ct()
    img[0, 0, 0, 0] = float("nan")
    img[0, 1, 0, 0] = float("inf")
    img[0, 2, 0, 0] = -float("inf")
    src = img.numpy() if as_numpy else img
    with pytest.warns(InputWarning, match=r"ct.nii.gz: 3 NaN/infinite voxels replaced by -1000"):
        out = check_ct_volume(src, "ct.nii.gz")
    out = np.asarray(out)
    assert np.isfinite(out).all() and out[0, 0, 0, 0] == out[0, 1, 0, 0] == out[0, 2, 0, 0] == -1000.0
    with pytest.raises(InputError) as e:
        CheckCT(nonfinite="error")(img)
    assert_input_error(e, "ct.nii.gz", "3 voxels are NaN or infinite")
    with pytest.raises(InputError, match="every voxel is NaN"):
        check_ct_volume(torch.full((1, 9, 9, 9), float("nan")), "nan.nii")


NOT_HU = [
    ("normalised", 0.0, 1.0, "range within [0, 1]"),
    ("mr_like", 0.0, 80.0, "an MR or a normalised image"),
    ("raw_stored", 0.0, 2400.0, "without the rescale intercept"),
    ("no_air", -150.0, 300.0, "no air"),
]


@parameterized.expand(NOT_HU)
def test_check_ct_intensities_not_hu(_, lo, hi, phrase):
    img = np.linspace(lo, hi, 9 * 9 * 9, dtype=np.float32).reshape(1, 9, 9, 9)
    with pytest.warns(InputWarning, match="mr.nii.gz: intensities") as rec:
        out = check_ct_volume(img, "mr.nii.gz")
    assert phrase in str(rec[0].message) and np.array_equal(out, img)
    with pytest.raises(InputError) as e:
        check_ct_volume(img, "mr.nii.gz", strict=True)
    assert_input_error(e, "mr.nii.gz", "do not look like CT Hounsfield units", phrase)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_ct_volume(img, "mr.nii.gz", check_hu=False)


def test_check_ct_clips_padding_and_passes_good_ct_silently():
    img = meta_ct()
    img[0, 0, 0, :] = -3024.0
    img[0, 1, 0, :] = -2048.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = CheckCTd(keys="image")({"image": img})["image"]
    assert float(out.min()) == -1024.0 and float(out.max()) == 900.0
    assert torch.equal(out[img > -1024], img[img > -1024])
    kept = check_ct_volume(img, clip_min=None)
    assert float(kept.min()) == -3024.0
    ints = check_ct_volume(img.numpy().astype(np.int16), "int.nii")
    assert ints.dtype == np.int16 and ints.min() == -1024


def test_check_ct_rejects_bad_option():
    with pytest.raises(ValueError, match="nonfinite"):
        CheckCT(nonfinite="zero")


# ----------------------------------------------------------------------------------------------------------------------
# DICOM series
# ----------------------------------------------------------------------------------------------------------------------


def _expected_ras(origin, iop, spacing, step, i, j, k):
    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    lps = (
        np.asarray(origin) + i * spacing[1] * row_dir + j * spacing[0] * col_dir + k * step * np.cross(row_dir, col_dir)
    )
    return lps * np.array([-1, -1, 1])


DICOM_GEOMETRY = [
    ("axial", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), 2.0),
    ("axial_feet_first", (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), 1.25),
    ("oblique", (np.cos(0.3), np.sin(0.3), 0.0, -np.sin(0.3) * 0.8, np.cos(0.3) * 0.8, 0.6), 3.0),
]


@parameterized.expand(DICOM_GEOMETRY)
def test_dicom_series_geometry_and_values(_, iop, step):
    import tempfile

    iop = tuple(np.round(iop, 6))
    vol = dicom_volume()
    origin, spacing = (-40.0, -30.0, -200.0), (0.7, 0.6)
    with tempfile.TemporaryDirectory() as d:
        write_dicom_series(Path(d), vol, spacing=spacing, slice_step=step, origin=origin, iop=iop, slope=0.5)
        got, affine = load_dicom_series(d)
    assert got.shape == vol.shape and got.dtype == np.float32
    assert np.array_equal(got, vol)  # values rescaled, slice order from positions (names/instances are reversed)
    for ijk in [(0, 0, 0), (11, 0, 0), (0, 9, 0), (3, 4, 9), (11, 9, 9)]:
        assert np.allclose(affine @ np.array([*ijk, 1.0]), [*_expected_ras(origin, iop, spacing, step, *ijk), 1.0])


def test_checked_load_of_dicom_folder_gives_metatensor(tmp_path):
    write_dicom_series(tmp_path, dicom_volume())
    img = load_image_checked(tmp_path)
    assert isinstance(img, MetaTensor) and img.shape == (1, 12, 10, 10)
    assert img.meta["filename_or_obj"] == str(tmp_path) and img.meta["space"] == "RAS"
    assert np.allclose(img.affine[:3, 3].numpy(), [40.0, 30.0, -200.0])
    assert check_ct_volume(img).shape == (1, 12, 10, 10)


DICOM_ERRORS = [
    ("missing_slice", dict(skip=(4, 5)), "missing slices", "6.00 mm between IM0007"),
    ("two_series_no_choice", "two", "2 DICOM series", "1.2.3.7"),
    ("other_size", dict(overrides={3: {"Rows": 8}}), "inconsistent slice size", "is 8x12"),
    ("other_orientation", dict(overrides={2: {"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}}), "orientation", "IM"),
    ("other_spacing", dict(overrides={2: {"PixelSpacing": [0.9, 0.9]}}), "inconsistent pixel spacing", "IM"),
    ("duplicate_position", dict(overrides={2: {"ImagePositionPatient": [-40.0, -30.0, -198.0]}}), "same position", ""),
]


@parameterized.expand(DICOM_ERRORS)
def test_dicom_series_errors(_, kwargs, phrase, detail):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "series"
        if kwargs == "two":
            write_dicom_series(folder, dicom_volume(), series_uid="1.2.3.7")
            write_dicom_series(folder, dicom_volume(), series_uid="1.2.3.8", names=[f"b{k}" for k in range(10)])
        else:
            write_dicom_series(folder, dicom_volume(), **kwargs)
        with pytest.raises(InputError) as e:
            load_dicom_series(folder)
        assert_input_error(e, folder, phrase, detail)
        with pytest.raises(InputError):
            load_image_checked(folder)


def test_dicom_non_ct_modality_warns(tmp_path):
    write_dicom_series(tmp_path, dicom_volume(), modality="MR")
    with pytest.warns(InputWarning, match="modality MR"):
        load_dicom_series(tmp_path)


def test_real_dicom_matches_its_nifti(real_dir):
    case = real_dir / "03_totalseg_dicom_upper_abdomen"
    vol, affine = load_dicom_series(case / "dicom")
    ref = nib.load(case / "image.nii.gz")
    assert vol.shape == ref.shape == (512, 512, 20)
    a = nib.as_closest_canonical(nib.Nifti1Image(vol, affine))
    b = nib.as_closest_canonical(ref)
    assert np.abs(a.affine - b.affine).max() < 0.01  # same world geometry
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj, dtype=np.float32))  # same voxels
    # and the orientation really differs on disk (LAS NIfTI vs the DICOM's own layout): the test compares geometry
    assert not np.allclose(affine, ref.affine)
    [listed] = list_inputs(case / "dicom")
    assert listed.kind == "dicom" and listed.case_id == "dicom"


@pytest.mark.parametrize(
    "case",
    [
        "01_totalseg_example_ct_abdomen_pelvis",
        "02_totalseg_example_ct_sm_upper_abdomen",
        "03_totalseg_dicom_upper_abdomen",
    ],
)
def test_real_ct_passes_checks(real_dir, case):
    path = real_dir / case / "image.nii.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        img = CheckCTd("image")(CheckedLoadImaged("image")({"image": str(path)}))["image"]
    assert img.ndim == 4 and img.shape[0] == 1 and float(img.min()) == -1024.0 and float(img.max()) > 1000
    assert img.meta["filename_or_obj"] == str(path)


# ----------------------------------------------------------------------------------------------------------------------
# write_nifti_safely
# ----------------------------------------------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_write_nifti_safely_round_trip_and_no_overwrite(tmp_path):
    seg = np.zeros((1, 6, 5, 4), dtype=np.uint8)
    seg[0, 2:4, 1:3, 1:3] = 3
    out = write_nifti_safely(torch.from_numpy(seg), torch.as_tensor(AFFINE), tmp_path / "sub" / "seg.nii.gz")
    img = nib.load(out)
    assert img.shape == (6, 5, 4) and img.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(img.dataobj), seg[0]) and np.allclose(img.affine, AFFINE)
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    assert (os.stat(out).st_mode & 0o777) != 0o600  # not the private mode of the temporary file
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        write_nifti_safely(seg[0] + 1, AFFINE, out)
    assert out.read_bytes() == before and _leftovers(out.parent) == []
    write_nifti_safely(seg[0] + 1, AFFINE, out, overwrite=True)
    assert np.asarray(nib.load(out).dataobj).max() == 4 and _leftovers(out.parent) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_write_nifti_safely_failure_leaves_old_file_and_no_partial(tmp_path, monkeypatch, overwrite):
    target = tmp_path / "seg.nii.gz"
    if overwrite:
        target.write_bytes(b"previous result")

    def failing_save(img, filename):  # a disk that fills up half-way through the write
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        write_nifti_safely(np.zeros((4, 4, 4), np.uint8), AFFINE, target, overwrite=overwrite)
    assert _leftovers(tmp_path) == []
    assert target.read_bytes() == b"previous result" if overwrite else not target.exists()


WRITE_CONVERSIONS = [
    ("channel_last_probabilities", np.random.default_rng(0).random((6, 5, 4, 3)).astype(np.float16), {}, (6, 5, 4, 3)),
    ("channel_first_named", np.zeros((3, 6, 5, 4), np.float32), {"channel_dim": 0}, (6, 5, 4, 3)),
    ("int64_labels", np.full((6, 5, 4), 7, np.int64), {}, (6, 5, 4)),
    ("negative_int64", np.full((6, 5, 4), -1024, np.int64), {}, (6, 5, 4)),
    ("bool_mask", np.ones((6, 5, 4), bool), {}, (6, 5, 4)),
    ("forced_dtype", np.ones((6, 5, 4), np.float64), {"dtype": np.int16}, (6, 5, 4)),
]
WRITE_DTYPES = {
    "channel_last_probabilities": np.float32,
    "channel_first_named": np.float32,
    "int64_labels": np.uint8,
    "negative_int64": np.int16,
    "bool_mask": np.uint8,
    "forced_dtype": np.int16,
}


@parameterized.expand(WRITE_CONVERSIONS)
def test_write_nifti_safely_shapes_and_types(name, array, kwargs, shape):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = write_nifti_safely(array, AFFINE, Path(d) / "x.nii.gz", **kwargs)
        img = nib.load(out)
        assert img.shape == shape and img.get_data_dtype() == WRITE_DTYPES[name]
        expected = np.moveaxis(array, 0, -1) if "channel_dim" in kwargs else array
        assert np.allclose(np.asarray(img.dataobj), expected.astype(np.float64))


@pytest.mark.parametrize(
    "array, affine, name, phrase",
    [
        (np.zeros((4, 4)), AFFINE, "a.nii.gz", "expected a 3D array"),
        (np.zeros((3, 6, 5, 4)), AFFINE, "a.nii.gz", "looks channel-first"),
        (np.full((4, 4, 4), 2**40), AFFINE, "a.nii.gz", "do not fit int32"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4)), "a.nii.gz", "invertible"),
        (np.zeros((4, 4, 4)), AFFINE, "a.nrrd", "must end in .nii"),
    ],
)
def test_write_nifti_safely_rejects_bad_arguments(tmp_path, array, affine, name, phrase):
    with pytest.raises(ValueError, match=phrase):
        write_nifti_safely(array, affine, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_input_error_survives_pickling_and_copy():
    """DataLoader workers pickle a worker's exception: the error must come back with its path and message."""
    import copy
    import pickle

    from custom.errors import InputError

    err = InputError("/data/ct.nii", "truncated gzip")
    for back in (pickle.loads(pickle.dumps(err)), copy.copy(err)):
        assert isinstance(back, InputError)
        assert (back.path, back.message, str(back)) == (
            "/data/ct.nii",
            "truncated gzip",
            "/data/ct.nii: truncated gzip",
        )


def test_io_re_exports_the_modules_it_was_split_into():
    """``custom.io.<name>`` keeps working for configs and scripts written before the split (same objects)."""
    import custom.ct_checks
    import custom.dicom_io
    import custom.errors
    import custom.io
    import custom.nifti_io
    import custom.outputs

    homes = [custom.errors, custom.nifti_io, custom.dicom_io, custom.ct_checks, custom.outputs]
    for name in custom.io.__all__:
        home = [m for m in homes if name in m.__all__]
        assert home or name in (
            "CaseInput",
            "list_inputs",
            "load_image_checked",
            "CheckedLoadImage",
            "CheckedLoadImaged",
        )
        assert all(getattr(custom.io, name) is getattr(m, name) for m in home), name
    assert custom.io.CheckCTd is custom.ct_checks.CheckCTd and custom.io.atomic_write is custom.outputs.atomic_write
