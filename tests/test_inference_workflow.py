"""``inference.json`` is a MONAI bundle workflow: what JSON alone changes, the C2 fallback where it runs, the boolean
options, and the handlers' own contracts (preview window)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import TINY, config_files, run_inference, save_tiny_weights
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import MetaTensor
from scipy import ndimage

from tools.phantom import generate_phantom

NET = {k: TINY[k] for k in ("features", "patch_size", "target_spacing")}
K = 8


def _weights(path: Path, force_class: int) -> Path:
    """A 2-feature network whose head bias makes ``force_class`` win everywhere it runs."""
    return save_tiny_weights(path, out_channels=K, kaiming=False, force_class=force_class)


def _infer(files, inputs: Path, out: Path, weights: Path, **over) -> ConfigWorkflow:
    return run_inference(inputs, out, weights, files=files, **over)


def _ct_with_a_second_body(folder: Path) -> tuple[Path, np.ndarray]:
    """A tiny phantom CT plus a soft-tissue block in the air of one corner, apart from the body."""
    p = generate_phantom(5, preset="tiny")
    image = np.asarray(p.image).copy()
    block = (slice(1, 9), slice(1, 9), slice(8, 24))
    assert image[block].max() < -900, "the block must be planted in air"
    assert (image[:12, :12] < -900).all(), "and apart from the body"
    image[block] = 40.0
    folder.mkdir(parents=True)
    path = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(image, p.affine), path)
    planted = np.zeros(image.shape, bool)
    planted[block] = True
    return path, planted


def test_json_edit_changes_the_output_without_python(tmp_path):
    """C1 without its largest-component step keeps the planted block; a stage 2 that labels liver everywhere then
    writes several liver components. An extra config file adds ``KeepLargestConnectedComponentd`` to
    ``label_postprocessing`` and renames the output: the block is gone and the file is ``ct_organs.nii.gz``."""
    img, planted = _ct_with_a_second_body(tmp_path / "in")
    w = _weights(tmp_path / "w" / "liver.pt", force_class=3)
    steps = json.loads(Path(config_files("common.json")[0]).read_text())["preprocessing_transforms"]
    body = next(i for i, t in enumerate(steps) if t["_target_"].endswith("BodyMaskd"))
    c1_edit = {f"preprocessing_transforms#{body}#largest_component": False}
    _infer(config_files("common.json", "inference.json"), img.parent, tmp_path / "plain", w, **c1_edit)
    seg = np.asarray(nib.load(tmp_path / "plain" / "ct_seg.nii.gz").dataobj)
    comps, n = ndimage.label(seg == 3)
    sizes = np.bincount(comps.ravel())[1:]
    largest = comps == 1 + int(np.argmax(sizes))
    assert n >= 2 and not (largest & planted).any(), sizes  # body, the planted block (and the table C1 then keeps)
    assert (seg[planted] == 3).mean() > 0.5, "the planted block is segmented as a component of its own"

    extra = tmp_path / "keep_largest.json"
    extra.write_text(
        json.dumps(
            {
                "label_postprocessing": [
                    {"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [3]}
                ],
                "output_postfix": "organs",
            }
        )
    )
    files = [*config_files("common.json", "inference.json"), str(extra)]
    _infer(files, img.parent, tmp_path / "edited", w, **c1_edit)
    assert not (tmp_path / "edited" / "ct_seg.nii.gz").exists()
    out = nib.load(tmp_path / "edited" / "ct_organs.nii.gz")
    edited = np.asarray(out.dataobj)
    np.testing.assert_allclose(out.affine, nib.load(img).affine, atol=1e-4)
    assert edited.shape == seg.shape and edited.dtype == np.uint8
    assert ndimage.label(edited == 3)[1] == 1
    assert not edited[planted].any(), "the planted component is removed"
    assert np.array_equal(edited == 3, largest), "the body's component is kept as it was, the others removed"


@pytest.mark.parametrize("min_organ_ml", [None, 1.0])
def test_min_organ_ml_fallback_runs_in_the_cascade(tmp_path, min_organ_ml):
    """Stage 1 finds nothing. Without ``min_organ_ml`` C2 is empty and stage 2 runs no tile; with it, every organ is
    flagged and ``CandidateRegiond``'s fallback makes C2 = C1, so stage 2 runs on the body."""
    p = generate_phantom(6, preset="tiny")
    (tmp_path / "in").mkdir()
    p.save(tmp_path / "in" / "ct.nii.gz", tmp_path / "lab.nii.gz")
    w = _weights(tmp_path / "w" / "bg.pt", force_class=0)
    out = tmp_path / "out"
    _infer(
        config_files("common.json", "inference.json"),
        tmp_path / "in",
        out,
        w,
        min_organ_ml=min_organ_ml,
        save_outputs=["qc", "c1", "c2"],
    )
    qc = json.loads((out / "ct_qc.json").read_text())
    c1 = np.asarray(nib.load(out / "ct_c1.nii.gz").dataobj) > 0
    c2 = np.asarray(nib.load(out / "ct_c2.nii.gz").dataobj) > 0
    if min_organ_ml is None:
        assert not c2.any() and qc["tiles"]["stage2"]["tiles_run"] == 0
        assert qc["stage1_flags"] == [] and qc["c2_fallback"] is False
    else:
        assert qc["stage1_flags"] == ["artery", "portal_vein", "liver", "spleen", "stomach", "gallbladder", "pancreas"]
        assert qc["c2_fallback"] is True
        assert np.array_equal(c2, c1) and c1.any()
        assert qc["tiles"]["stage2"]["tiles_run"] >= 1
        assert qc["c2_fraction"] == pytest.approx(qc["c1_fraction"])


def _messages(error: BaseException) -> list[str]:
    """Messages along the chain (MONAI's config parser wraps what a component or expression raises)."""
    out = []
    while error is not None:
        out.append(str(error))
        error = error.__cause__ or error.__context__
    return out


BOOLEAN_OPTIONS = [
    (["inference.json"], "overwrite"),
    (["inference.json"], "evaluate"),
    (["inference.json"], "stage1_only"),
    (["inference.json", "candidates.json"], "out_of_fold"),
]


@pytest.mark.parametrize("files, name", BOOLEAN_OPTIONS)
def test_boolean_options_parse_or_refuse(files, name):
    """``--name false`` (a string on the command line) is False, ``--name true`` True; a typo is refused by name."""
    for text, value in (("false", False), ("False", False), ("0", False), ("true", True), ("yes", True)):
        parser = ConfigParser()
        parser.read_config(config_files("common.json", *files))
        parser[name] = text
        assert parser.get_parsed_content(f"flags#{name}") is value, (name, text)
    parser = ConfigParser()
    parser.read_config(config_files("common.json", *files))
    parser[name] = "flase"
    with pytest.raises(Exception) as e:
        parser.get_parsed_content(f"flags#{name}")
    msgs = _messages(e.value)
    assert any(f"--{name} must be true or false" in m and "'flase'" in m for m in msgs), msgs


def test_overwrite_false_refuses_and_true_replaces(tmp_path):
    p = generate_phantom(5, preset="tiny")
    (tmp_path / "in").mkdir()
    p.save(tmp_path / "in" / "ct.nii.gz", tmp_path / "lab.nii.gz")
    w = _weights(tmp_path / "w" / "liver.pt", force_class=3)
    files = config_files("common.json", "inference.json")
    out = tmp_path / "out"
    _infer(files, tmp_path / "in", out, w)
    seg = out / "ct_seg.nii.gz"
    before = seg.stat().st_mtime_ns
    with pytest.raises(Exception) as e:
        _infer(files, tmp_path / "in", out, w, overwrite="false")
    text = " | ".join(_messages(e.value))
    assert "ct_seg.nii.gz" in text and "--overwrite true" in text, text
    assert seg.stat().st_mtime_ns == before
    _infer(files, tmp_path / "in", out, w, overwrite="true")
    assert seg.stat().st_mtime_ns != before


def test_preview_uses_the_configs_hu_window(tmp_path, monkeypatch):
    """The preview turns the preprocessed image back into HU with ``hu_window`` (not a fixed +-500)."""
    import custom.preview
    from custom.case_handlers import CasePreview

    hu = np.linspace(-200.0, 300.0, 4 * 5 * 6, dtype=np.float32).reshape(1, 4, 5, 6)
    scaled = (hu - (-200.0)) / 500.0 * 2.0 - 1.0  # ScaleIntensityRanged(-200, 300 -> -1, 1)
    seen = {}

    def capture(image, label, affine, path, **kw):
        seen.update(image=image, label=label, window=kw.get("window"))

    monkeypatch.setattr(custom.preview, "save_preview", capture)
    item = {
        "case_id": "x",
        "image": MetaTensor(torch.as_tensor(scaled), affine=torch.eye(4)),
        "pred_work": torch.zeros(1, 4, 5, 6, dtype=torch.uint8),
        "pred": torch.zeros(1, 4, 5, 6, dtype=torch.uint8),
    }
    CasePreview(str(tmp_path), {"liver": 3}, hu_window=[-200, 300]).case(None, item)
    np.testing.assert_allclose(seen["image"], hu[0], atol=1e-3)
    with pytest.raises(ValueError, match="hu_window"):
        CasePreview(str(tmp_path), {"liver": 3}, hu_window=[300, -200])


def test_inference_has_the_bundle_infer_properties(tmp_path):
    """MONAI's inference properties (``bundle_root``, ``device``, ``network_def``, ``inferer``, ``dataset``,
    ``evaluator``, ``preprocessing``, ``postprocessing``, ``handlers`` ...) are present and wired into the evaluator."""
    p = generate_phantom(5, preset="tiny")
    (tmp_path / "in").mkdir()
    p.save(tmp_path / "in" / "ct.nii.gz", tmp_path / "lab.nii.gz")
    w = _weights(tmp_path / "w.pt", force_class=3)
    wf = ConfigWorkflow(
        config_file=config_files("common.json", "inference.json"),
        workflow_type="infer",
        logging_file=False,
        **NET,
        input=str(tmp_path / "in"),
        stage1_weights=str(w),
        stage2_weights=str(w),
    )
    wf.initialize()
    assert wf.check_properties() == []
    evaluator = wf.parser.get_parsed_content("evaluator")
    assert evaluator.inferer is wf.parser.get_parsed_content("inferer")
    assert evaluator.network is wf.parser.get_parsed_content("network")
    assert evaluator.data_loader.dataset is wf.parser.get_parsed_content("dataset")


def test_save_cased_is_atomic_uint8_and_never_clobbers(tmp_path):
    """``SaveCased`` (a ``SaveImaged``): ``<case>_<postfix>.nii.gz`` with the map's affine, uint8, no temporary file
    left behind; an existing file is refused by name unless ``overwrite``."""
    from custom.postprocess import SaveCased

    affine = np.diag([-0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    lab = torch.zeros(1, 6, 5, 4)
    lab[0, 2:4, 1:3, 1:3] = 7
    item = {"case_id": "c01", "pred": MetaTensor(lab, affine=torch.as_tensor(affine))}
    SaveCased("pred", output_dir=str(tmp_path), output_postfix="seg")(item)
    img = nib.load(tmp_path / "c01_seg.nii.gz")
    assert img.get_data_dtype() == np.uint8 and img.shape == (6, 5, 4)
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), lab[0].numpy().astype(np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c01_seg.nii.gz"]
    assert SaveCased("pred", output_dir=str(tmp_path)).planned_outputs("c01") == [tmp_path / "c01_seg.nii.gz"]
    item["pred"] = MetaTensor(torch.ones(1, 6, 5, 4), affine=torch.as_tensor(affine))
    with pytest.raises(FileExistsError, match="c01_seg.nii.gz"):
        SaveCased("pred", output_dir=str(tmp_path))(item)
    assert np.asarray(nib.load(tmp_path / "c01_seg.nii.gz").dataobj).max() == 7, "the first file is kept"
    SaveCased("pred", output_dir=str(tmp_path), overwrite="true")(item)
    assert np.asarray(nib.load(tmp_path / "c01_seg.nii.gz").dataobj).min() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c01_seg.nii.gz"]
    with pytest.raises(ValueError, match="one key per file name"):
        SaveCased(["pred", "c2"], output_dir=str(tmp_path))


def test_a_handler_error_fails_that_case_only(tmp_path):
    """A per-case handler that raises (here: a label of another shape) records that case as failed, by name and
    file, and the other items of the iteration are still handled."""
    from types import SimpleNamespace

    from custom.case_handlers import CaseMetrics

    gt = tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), gt)
    failures = []
    good = {
        "case_id": "good",
        "label_path": str(gt),
        "pred": torch.zeros(1, 4, 4, 4),
        "stage1": torch.zeros(1, 4, 4, 4),
    }
    bad = {**good, "case_id": "bad", "image_path": "bad.nii.gz", "pred": torch.zeros(1, 5, 4, 4)}
    engine = SimpleNamespace(
        state=SimpleNamespace(output=[bad, good, {"failed": "earlier"}], batch=[{}, {}, {}]),
        record_failure=lambda case, image, e, **_: failures.append((case, image, str(e))),
    )
    handler = CaseMetrics(str(tmp_path), {"liver": 3})
    handler(engine)
    assert len(failures) == 1 and failures[0][:2] == ("bad", "bad.nii.gz")
    assert "label shape (4, 4, 4) differs" in failures[0][2]
    assert [r["case_id"] for r in handler.metrics_rows] == ["good", "good"]  # stage 1 and stage 2 rows
    assert engine.state.output[0]["failed"] == "bad"
