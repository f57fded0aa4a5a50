"""Model-zoo readiness: metadata against the zoo's schema, config paths, the exported folder, and the zoo's checks
(``verify_metadata``, ``verify_net_in_out``, ``ckpt_export``) plus a ``ConfigWorkflow`` inference run on the export,
from another working directory with only the export on ``PYTHONPATH``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from bundle_utils import CONFIGS, ROOT, TINY
from parameterized import parameterized

from custom.checkpoint import verify_checksums, write_checksums
from custom.export import BUNDLE_NAME, MAX_FILE_BYTES, config_path_problems, export_bundle
from custom.network import ValidUNet3D, is_valid_size, output_size
from custom.phantom import generate_phantom

SCHEMA = ROOT / "tests" / "data" / "meta_schema_20240725.json"
SHARED_SCHEMA = ROOT.parent / "shared" / "schema" / "meta_schema_20240725.json"
META = json.loads((CONFIGS / "metadata.json").read_text())
COMMON = json.loads((CONFIGS / "common.json").read_text())
FORMATS = sorted(k for k in META if k.endswith("network_data_format"))


def _random_weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = ValidUNet3D(in_channels=1, out_channels=len(COMMON["labels"]) + 1, features=TINY["features"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d):
            torch.nn.init.kaiming_normal_(m.weight)  # the default init hides the deep path
    torch.save({"network": net.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_bundle(out=str(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    files = {f"stage{k}": _random_weights(folder / f"w{k}.pt", seed=k) for k in (1, 2)}
    write_checksums(folder)  # so that inference configs may ask for sha256 "auto"
    return files


def _source_copy(tmp_path: Path) -> Path:
    """A checkout-like source folder (bundle/configs, custom/, LICENSE) to export from, free to modify."""
    src = tmp_path / "src"
    shutil.copytree(CONFIGS, src / "bundle" / "configs")
    shutil.copytree(ROOT / "custom", src / "custom", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "LICENSE", src / "LICENSE")
    return src


def _run_elsewhere(script: str, export: Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` from ``cwd`` with only ``export`` on PYTHONPATH (the repo is installed editable: it must lose)."""
    env = {**os.environ, "PYTHONPATH": str(export)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------------------------------------------------
# metadata


def test_metadata_validates_against_the_zoo_schema():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(META, schema)
    assert META["schema"].endswith("/" + SCHEMA.name)
    broken = {k: v for k, v in META.items() if k != "network_data_format"}
    with pytest.raises(jsonschema.ValidationError, match="network_data_format"):
        jsonschema.validate(broken, schema)


def test_schema_copy_equals_the_shared_one():
    if not SHARED_SCHEMA.is_file():
        pytest.skip(f"no shared schema at {SHARED_SCHEMA}")
    assert json.loads(SCHEMA.read_text()) == json.loads(SHARED_SCHEMA.read_text())


def test_version_is_semver_with_a_changelog_entry():
    assert re.fullmatch(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?", META["version"])
    assert META["version"] in META["changelog"] and META["changelog"][META["version"]].strip()


@parameterized.expand([(f,) for f in ("network_data_format", "stage1_network_data_format")])
def test_channel_def_names_equal_the_labels(fmt):
    assert fmt in FORMATS
    out = META[fmt]["outputs"]["pred"]
    expected = {"0": "background", **{str(v): k for k, v in COMMON["labels"].items()}}
    assert out["channel_def"] == expected
    assert out["num_channels"] == len(COMMON["labels"]) + 1
    assert META[fmt]["inputs"]["image"]["num_channels"] == COMMON["network_def"]["in_channels"]


@parameterized.expand([(f,) for f in ("network_data_format", "stage1_network_data_format")])
def test_spatial_shapes_are_valid_for_every_n_including_the_zoo_default(fmt):
    from monai.bundle.scripts import _get_fake_spatial_shape

    ins, outs = (META[fmt][k][n]["spatial_shape"] for k, n in (("inputs", "image"), ("outputs", "pred")))
    for n in range(1, 7):  # the zoo's CI calls verify_net_in_out without --n, i.e. n = 1
        sin, sout = _get_fake_spatial_shape(ins, n=n), _get_fake_spatial_shape(outs, n=n)
        assert all(is_valid_size(s) for s in sin), (n, sin)
        assert sout == tuple(output_size(s) for s in sin)


# --------------------------------------------------------------------------------------------------------------------
# config paths

PATH_CASES = [
    ("absolute_dir", "train.json", {"output_dir": "/home/me/runs"}, "absolute path '/home/me/runs'"),
    ("absolute_in_expr", "train.json", {"x": "$torch.load('/data/w.pt')"}, "absolute path '/data/w.pt'"),
    ("unanchored_join", "inference.json", {"w": "$os.path.join('models', 'a.pt')"}, "neither built from @bundle_root"),
    ("unanchored_plain", "inference.json", {"stage1_weights": "models/stage1.pt"}, "neither built from @bundle_root"),
    ("bundle_root_elsewhere", "inference.json", {"bundle_root": "."}, "only be set in common.json"),
    ("anchored", "inference.json", {"w": "$os.path.join(@bundle_root, 'models', 'a.pt')"}, None),
    ("user_input", "train.json", {"dataset_dir": "data/phantoms", "out": "$os.path.join('runs', @x)"}, None),
    ("not_paths", "train.json", {"mode": "bilinear", "a": {"_target_": "custom.x.Y", "m": "RAS"}}, None),
]


def config_path_problems_for(files: dict[str, dict]) -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        for name, cfg in files.items():
            (Path(d) / name).write_text(json.dumps(cfg))
        return config_path_problems(d)


@parameterized.expand(PATH_CASES)
def test_config_path_problems(_, filename, config, expected):
    assert config_path_problems(CONFIGS) == []  # the real configs
    problems = config_path_problems_for({filename: config})
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0] and problems[0].startswith(filename), problems


# --------------------------------------------------------------------------------------------------------------------
# the exported folder


def test_export_layout(exported):
    assert exported.name == BUNDLE_NAME
    assert {p.name for p in exported.iterdir()} == {"configs", "models", "docs", "custom", "LICENSE", "large_files.yml"}
    # configs: identical except bundle_root, which is "." (the zoo's convention)
    for path in CONFIGS.iterdir():
        out = exported / "configs" / path.name
        if path.name == "common.json":
            assert json.loads(out.read_text()) == {**COMMON, "bundle_root": "."}
        else:
            assert out.read_bytes() == path.read_bytes(), path.name
    assert {p.name for p in (exported / "configs").iterdir()} == {p.name for p in CONFIGS.iterdir()}
    # the package is copied inside the bundle, source files identical, nothing else
    repo_py = sorted(p.name for p in (ROOT / "custom").glob("*.py"))
    assert sorted(p.name for p in (exported / "custom").iterdir()) == repo_py
    for name in repo_py:
        assert (exported / "custom" / name).read_bytes() == (ROOT / "custom" / name).read_bytes(), name
    everything = [p.relative_to(exported).as_posix() for p in exported.rglob("*")]
    assert not [p for p in everything if re.search(r"__pycache__|\.pyc$|(^|/)tests?(/|$)|(^|/)data(/|$)|/\.", p)]
    assert all(p.stat().st_size <= MAX_FILE_BYTES for p in exported.rglob("*") if p.is_file())
    assert (exported / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert "Apache License" in (exported / "LICENSE").read_text()[:200]
    assert (exported / "docs" / "README.md").is_file()
    assert yaml.safe_load((exported / "large_files.yml").read_text()) == {"large_files": []}
    # shipped weights (when the lead has put them in bundle/models) travel with checksums
    shipped = sorted(p.name for p in (ROOT / "bundle" / "models").glob("*.pt"))
    models = sorted(p.name for p in (exported / "models").iterdir())
    assert models == (sorted([*shipped, "checksums.json"]) if shipped else [])


def test_repository_large_files_yml_is_in_the_zoo_format():
    entries = yaml.safe_load((ROOT / "bundle" / "large_files.yml").read_text())["large_files"]
    for e in entries:
        assert set(e) == {"path", "url", "hash_val", "hash_type"} and (ROOT / "bundle" / e["path"]).is_file()


def test_export_refuses_to_overwrite_unless_asked(tmp_path):
    dest = export_bundle(out=str(tmp_path))
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_bundle(out=str(tmp_path))
    (dest / "stale.txt").write_text("x")
    assert export_bundle(out=str(tmp_path), overwrite=True) == dest
    assert not (dest / "stale.txt").exists() and (dest / "custom" / "export.py").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [BUNDLE_NAME]  # no temporary folder left behind
    other = tmp_path / "other"
    (other / BUNDLE_NAME).mkdir(parents=True)
    (other / BUNDLE_NAME / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a bundle export"):
        export_bundle(out=str(other), overwrite=True)
    assert (other / BUNDLE_NAME / "notes.txt").read_text() == "mine"


def test_export_ships_weights_with_checksums_and_lists_large_files(tmp_path, weights):
    src = _source_copy(tmp_path)
    models = src / "bundle" / "models"
    (models / "__pycache__").mkdir(parents=True)
    (models / "__pycache__" / "junk.pyc").write_bytes(b"x")
    (src / "custom" / "__pycache__").mkdir()
    (src / "custom" / "__pycache__" / "stale.cpython-311.pyc").write_bytes(b"x")
    for stage, w in weights.items():
        shutil.copy2(w, models / f"{stage}.pt")
    size = (models / "stage1.pt").stat().st_size
    dest = export_bundle(
        out=str(tmp_path / "out"), source=str(src), max_file_bytes=size - 1, large_file_url="https://x.org/r/"
    )
    assert sorted(p.name for p in (dest / "models").iterdir()) == ["checksums.json", "stage1.pt", "stage2.pt"]
    assert not list(dest.rglob("__pycache__")) and not list(dest.rglob("*.pyc"))
    assert set(verify_checksums(dest / "models")) == {"stage1.pt", "stage2.pt"}
    listed = yaml.safe_load((dest / "large_files.yml").read_text())["large_files"]
    assert [e["path"] for e in listed] == ["models/stage1.pt", "models/stage2.pt"]
    for e in listed:
        assert e["hash_type"] == "sha256" and e["url"] == "https://x.org/r/" + e["path"]
        assert e["hash_val"] == hashlib.sha256((dest / e["path"]).read_bytes()).hexdigest()


def test_export_refuses_configs_with_paths_that_break_when_moved(tmp_path):
    src = _source_copy(tmp_path)
    inf = src / "bundle" / "configs" / "inference.json"
    cfg = json.loads(inf.read_text())
    cfg["stage1_weights"] = "/home/someone/stage1.pt"
    inf.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"inference.json: stage1_weights: absolute path"):
        export_bundle(out=str(tmp_path / "out"), source=str(src))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------------------------------------------------
# the zoo's checks and a zoo-style inference run, from another directory with only the export on PYTHONPATH


ELSEWHERE_SCRIPT = """
    import json, sys, traceback
    from pathlib import Path

    args = json.loads(sys.argv[1])
    export = Path(args["export"]).resolve()
    import custom

    results = {"custom_file": custom.__file__}
    try:  # the zoo's CLI checks, both stages, then a bundle whose stage-1 metadata is wrong
        from custom.export import verify_bundle

        kw = dict(args["verify"], in_process=True)
        results["passed"] = verify_bundle(str(export), **kw)
        try:
            verify_bundle(args["bad"], **kw)
            results["bad"] = "no error"
        except RuntimeError as e:
            results["bad"] = str(e).splitlines()[0]
    except Exception:
        results["verify_error"] = traceback.format_exc()
    try:  # a zoo-style unit test: ConfigWorkflow on the exported inference config
        from monai.bundle import ConfigWorkflow

        configs = [str(export / "configs" / f) for f in ("common.json", "inference.json")]
        wf = ConfigWorkflow(config_file=configs, workflow_type="infer", **args["workflow"])
        wf.initialize()
        results["missing_properties"] = wf.check_properties()
        wf.run()
        wf.finalize()
    except Exception:
        results["workflow_error"] = traceback.format_exc()
    print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def elsewhere(exported, weights, tmp_path_factory) -> dict:
    """One interpreter, started in a scratch directory with only the export on PYTHONPATH, runs the zoo's checks and
    the inference workflow (one start instead of two: importing torch and MONAI is most of the time)."""
    tmp = tmp_path_factory.mktemp("elsewhere")
    bad = shutil.copytree(exported, tmp / "bad" / BUNDLE_NAME)
    meta = json.loads((bad / "configs" / "metadata.json").read_text())
    meta["stage1_network_data_format"]["outputs"]["pred"]["num_channels"] = 5  # stage 1 only: must be caught
    (bad / "configs" / "metadata.json").write_text(json.dumps(meta))
    phantom = generate_phantom(3, preset="tiny", orientation="LPS")
    image = tmp / "in" / "case_a.nii.gz"
    image.parent.mkdir()
    phantom.save(image, tmp / "label.nii.gz")
    cwd = tmp / "cwd"
    cwd.mkdir()
    tiny = {k: TINY[k] for k in ("features", "patch_size", "target_spacing")}
    args = {
        "export": str(exported),
        "bad": str(bad),
        "verify": {
            "schema": str(SCHEMA),
            "stage1_weights": str(weights["stage1"]),
            "stage2_weights": str(weights["stage2"]),
            "features": TINY["features"],
        },
        "workflow": {
            **tiny,
            "bundle_root": str(exported),
            "stage1_weights": str(weights["stage1"]),
            "stage2_weights": str(weights["stage2"]),
            "input": str(image.parent),
            "output_dir": str(tmp / "out"),
            "save_outputs": [],
        },
    }
    env = {**os.environ, "PYTHONPATH": str(exported)}  # the repo is installed editable: the export must win
    cmd = [sys.executable, "-c", textwrap.dedent(ELSEWHERE_SCRIPT), json.dumps(args)]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert res.returncode == 0 and line, res.stdout[-3000:] + res.stderr[-5000:]
    results = json.loads(line[len("RESULTS ") :])
    return {**results, "cwd": cwd, "image": image, "out": tmp / "out", "log": res.stderr[-5000:]}


def test_custom_is_imported_from_the_export(elsewhere, exported):
    assert Path(elsewhere["custom_file"]).resolve().is_relative_to(exported.resolve()), elsewhere["custom_file"]


def test_zoo_checks_pass_on_the_export_for_both_stages(elsewhere):
    assert "verify_error" not in elsewhere, elsewhere["verify_error"]
    passed = elsewhere["passed"]
    for check in ("verify_metadata", "verify_net_in_out stage2", "verify_net_in_out stage1"):
        assert check in passed, passed
    for stage in ("stage1", "stage2"):
        assert f"ckpt_export {stage}" in passed
        assert any(p.startswith(f"torchscript {stage} (max diff") for p in passed), passed
    # the stage-1 check reads stage1_network_data_format: a wrong entry there (and only there) fails it
    assert "verify_net_in_out stage1" in elsewhere["bad"] and "output channel number" in elsewhere["bad"]
    assert not list(elsewhere["cwd"].iterdir())  # the checks write into their scratch folder only


def test_config_workflow_inference_on_the_export(elsewhere):
    assert "workflow_error" not in elsewhere, elsewhere["workflow_error"] + elsewhere["log"]
    assert not elsewhere["missing_properties"]
    seg, src = nib.load(str(elsewhere["out"] / "case_a_seg.nii.gz")), nib.load(str(elsewhere["image"]))
    assert seg.shape == src.shape
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
    values = np.unique(np.asarray(seg.dataobj))
    assert set(values.tolist()) <= set(range(len(COMMON["labels"]) + 1)) and values.size > 1
