"""Robustness, second round (issue 12), on the input and training side: booleans typed on the command line, geometry
no CT has, DICOM folders with reports or several series, rescale tags per slice, messages that say what a file is,
broken symbolic links and case ids that would write outside the output folder, training data checks.

Each test names its row in ``bundle/docs/robustness.md``. Inputs are small synthetic files written with nibabel or
pydicom and broken on purpose; the training cases go through the real ``train.json`` (in-process ``ConfigWorkflow``,
and once the real ``python -m monai.bundle run`` command line).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import ROOT, TINY, bundle_cli, config_files, save_tiny_weights
from monai.bundle import ConfigParser, ConfigWorkflow
from parameterized import parameterized
from test_io import ct_array, dicom_volume, save_nifti, write_dicom_series

from custom.checkpoint import ResumeFromCheckpoint
from custom.ct_checks import affine_problems
from custom.data import DatasetError, load_datalist
from custom.dicom_io import load_dicom_series
from custom.errors import InputError, InputWarning
from custom.io import list_inputs, load_image_checked
from custom.labels import PAPER_LABELS
from custom.nifti_io import check_nifti_header
from custom.outputs import path_inside, safe_case_id
from custom.verify import label_disagreements, verify, verify_dataset
from custom.workflow import inference_datalist

GOOD = np.array([[-0.8, 0, 0, 100.0], [0, 0.8, 0, -50.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def cause(error: BaseException, kind: type[BaseException]) -> BaseException:
    """The ``kind`` error in the chain (MONAI's config parser wraps what a ``_target_`` raises)."""
    seen = error
    while seen is not None and not isinstance(seen, kind):
        seen = seen.__cause__ or seen.__context__
    assert seen is not None, f"no {kind.__name__} in the chain of {error!r}"
    return seen


@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> Path:
    return tiny_dataset(n_train=3, n_test=1)  # shared, read-only: tests that change it work on copy_dataset


def copy_dataset(dataset: Path, dst: Path) -> Path:
    shutil.copytree(dataset.parent, dst)
    return dst / dataset.name


def train_workflow(dataset: Path, out: Path, **over) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=config_files("common.json", "train.json"),
        workflow_type="train",
        logging_file=False,
        **{**TINY, "dataset_dir": str(dataset.parent), "output_dir": str(out), **over},
    )


def training_label(ds: Path, i: int = 1) -> Path:
    return ds.parent / json.loads(ds.read_text())["training"][i]["label"]


def training_image(ds: Path, i: int = 1) -> Path:
    return ds.parent / json.loads(ds.read_text())["training"][i]["image"]


def header_with_sform(path: Path, sform: np.ndarray, data: np.ndarray | None = None) -> Path:
    """A NIfTI whose sform (code 1) is ``sform`` as written, even singular or NaN (nibabel's image constructor would
    refuse to decompose it); the qform is a good one, as scanners write it."""
    data = ct_array((20, 20, 20)) if data is None else data
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_qform(GOOD, code=1)
    hdr.set_sform(sform, code=1)
    nib.save(nib.Nifti1Image(data, None, header=hdr), path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# 19. booleans from the command line (training side)


def test_resume_flase_is_refused_through_the_bundle_command_line(dataset, tmp_path):
    out = tmp_path / "run"
    over = {**TINY, "dataset_dir": str(dataset.parent), "output_dir": str(out), "resume": "flase"}
    res = subprocess.run(bundle_cli(["common.json", "train.json"], over), cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0, res.stdout[-2000:]
    assert "--resume must be true or false" in res.stderr and "'flase'" in res.stderr, res.stderr[-3000:]
    assert not (out / "checkpoints").exists()  # refused before the run folder, let alone training


def test_resume_false_typed_as_text_does_not_resume(dataset, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint_last.pt").write_bytes(b"previous run")
    for typed in ("false", "False", "0", "no"):
        with pytest.raises(Exception) as e:  # a folder with checkpoints needs resume or overwrite
            train_workflow(dataset, out, resume=typed, verify_data=False).initialize()
        assert "checkpoint_last.pt" in str(cause(e.value, FileExistsError))
    assert (out / "checkpoints" / "checkpoint_last.pt").read_bytes() == b"previous run"  # nothing rewritten
    # overwrite typed as text works the same way: "false" keeps the refusal, "true" replaces
    with pytest.raises(Exception) as e:
        train_workflow(dataset, out, resume="false", overwrite="false", verify_data=False).initialize()
    assert "checkpoint_last.pt" in str(cause(e.value, FileExistsError))
    train_workflow(dataset, out, resume="false", overwrite="true", verify_data=False).initialize()


def test_verify_data_false_typed_as_text_switches_verification_off(dataset, tmp_path):
    ds = copy_dataset(dataset, tmp_path / "ds")
    lab = training_label(ds)
    img = nib.load(lab)
    bad = np.asarray(img.dataobj).copy()
    bad[0, 0, 0] = 9  # not in the label set
    nib.save(nib.Nifti1Image(bad, img.affine), lab)
    with pytest.raises(Exception) as e:
        train_workflow(ds, tmp_path / "a", verify_data="true").initialize()
    assert "label values [9]" in str(cause(e.value, DatasetError))
    train_workflow(ds, tmp_path / "b", verify_data="false").initialize()  # off: no DatasetError
    with pytest.raises(Exception) as e:
        train_workflow(ds, tmp_path / "c", verify_data="flase").initialize()
    assert "--verify_data must be true or false" in str(cause(e.value, ValueError))


@pytest.mark.parametrize("mixin", [[], ["multi_gpu_train.json"]])
def test_training_config_flags_coerce_every_boolean(mixin):
    parser = ConfigParser()
    parser.read_config(config_files("common.json", "train.json", *mixin))
    typed = {"resume": "false", "overwrite": "True", "verify_data": "0", "allow_label_flip": "yes"}
    parser.update(typed)
    assert {k: parser.get_parsed_content(f"flags#{k}") for k in typed} == {
        "resume": False,
        "overwrite": True,
        "verify_data": False,
        "allow_label_flip": True,
    }
    init = json.dumps(parser["initialize"]).replace("::", "#")  # the parser stores "#" as "::"
    for key in ("verify_data", "resume", "overwrite", "allow_label_flip"):  # coerced values, never the raw ones
        assert f"@flags#{key}" in init and f"@{key}" not in init.replace(f"@flags#{key}", ""), init


def test_training_booleans_unit_level(tmp_path):
    assert ResumeFromCheckpoint(str(tmp_path / "x.pt"), {"net": torch.nn.Linear(1, 1)}, resume="false").resume is False
    assert ResumeFromCheckpoint(str(tmp_path / "x.pt"), {"net": torch.nn.Linear(1, 1)}, resume="True").resume is True
    with pytest.raises(ValueError, match="--resume must be true or false"):
        ResumeFromCheckpoint(str(tmp_path / "x.pt"), {"net": torch.nn.Linear(1, 1)}, resume="flase")


def test_phantom_cli_overwrite_false_typed_as_text_keeps_the_dataset(tmp_path):
    from tools.phantom.dataset import _cli_write_dataset

    (tmp_path / "dataset.json").write_text("an earlier dataset")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        _cli_write_dataset(str(tmp_path), n_train=1, n_test=0, preset="tiny", overwrite="false")
    with pytest.raises(ValueError, match="--overwrite must be true or false"):
        _cli_write_dataset(str(tmp_path), n_train=1, n_test=0, preset="tiny", overwrite="flase")
    assert (tmp_path / "dataset.json").read_text() == "an earlier dataset"


def test_verify_cli_booleans(tmp_path, capsys):
    root = tmp_path / "ds"
    js = flipped_label_dataset(root)
    with pytest.raises(SystemExit) as e:
        verify(str(js), labels="paper", allow_label_flip="flase")
    assert e.value.code == 1 and "--allow_label_flip must be true or false" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        verify(str(js), labels="paper", allow_label_flip="false")
    assert e.value.code == 1 and "label axis directions" in capsys.readouterr().out
    verify(str(js), labels="paper", allow_label_flip="true")  # no exit: the flip is allowed
    assert "allowed by allow_label_flip" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# 20. geometry that cannot be right


def _singular():
    a = GOOD.copy()
    a[:3, 2] = 0.0  # a zero column
    return a


def _nan():
    a = GOOD.copy()
    a[0, 0] = np.nan
    return a


GEOMETRY_ERRORS = [
    ("singular_sform", _singular, (20, 20, 20), "is singular", "0. "),
    ("nan_in_sform", _nan, (20, 20, 20), "NaN or infinite", "nan"),
    ("slice_spacing_typo_200mm", lambda: np.diag([0.8, 0.8, 200.0, 1.0]), (20, 20, 20), "200 mm along axis 2", ""),
    ("header_in_metres", lambda: np.diag([0.0008, 0.0008, 0.0025, 1.0]), (20, 20, 20), "0.0008 mm along axis 0", ""),
    ("extent_above_a_body", lambda: np.diag([0.8, 0.8, 10.0, 1.0]), (8, 8, 300), "3000 mm along axis 2", ""),
]


@parameterized.expand(GEOMETRY_ERRORS)
def test_impossible_geometry_is_refused_before_monai(_, make, shape, phrase, number):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = header_with_sform(Path(d) / "ct.nii.gz", make(), ct_array(shape))
        with pytest.raises(InputError) as e:
            load_image_checked(path)
        msg = str(e.value)
        assert msg.startswith(str(path)) and "the sform" in msg and phrase in msg and number in msg, msg
        with pytest.raises(InputError, match=phrase):
            check_nifti_header(path)


def test_plausible_geometry_passes():
    assert affine_problems(GOOD, (512, 512, 400)) == []
    assert affine_problems(np.diag([0.5, 0.5, 5.0, 1.0]), (1024, 1024, 300)) == []


# ---------------------------------------------------------------------------------------------------------------------
# 21. DICOM: a batch of series folders survives a dose report and a folder with two series


def non_image_dicom(path: Path, modality: str = "SR", sop: str = "1.2.840.10008.5.1.4.1.1.88.67") -> Path:
    """A DICOM object without pixel data (default: an X-Ray Radiation Dose SR), in its own series."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "Dose Report"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_non_image_dicom_objects_are_skipped_with_a_note(tmp_path):
    folder = tmp_path / "patient"
    write_dicom_series(folder, dicom_volume(), series_uid="1.2.3.100")
    non_image_dicom(folder / "DOSE_SR")
    non_image_dicom(folder / "PR1", modality="PR", sop="1.2.840.10008.5.1.4.1.1.11.1")
    with pytest.warns(
        InputWarning, match=r"skipped 2 DICOM object\(s\) that are not image slices: DOSE_SR: modality SR"
    ):
        [case] = list_inputs(folder)
    assert case.series_uid == "1.2.3.100"
    with pytest.warns(InputWarning, match="skipped 2"):
        vol, _ = load_dicom_series(folder)
    assert vol.shape == (12, 10, 10)


def test_folder_with_two_series_is_one_failed_case_not_the_end_of_the_batch(tmp_path):
    write_dicom_series(tmp_path / "p1", dicom_volume(), series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "p2", dicom_volume(), series_uid="1.2.3.21")
    write_dicom_series(tmp_path / "p2", dicom_volume(), series_uid="1.2.3.22", names=[f"b{k}" for k in range(10)])
    write_dicom_series(tmp_path / "p3", dicom_volume(), series_uid="1.2.3.3")
    non_image_dicom(tmp_path / "p3" / "RD_dose")  # the dose report of issue 12
    (tmp_path / "p4_dose_report").mkdir()
    non_image_dicom(tmp_path / "p4_dose_report" / "SR0001")  # a report exported as a series of its own: no case
    with pytest.warns(InputWarning, match=r"p4_dose_report: not a case: no DICOM image slices"):
        list_inputs(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        cases = list_inputs(tmp_path)
        assert [c.case_id for c in cases] == ["p1", "p2", "p3"]
        assert load_image_checked(cases[0].path, cases[0].series_uid).shape == (1, 12, 10, 10)
        assert load_image_checked(cases[2].path, cases[2].series_uid).shape == (1, 12, 10, 10)
        with pytest.raises(InputError) as e:
            load_image_checked(cases[1].path, cases[1].series_uid)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "p2")) and "2 DICOM series" in msg and "1.2.3.21" in msg, msg
    assert "--datalist#series_uid" in msg  # an option the user can pass on the bundle command line (next test)


def test_dicom_batch_through_inference_json_segments_the_good_series(tmp_path, capsys):
    inputs = tmp_path / "in"
    big = dicom_volume((40, 36, 24))
    write_dicom_series(inputs / "p1", big, spacing=(3.0, 3.0), slice_step=3.0, series_uid="1.2.3.1")
    non_image_dicom(inputs / "p1" / "RD_dose")  # the dose report beside the series of issue 12
    write_dicom_series(inputs / "p2", big, spacing=(3.0, 3.0), slice_step=3.0, series_uid="1.2.3.21")
    write_dicom_series(
        inputs / "p2",
        big,
        spacing=(3.0, 3.0),
        slice_step=3.0,
        series_uid="1.2.3.22",
        names=list("abcdefghijklmnopqrstuvwx"),
    )
    weights = save_tiny_weights(tmp_path / "w.pt", kaiming=False)
    over = {k: TINY[k] for k in ("features", "patch_size", "target_spacing")}
    wf = ConfigWorkflow(
        config_file=config_files("common.json", "inference.json"),
        workflow_type=None,
        logging_file=False,
        **{**over, "input": str(inputs), "output_dir": str(tmp_path / "out"), "stage1_weights": str(weights),
           "stage2_weights": str(weights), "stage2_overlap": 1},
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        wf.initialize()
        wf.run()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cases"] == 2 and summary["succeeded"] == 1, summary
    [failed] = summary["failed"]
    assert (
        failed["case_id"] == "p2" and "2 DICOM series" in failed["error"] and "--datalist#series_uid" in failed["error"]
    )
    assert nib.load(tmp_path / "out" / "p1_seg.nii.gz").shape == big.shape


def test_series_uid_is_passable_from_the_bundle_command_line(tmp_path):
    folder = tmp_path / "p2"
    write_dicom_series(folder, dicom_volume(), series_uid="1.2.3.21")
    write_dicom_series(folder, dicom_volume() + 7, series_uid="1.2.3.22", names=[f"b{k}" for k in range(10)])
    parser = ConfigParser()
    parser.read_config(config_files("common.json", "inference.json"))
    parser.update({"input": str(folder), "datalist#series_uid": "1.2.3.22"})  # what --datalist#series_uid does
    [case] = parser.get_parsed_content("datalist")
    assert case == {"image": str(folder), "case_id": "p2", "series_uid": "1.2.3.22"}
    from custom.io import CheckedLoadImaged

    img = CheckedLoadImaged("image")(case)["image"]
    assert img.meta["series_uid"] == "1.2.3.22" and float(img[0, 5, 5, 5]) == float(dicom_volume()[5, 5, 5] + 7)


# ---------------------------------------------------------------------------------------------------------------------
# 22. DICOM rescale per slice


def _edit_slices(files, names, edit):
    import pydicom

    for f in files:
        if f.name in names:
            ds = pydicom.dcmread(f)
            edit(ds)
            ds.save_as(f)


def test_rescale_missing_on_some_slices_is_an_error_naming_them(tmp_path):
    files = write_dicom_series(tmp_path, dicom_volume())
    names = {"IM0002", "IM0005", "IM0009"}

    def drop(ds):
        del ds.RescaleIntercept
        del ds.RescaleSlope

    _edit_slices(files, names, drop)
    with pytest.raises(InputError) as e:
        load_dicom_series(tmp_path)
    msg = str(e.value)
    assert "RescaleSlope/RescaleIntercept missing on 3 of 10 slices" in msg, msg
    assert all(n in msg for n in names) and "1024 HU too bright" in msg


def test_rescale_inconsistent_is_an_error_or_applied_per_slice_with_a_warning(tmp_path):
    vol = dicom_volume()
    files = write_dicom_series(tmp_path, vol)  # intercept -1024 on every slice

    def shift(ds):
        ds.RescaleIntercept = -1000.0

    _edit_slices(files, {"IM0004"}, shift)  # IM0004 is slice k = 6 (names run backwards)
    with pytest.raises(InputError) as e:
        load_dicom_series(tmp_path)
    assert "differ across the series" in str(e.value) and "IM0004 (1.0, -1000.0)" in str(e.value), str(e.value)
    assert "mixed_rescale='per_slice'" in str(e.value)
    with pytest.warns(InputWarning, match="each slice's own applied"):
        got, _ = load_dicom_series(tmp_path, mixed_rescale="per_slice")
    assert np.array_equal(np.delete(got, 6, axis=2), np.delete(vol, 6, axis=2))
    assert np.array_equal(got[:, :, 6], vol[:, :, 6] + 24.0)


# ---------------------------------------------------------------------------------------------------------------------
# 23. messages that say what the file is


def rgb_nifti(path: Path) -> Path:
    rgb = np.zeros((20, 20, 20), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, GOOD), path)
    return path


def gzip_named_nii(path: Path) -> Path:
    gz = save_nifti(path.with_name("x.nii.gz"), ct_array())
    path.write_bytes(gz.read_bytes())
    return path


MESSAGE_CASES = [
    ("rgb_nifti", "shot.nii.gz", rgb_nifti, "an RGB colour image (NIfTI datatype RGB24)"),
    ("gzip_named_nii", "ct.nii", gzip_named_nii, "a gzip-compressed file named .nii: rename it to .nii.gz"),
]


@parameterized.expand(MESSAGE_CASES)
def test_messages_say_what_the_file_is(_, name, make, phrase):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = make(Path(d) / name)
        with pytest.raises(InputError) as e:
            load_image_checked(path)
        assert str(e.value) == f"{path}: {phrase}" or str(e.value).startswith(f"{path}: {phrase}"), str(e.value)


def _truncate_slice(files):
    raw = files[3].read_bytes()
    files[3].write_bytes(raw[:-50])
    return files[3], "truncated: the pixel data hold 190 bytes"


def _no_pixel_data(files):
    import pydicom

    ds = pydicom.dcmread(files[3])
    del ds.PixelData
    ds.save_as(files[3])
    return files[3], "no pixel data"


@parameterized.expand([("truncated", _truncate_slice), ("without_pixel_data", _no_pixel_data)])
def test_damaged_dicom_slice_is_named_without_plugin_advice(_, breaker):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        bad, phrase = breaker(write_dicom_series(Path(d) / "s", dicom_volume()))
        with pytest.raises(InputError) as e:
            load_image_checked(Path(d) / "s")
        assert str(e.value).startswith(f"{bad}: {phrase}"), str(e.value)
        assert "plugin" not in str(e.value)


def test_windows_backslashes_in_dataset_json(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    save_nifti(tmp_path / "imagesTr" / "a.nii.gz", ct_array())
    save_nifti(tmp_path / "labelsTr" / "a.nii.gz", np.zeros((12, 10, 9), np.uint8))
    doc = {"training": [{"image": "imagesTr\\a.nii.gz", "label": ".\\labelsTr\\a.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    [item] = load_datalist(tmp_path / "dataset.json")
    assert item["image"] == str(tmp_path / "imagesTr" / "a.nii.gz") and item["case_id"] == "a"
    assert item["label"] == str(tmp_path / "labelsTr" / "a.nii.gz")
    assert Path(item["image"]).is_file()
    doc = {"training": [{"image": "C:\\data\\imagesTr\\a.nii.gz", "label": "labelsTr/a.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"is a Windows absolute path; write paths relative to dataset.json"):
        load_datalist(tmp_path / "dataset.json")


def test_list_glob_or_number_as_input(tmp_path):
    for name in ("b.nii.gz", "a.nii.gz", "c.nii"):
        save_nifti(tmp_path / name, ct_array())
    listed = list_inputs([str(tmp_path / "b.nii.gz"), str(tmp_path / "a.nii.gz")])  # fire: --input '["b","a"]'
    assert [c.case_id for c in listed] == ["b", "a"]
    listed = list_inputs(f"[{tmp_path / 'b.nii.gz'},{tmp_path / 'a.nii.gz'}]")  # fire: --input [b,a] is a string
    assert [c.case_id for c in listed] == ["b", "a"]
    assert [c.case_id for c in list_inputs(str(tmp_path / "*.nii.gz"))] == ["a", "b"]  # a quoted glob
    with pytest.raises(InputError, match="the pattern matches no file"):
        list_inputs(str(tmp_path / "*.nrrd"))
    with pytest.raises(InputError, match="two files give case id 'a'"):
        list_inputs([str(tmp_path / "a.nii.gz"), str(tmp_path / "a.nii.gz")])
    with pytest.raises(InputError, match="20241201: file not found"):
        list_inputs(20241201)  # fire parses --input 20241201 as an int
    parser = ConfigParser()
    parser.read_config(config_files("common.json", "inference.json"))
    parser.update({"input": [str(tmp_path / "a.nii.gz"), str(tmp_path / "c.nii")]})
    assert [d["case_id"] for d in parser.get_parsed_content("datalist")] == ["a", "c"]
    assert [d["case_id"] for d in inference_datalist(str(tmp_path / "?.nii*"))] == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------------------------------
# 24. broken symbolic links; derived paths stay inside output_dir


def test_broken_symlink_in_a_nifti_folder_is_a_failed_case(tmp_path):
    save_nifti(tmp_path / "a.nii.gz", ct_array())
    os.symlink(tmp_path / "gone" / "b.nii.gz", tmp_path / "b.nii.gz")
    cases = list_inputs(tmp_path)
    assert [c.case_id for c in cases] == ["a", "b"]  # listed, not silently dropped
    with pytest.raises(InputError) as e:
        load_image_checked(cases[1].path)
    assert (
        str(e.value)
        == f"{tmp_path / 'b.nii.gz'}: broken symbolic link (points to {tmp_path}/gone/b.nii.gz, which does not exist)"
    )


def test_broken_symlink_in_a_dicom_folder_fails_that_series(tmp_path):
    write_dicom_series(tmp_path / "s", dicom_volume())
    os.symlink(tmp_path / "elsewhere" / "IM0011", tmp_path / "s" / "IM0011")
    with pytest.raises(InputError) as e:
        load_image_checked(tmp_path / "s")
    assert str(e.value).startswith(f"{tmp_path / 's'}: 1 broken symbolic link(s) in the series folder (IM0011)")
    os.symlink(tmp_path / "unmounted" / "series2", tmp_path / "t")  # a linked series folder whose disk is gone
    cases = list_inputs(tmp_path)
    assert [c.case_id for c in cases] == ["s", "t"]
    with pytest.raises(InputError, match="t: broken symbolic link"):
        load_image_checked(cases[1].path)


@pytest.mark.parametrize("bad", ["../../escape", "sub/case", "..", "a\\b", "", "x\x00y"])
def test_case_ids_from_dataset_json_stay_inside_output_dir(tmp_path, bad):
    with pytest.raises(InputError, match="case id"):
        safe_case_id(bad, "dataset.json")
    doc = {"test": [{"image": "imagesTs/a.nii.gz", "case_id": bad}]}
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError) as e:
        load_datalist(tmp_path / "dataset.json", key="test")
    assert str(tmp_path / "dataset.json") in str(e.value) and "case id" in str(e.value)


def test_path_inside_refuses_escapes_and_links_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert path_inside(out, "case_1_seg.nii.gz") == out / "case_1_seg.nii.gz"
    with pytest.raises(InputError, match="outside the output folder"):
        path_inside(out, "../case_1_seg.nii.gz")
    os.symlink(tmp_path, out / "link")
    with pytest.raises(InputError, match="outside the output folder"):
        path_inside(out, "link/x_seg.nii.gz")
    assert safe_case_id("case.01-a_b") == "case.01-a_b"


# ---------------------------------------------------------------------------------------------------------------------
# 25. training data: a flipped label header, dataset.json labels that disagree, one bad case


def flipped_label_dataset(root: Path) -> Path:
    """Two cases; the second label's header says RAS while its image says LAS (voxels line up with the image)."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for cid, flip in (("good", False), ("flipped", True)):
        (root / "imagesTr").mkdir(exist_ok=True)
        (root / "labelsTr").mkdir(exist_ok=True)
        save_nifti(root / "imagesTr" / f"{cid}.nii.gz", ct_array())
        lab = np.zeros((12, 10, 9), np.uint8)
        lab[2:5, 2:5, 2:5] = 3
        save_nifti(root / "labelsTr" / f"{cid}.nii.gz", lab, np.diag([-1, 1, 1, 1.0]) @ GOOD if flip else GOOD)
        entries.append({"image": f"imagesTr/{cid}.nii.gz", "label": f"labelsTr/{cid}.nii.gz"})
    labels = {"0": "background", **{str(v): k for k, v in PAPER_LABELS.items()}}
    (root / "dataset.json").write_text(json.dumps({"labels": labels, "training": entries}))
    return root / "dataset.json"


def test_flipped_label_header_is_an_error_unless_allowed(tmp_path):
    js = flipped_label_dataset(tmp_path)
    with pytest.raises(DatasetError) as e:
        verify_dataset(js, PAPER_LABELS)
    [problem] = e.value.problems
    assert problem.startswith(str(tmp_path / "labelsTr" / "flipped.nii.gz")), problem
    assert "label axis directions (RAS) differ from the image's (LAS" in problem and "allow_label_flip" in problem
    report = verify_dataset(js, PAPER_LABELS, allow_label_flip=True)
    assert report.ok and any("allowed by allow_label_flip" in w for w in report.warnings)
    # a label really stored in another voxel order (mirrored voxels, matching header) covers the same space: a warning
    lab_path = tmp_path / "labelsTr" / "flipped.nii.gz"
    lab = np.asarray(nib.load(lab_path).dataobj)
    mirror = np.array([[-1.0, 0, 0, lab.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    save_nifti(lab_path, np.ascontiguousarray(lab[::-1]), GOOD @ mirror)
    report = verify_dataset(js, PAPER_LABELS)
    assert report.ok and any("stored in another orientation (RAS) than its image (LAS)" in w for w in report.warnings)


BTCV_LABELS = {"0": "background", "1": "spleen", "2": "rkid", "3": "lkid", "4": "gall", "5": "eso", "6": "liver"}


def test_dataset_json_labels_that_disagree_are_an_error(tmp_path):
    js = flipped_label_dataset(tmp_path)
    doc = json.loads(js.read_text())
    doc["training"] = doc["training"][:1]
    doc["labels"] = BTCV_LABELS
    js.write_text(json.dumps(doc))
    with pytest.raises(DatasetError) as e:
        verify_dataset(js, PAPER_LABELS)
    text = str(e.value)
    assert "disagrees with dataset.json's labels" in text, text
    assert "value 1 is 'spleen' in dataset.json but 'artery' in the label set" in text
    assert "'liver' is 6 in dataset.json but 3 in the label set" in text
    assert verify_dataset(js, PAPER_LABELS, check_json_labels=False).ok  # the user says the files follow the set
    # the same structures under longer or differently written names agree
    assert label_disagreements({"Portal vein and splenic vein": 2, "Liver": 3}, PAPER_LABELS) == []
    assert label_disagreements({"gall": 6, "aorta": 1}, PAPER_LABELS) == [
        "value 1 is 'aorta' in dataset.json but 'artery' in the label set"
    ]


def _truncated_image(ds: Path) -> tuple[Path, str]:
    path = training_image(ds)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 3 // 4])  # the header survives: nibabel opens it, the voxels are cut
    return path, "truncated gzip"


def _few_slices(ds: Path) -> tuple[Path, str]:
    path, lab = training_image(ds), training_label(ds)
    for p in (path, lab):
        img = nib.load(p)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :5], img.affine), p)
    return path, "too few slices (Z = 5; at least 8 needed"


def _slice_typo(ds: Path) -> tuple[Path, str]:
    path = training_image(ds)
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine @ np.diag([1, 1, 40.0, 1])), path)
    return path, "mm along axis 2 is outside (0.05, 20] mm"


@parameterized.expand([("truncated_image", _truncated_image), ("few_slices", _few_slices), ("slice_typo", _slice_typo)])
def test_one_bad_training_case_is_refused_by_verification(name, breaker):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ds = copy_dataset(_DATASET[0], Path(d) / "ds")
        path, phrase = breaker(ds)
        out = Path(d) / "run"
        with pytest.raises(Exception) as e:
            train_workflow(ds, out).initialize()
        err = cause(e.value, DatasetError)
        assert any(p.startswith(str(path)) and phrase in p for p in err.problems), err.problems
        assert not (out / "checkpoints").exists()


def test_cut_files_are_found_from_their_size_without_decompressing_good_ones(tmp_path, monkeypatch):
    import gzip

    from custom.verify import _data_complete

    good = save_nifti(tmp_path / "good.nii.gz", ct_array((30, 30, 30)))
    plain = save_nifti(tmp_path / "plain.nii", ct_array((30, 30, 30)))
    opened = []
    real_open = gzip.open
    monkeypatch.setattr(gzip, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert _data_complete(nib.load(good), good) is None and _data_complete(nib.load(plain), plain) is None
    assert opened == []  # the gzip trailer (uncompressed size) matched: nothing decompressed
    for path in (good, plain):
        path.write_bytes(path.read_bytes()[:-200])
        assert "truncated" in _data_complete(nib.load(path), path)


def test_flipped_label_refused_through_train_json_unless_allowed(dataset, tmp_path):
    ds = copy_dataset(dataset, tmp_path / "ds")
    lab = training_label(ds)
    img = nib.load(lab)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([-1, 1, 1, 1.0]) @ img.affine), lab)
    with pytest.raises(Exception) as e:
        train_workflow(ds, tmp_path / "a").initialize()
    assert "allow_label_flip" in str(cause(e.value, DatasetError))
    train_workflow(ds, tmp_path / "b", allow_label_flip="true").initialize()


_DATASET: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _share_dataset(dataset):
    _DATASET[:] = [dataset]  # parameterized tests cannot take fixtures
    yield
