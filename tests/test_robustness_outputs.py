"""Robustness of the inference outputs (issue 12, points 3, 4, 7, 9 and 10; rows 26-30 of
``bundle/docs/robustness.md``): the output folder checked before any compute, nothing of an earlier run replaced,
atomic writes, warnings kept with the case, the input's qform kept, interrupted batches resumed.

The tests marked "CLI" run the real ``python -m monai.bundle run`` with the tiny settings on one tiny phantom."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import ROOT, TINY, bundle_cli, config_files
from monai.bundle import ConfigWorkflow

from custom.errors import InputError, InputWarning
from custom.network import ValidUNet3D
from custom.outputs import atomic_write, atomic_write_json, check_output_dir, temp_name
from tools.phantom import generate_phantom

NET = {k: TINY[k] for k in ("features", "patch_size", "target_spacing")}
FILES = ["common.json", "inference.json"]


def _weights(path: Path, force_class: int = 3) -> Path:
    """A 2-feature network whose head bias makes ``force_class`` (liver) win everywhere it runs."""
    torch.manual_seed(0)
    net = ValidUNet3D(in_channels=1, out_channels=8, features=TINY["features"])
    with torch.no_grad():
        net.head.conv.bias.zero_()
        net.head.conv.bias[force_class] = 1e4
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network": net.state_dict()}, path)
    return path


def _inputs(folder: Path, names=("ct",)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        generate_phantom(5 + i, preset="tiny").save(folder / f"{n}.nii.gz", folder.parent / f"lab_{n}.nii.gz")
    return folder


def _over(inputs: Path, out, weights: Path, **kw) -> dict:
    return {
        **NET,
        "input": str(inputs),
        "output_dir": out if isinstance(out, str) else str(out),
        "stage1_weights": str(weights),
        "stage2_weights": str(weights),
        "stage2_overlap": 1,
        **kw,
    }


def _cli(over: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = bundle_cli(FILES, over)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=3000, env=env)


def _workflow(over: dict) -> ConfigWorkflow:
    wf = ConfigWorkflow(config_file=config_files(*FILES), workflow_type=None, logging_file=False, **over)
    wf.initialize()
    return wf


def _messages(e: BaseException | None) -> list[str]:
    out = []
    while e is not None:
        out.append(str(e))
        e = e.__cause__ or e.__context__
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 26. The output location is checked before any compute
# ---------------------------------------------------------------------------------------------------------------------


def test_output_dir_that_is_a_file_or_a_number_through_the_command_line(tmp_path, monkeypatch):
    """An existing file as ``--output_dir`` is refused naming the option, before any case (in this process); CLI:
    ``--output_dir 20241201`` (fire makes it an int) is a folder of that name."""
    import custom.cascade

    inputs, w = _inputs(tmp_path / "in"), _weights(tmp_path / "w.pt")
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    with monkeypatch.context() as m:
        computed = []
        m.setattr(custom.cascade.CascadeInferer, "__call__", lambda *a, **k: computed.append(1))
        with pytest.raises(Exception) as e:
            _workflow(_over(inputs, taken, w)).run()
    text = " | ".join(_messages(e.value))
    assert f"--output_dir {taken}: exists and is not a folder" in text, text
    assert computed == [], "a case was computed before the output folder was checked"
    assert taken.read_text() == "not a folder"

    res = _cli({**_over(inputs, "x", w), "output_dir": 20241201}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert nib.load(tmp_path / "20241201" / "ct_seg.nii.gz").shape == generate_phantom(5, preset="tiny").image.shape


def test_read_only_or_full_output_dir_refused_before_any_case(tmp_path, monkeypatch):
    """A folder that cannot be written (probe file refused) or whose disk has less free space than ``min_free_mb``
    is refused naming ``--output_dir``, before the first case (the free space is a monkeypatched ``disk_usage``:
    the test does not depend on the real disk)."""
    import shutil

    import custom.cascade
    import custom.outputs

    out = tmp_path / "out"
    out.mkdir()

    def denied(folder):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(custom.outputs, "_probe", denied)
        with pytest.raises(ValueError, match=r"--output_dir .*out: not writable \(Permission denied\)"):
            check_output_dir(out)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(ValueError, match=r"--output_dir .*: only 5 MB free on its disk, below the 100 MB"):
        check_output_dir(out, min_free_mb=100)
    assert check_output_dir(out, min_free_mb=1) == out
    assert sorted(out.iterdir()) == [], "the probe file is removed"
    with pytest.raises(ValueError, match="--output_dir must be a folder path"):
        check_output_dir(None)

    computed = []
    monkeypatch.setattr(custom.cascade.CascadeInferer, "__call__", lambda *a, **k: computed.append(1))
    inputs, w = _inputs(tmp_path / "in"), _weights(tmp_path / "w.pt")
    wf = _workflow(_over(inputs, tmp_path / "full", w))
    with pytest.raises(Exception) as e:
        wf.run()
    text = " | ".join(_messages(e.value))
    assert "--output_dir" in text and "MB free" in text, text
    assert computed == [] and not any((tmp_path / "full").glob("*seg*"))


# ---------------------------------------------------------------------------------------------------------------------
# 27. Nothing of an earlier run is replaced without --overwrite; every write is atomic
# ---------------------------------------------------------------------------------------------------------------------


def test_earlier_summary_is_not_replaced(tmp_path):
    """A folder holding an earlier run's ``summary.json`` (and nothing else) is refused naming it; the file is kept
    byte for byte. ``overwrite`` ``"true"`` (the text the command line passes) replaces it. In this process: the
    command line's refusal and exit code are checked by ``test_skip_existing_resumes_through_the_command_line``."""
    inputs, w = _inputs(tmp_path / "in"), _weights(tmp_path / "w.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"earlier": true}')
    stale = temp_name(out / "ct_preview.png", ".png")  # left by an earlier run killed by SIGKILL
    stale.write_bytes(b"\x89PNG partial")
    with pytest.raises(Exception) as e:
        _workflow(_over(inputs, out, w)).run()
    text = " | ".join(_messages(e.value))
    assert "summary.json" in text and "--overwrite true" in text, text
    assert (out / "summary.json").read_text() == '{"earlier": true}'
    assert not (out / "ct_seg.nii.gz").exists()
    wf = _workflow(_over(inputs, out, w, overwrite="true"))
    wf.run()
    wf.parser.get_parsed_content("evaluator").exit_if_failed()
    assert json.loads((out / "summary.json").read_text())["succeeded"] == 1
    assert not stale.exists(), "the killed run's temporary file is removed"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_run_level_files_are_planned_outputs():
    from custom.case_handlers import CaseMetrics, CaseSummary

    assert CaseSummary("o").planned_run_outputs() == [Path("o/summary.json")]
    assert CaseMetrics("o", {"liver": 3}).planned_run_outputs() == [Path("o/metrics.csv"), Path("o/c2_recall_fpr.csv")]


@pytest.mark.parametrize("error", [RuntimeError("disk"), KeyboardInterrupt(), SystemExit(143)])
def test_atomic_write_leaves_neither_a_truncated_file_nor_a_temporary_one(tmp_path, error):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(type(error)):
        with atomic_write(target) as tmp:
            Path(tmp).write_text("half")
            raise error
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(FileExistsError, match="summary.json: file exists; pass --overwrite true"):
        atomic_write_json(target, {"a": 2}, overwrite=False)


def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path):
    """SIGTERM while the evaluator runs (``_sigterm_as_exit``) ends the write like Ctrl-C: exit 143, no temporary
    file left beside the output (issue 12: a hidden temporary file stayed after SIGTERM)."""
    import signal

    script = (
        "import pathlib, sys, time\n"
        "from custom.evaluator import _sigterm_as_exit\n"
        "from custom.outputs import atomic_write\n"
        "with _sigterm_as_exit():\n"
        "    with atomic_write(sys.argv[1]) as tmp:\n"
        "        pathlib.Path(tmp).write_text('half')\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "summary.json")], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert len(list(tmp_path.iterdir())) == 1  # the temporary file, being written
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=3000) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert list(tmp_path.iterdir()) == []


def test_preview_interrupted_by_ctrl_c_leaves_no_truncated_png(tmp_path, monkeypatch):
    """The preview of issue 12 was left truncated at 33 bytes after Ctrl-C: now neither it nor a temporary file."""
    from monai.data import MetaTensor

    import custom.preview
    from custom.case_handlers import CasePreview

    def interrupted(hu, lab, affine, path, **kw):
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 25)  # 33 bytes, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(custom.preview, "save_preview", interrupted)
    image = MetaTensor(torch.zeros(1, 4, 4, 4), affine=torch.eye(4))
    with pytest.raises(KeyboardInterrupt):
        CasePreview(str(tmp_path), {"liver": 3}).case(None, {"case_id": "c", "image": image, "pred": image})
    assert list(tmp_path.iterdir()) == []


def test_every_output_writer_of_custom_uses_the_atomic_helper():
    """No writer in ``custom/`` writes an output file directly (``write_text``, ``open(..., "w")``, ``.tmp``
    renames of its own): they go through ``custom.outputs.atomic_write``."""
    import re

    offenders = []
    for name in ("cascade.py", "case_handlers.py", "postprocess.py", "evaluate.py", "preview.py", "data.py"):
        text = (ROOT / "custom" / name).read_text()
        for pattern in (r"\.write_text\(", r"open\([^)]*[\"']w", r"\.tmp[\"']", r"os\.replace\(", r"\.replace\(path\)"):
            offenders += [f"{name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


def test_every_writer_of_tools_uses_the_atomic_helper():
    """The zoo export and the phantom datasets write through ``custom.outputs`` too: no ``write_text`` or
    ``open(.., "w")`` of their own, and ``nib.save``/``torch.save`` only into the helper's temporary file (``tmp``) or
    file object (``f``). The export's moves of a finished staging folder into place (``os.replace``) are not writes."""
    import re

    files = [ROOT / "tools" / "export.py", *sorted((ROOT / "tools" / "phantom").glob("*.py"))]
    offenders = []
    for path in files:
        text = path.read_text()
        if path.name == "export.py":  # the zoo's unit test it generates runs in the zoo, without this bundle's code
            text = re.sub(r"UNIT_TEST = \'\'\'.*?\'\'\'", "", text, flags=re.S)
        for pattern in (
            r"\.write_text\(",
            r"\.write_bytes\(",
            r"open\([^)]*[\"']w",
            r"(nib|torch)\.save\((?![^)]*\b(tmp|f)\)\)?)",
        ):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []
    assert "atomic_write" in (ROOT / "tools" / "phantom" / "generate.py").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# 28. Warnings that matter go into the QC JSON and the summary; 29. the input's qform and sform are kept
# ---------------------------------------------------------------------------------------------------------------------


def test_warnings_and_input_header_are_kept_with_the_case(tmp_path):
    """A NIfTI whose qform disagrees with its sform (codes 1 and 2), read in a DataLoader worker: the warning is in
    the case's QC JSON and in the summary; the QC JSON keeps both matrices and codes; the written segmentation keeps
    the input's qform and codes. A case with no air (C1 covers everything) and whose output is empty is flagged."""
    p = generate_phantom(5, preset="tiny")
    inputs = tmp_path / "in"
    inputs.mkdir()
    qform = p.affine.copy()
    qform[:3, 3] += [5.0, 0.0, 0.0]  # 5 mm apart
    img = nib.Nifti1Image(p.image.astype(np.int16), p.affine)
    img.set_sform(p.affine, code=2)
    img.set_qform(qform, code=1)
    nib.save(img, inputs / "ct.nii.gz")
    full = np.full(p.image.shape, 40, np.int16)  # soft tissue everywhere, no air: C1 is the whole volume
    full[0, 0, 0] = -1000
    nib.save(nib.Nifti1Image(full, p.affine), inputs / "nobody.nii.gz")
    w = _weights(tmp_path / "w.pt", force_class=0)  # background everywhere: the outputs are empty
    wf = _workflow(_over(inputs, tmp_path / "out", w, inference_workers=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        wf.run()
    out = tmp_path / "out"
    qc = json.loads((out / "ct_qc.json").read_text())
    assert any("qform and sform disagree" in m and "ct.nii.gz" in m for m in qc["warnings"]), qc["warnings"]
    assert "the output is empty: no organ voxel was segmented" in qc["warnings"]
    assert qc["input_qform_code"] == 1 and qc["input_sform_code"] == 2
    np.testing.assert_allclose(qc["input_qform"], qform, atol=1e-4)
    np.testing.assert_allclose(qc["input_sform"], p.affine, atol=1e-4)
    seg = nib.load(out / "ct_seg.nii.gz").header
    assert int(seg["qform_code"]) == 1 and int(seg["sform_code"]) == 2
    np.testing.assert_allclose(seg.get_qform(), qform, atol=1e-4)
    np.testing.assert_allclose(seg.get_sform(), p.affine, atol=1e-4)
    qc2 = json.loads((out / "nobody_qc.json").read_text())
    assert any("C1 (the body mask) covers" in m for m in qc2["warnings"]), qc2["warnings"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warnings"]["ct"] == qc["warnings"] and summary["warnings"]["nobody"] == qc2["warnings"]


def test_planned_outputs_stay_inside_output_dir(tmp_path):
    from custom.case_handlers import CasePreview, CaseQC
    from custom.postprocess import SaveCased

    for part in (
        SaveCased("pred", output_dir=str(tmp_path)),
        CaseQC(str(tmp_path), {}),
        CasePreview(str(tmp_path), {}),
    ):
        assert part.planned_outputs("c1")[0].parent == tmp_path
        for bad in ("../escape", "a/b", ".."):
            with pytest.raises(InputError, match="case id"):
                part.planned_outputs(bad)
    (tmp_path / "c9_seg.nii.gz").symlink_to(tmp_path.parent / "elsewhere.nii.gz")
    with pytest.raises(InputError, match="outside the output folder"):
        SaveCased("pred", output_dir=str(tmp_path)).planned_outputs("c9")


# ---------------------------------------------------------------------------------------------------------------------
# 30. Interrupted runs go on: --skip_existing true; a failed preview makes the case partial, not failed
# ---------------------------------------------------------------------------------------------------------------------


def test_skip_existing_resumes_through_the_command_line(tmp_path):
    """CLI: after a run over two cases (in this process), one case's preview is gone (an interrupted run): the
    command line refuses the folder naming ``--skip_existing true``, which then segments only that case (replacing
    its left-over files), leaves the complete one untouched, and the summary lists the skipped case."""
    inputs, w = _inputs(tmp_path / "in", ("a", "b")), _weights(tmp_path / "w.pt")
    out = tmp_path / "out"
    wf = _workflow(_over(inputs, out, w))
    wf.run()
    wf.parser.get_parsed_content("evaluator").exit_if_failed()
    (out / "b_preview.png").unlink()
    a_time, b_time = (out / "a_seg.nii.gz").stat().st_mtime_ns, (out / "b_seg.nii.gz").stat().st_mtime_ns
    res = _cli(_over(inputs, out, w))
    assert res.returncode != 0 and "--skip_existing true" in res.stderr, res.stderr[-3000:]
    res = _cli(_over(inputs, out, w, skip_existing="true"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "b_preview.png").stat().st_size > 100
    assert (out / "a_seg.nii.gz").stat().st_mtime_ns == a_time, "the complete case is not recomputed"
    assert (out / "b_seg.nii.gz").stat().st_mtime_ns != b_time, "the incomplete case is"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == ["a"] and summary["succeeded"] == 1 and summary["failed"] == [], summary
    with pytest.raises(Exception) as e:  # the text the command line passes, in this process
        _workflow(_over(inputs, out, w, skip_existing="maybe")).run()
    assert "--skip_existing must be true or false" in " | ".join(_messages(e.value))


def test_failed_preview_is_partial_not_failed(tmp_path, monkeypatch):
    """The segmentation was written, the preview raised: the case is "partial" with the preview named, the run
    exits non-zero, and ``--skip_existing true`` then completes it."""
    import custom.preview

    real = custom.preview.save_preview
    inputs, w = _inputs(tmp_path / "in"), _weights(tmp_path / "w.pt")
    out = tmp_path / "out"

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(custom.preview, "save_preview", broken)
    wf = _workflow(_over(inputs, out, w))
    wf.run()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [] and summary["succeeded"] == 0, summary
    [part] = summary["partial"]
    assert part["case_id"] == "ct" and part["failed_files"] == [str(out / "ct_preview.png")]
    assert str(out / "ct_seg.nii.gz") in part["written"] and "No space left on device" in part["error"]
    with pytest.raises(SystemExit):
        wf.parser.get_parsed_content("evaluator").exit_if_failed()
    monkeypatch.setattr(custom.preview, "save_preview", real)
    wf = _workflow(_over(inputs, out, w, skip_existing=True))
    wf.run()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partial"] == [] and summary["succeeded"] == 1 and (out / "ct_preview.png").exists()
    seg_time = (out / "ct_seg.nii.gz").stat().st_mtime_ns
    _workflow(_over(inputs, out, w, skip_existing="True")).run()  # nothing left: no case runs, the summary says so
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == ["ct"] and summary["cases"] == 1 and summary["succeeded"] == 0, summary
    assert (out / "ct_seg.nii.gz").stat().st_mtime_ns == seg_time
