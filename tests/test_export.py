"""The model-zoo export: metadata against the zoo's schema, config paths, flattening, the exported folder, and the
zoo CI's own calls made on it (``scripts/zoo_ci.py``: directory, ``verify_metadata``, ``verify_net_in_out`` and
``ckpt_export`` on ``configs/inference.json`` alone with ``models/model.pt`` loaded without a key, its unit-test
runner, its pre-commit and code-format tools), then the zoo user's one-file inference command from another working
directory, compared voxel for voxel with the repository's composed command."""

from __future__ import annotations

import ast
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
from bundle_utils import CONFIGS, ROOT, SUBPROCESS_TIMEOUT
from conftest import SHARED
from monai.bundle import ConfigParser
from parameterized import parameterized

from custom.network import is_valid_size, output_size
from tools.export import (
    BUNDLE_NAME,
    MAX_FILE_BYTES,
    config_path_problems,
    export_bundle,
    flatten_config,
    imported_tool_modules,
    runtime_modules,
    verify_bundle,
)
from tools.phantom import generate_phantom

SCHEMA = ROOT / "tests" / "data" / "meta_schema_20240725.json"
SHARED_SCHEMA = SHARED / "schema" / "meta_schema_20240725.json"
META = json.loads((CONFIGS / "metadata.json").read_text())
COMMON = json.loads((CONFIGS / "common.json").read_text())
DEMO = json.loads((CONFIGS / "demo.json").read_text())
FORMATS = sorted(k for k in META if k.endswith("network_data_format"))
ZOO_CI = ROOT / "scripts" / "zoo_ci.py"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The export with the repository's shipped weights: ``<root>/models/cascaded_3d_fcn``."""
    return export_bundle(out=str(tmp_path_factory.mktemp("export") / "export"))


@pytest.fixture(scope="module")
def exported_pr(tmp_path_factory) -> Path:
    """The pull-request form: the weights listed in large_files.yml and written to upload/."""
    out = tmp_path_factory.mktemp("export_pr") / "export"
    return export_bundle(out=str(out), zoo_pr=True, large_file_url="https://example.org/cascaded_3d_fcn/v1")


def _source_copy(tmp_path: Path) -> Path:
    """A checkout-like source folder (bundle/, custom/, LICENSE) to export from, free to modify."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "bundle", src / "bundle", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "custom", src / "custom", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "LICENSE", src / "LICENSE")
    return src


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
# flattening and the code closure


def test_flatten_is_monais_merge_and_the_overlay_sets_only_existing_keys(tmp_path):
    (tmp_path / "common.json").write_text(json.dumps({"a": 1, "b": {"x": 1, "z": 0}, "imports": ["$import os"]}))
    (tmp_path / "wf.json").write_text(json.dumps({"b": {"y": 2}, "run": "$@b"}))
    (tmp_path / "over.json").write_text(json.dumps({"a": 5, "b#y": 3, "optimizer": {"lr": 1}}))
    assert flatten_config(tmp_path, "wf.json") == {"a": 1, "b": {"y": 2}, "imports": ["$import os"], "run": "$@b"}
    got = flatten_config(tmp_path, "wf.json", overlay="over.json")
    assert got == {"a": 5, "b": {"y": 3}, "imports": ["$import os"], "run": "$@b"}  # no "optimizer"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        flatten_config(tmp_path, "missing.json")


@parameterized.expand([("inference.json",), ("train.json",)])
def test_flatten_of_the_real_configs_equals_the_composed_parse(workflow):
    composed = ConfigParser.load_config_files([str(CONFIGS / f) for f in ("common.json", workflow, "demo.json")])
    flat = flatten_config(CONFIGS, workflow, overlay="demo.json")
    for key in set(composed) | set(flat):  # the composed form adds demo keys the workflow lacks; nothing else differs
        if key in flat:
            assert flat[key] == composed[key], key
        else:
            assert key in DEMO and key not in COMMON, key
    assert flat["features"] == DEMO["features"] != COMMON["features"]


def test_runtime_modules_follow_imports_at_any_depth(tmp_path):
    pkg = tmp_path / "custom"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from custom.b import g\n    return g\n")
    (pkg / "b.py").write_text("from custom import c\nimport custom.e as e\n")
    (pkg / "c.py").write_text("from . import d\n")
    (pkg / "d.py").write_text("import os\n")
    (pkg / "e.py").write_text("")
    (pkg / "unused.py").write_text("import custom.phantom\n")
    cfg = {"x": {"_target_": "custom.a.f"}, "y": ["$custom.d.os.sep"]}
    assert runtime_modules([cfg], pkg) == ["__init__.py", "a.py", "b.py", "c.py", "d.py", "e.py"]
    with pytest.raises(FileNotFoundError, match=r"custom\.nothere"):
        runtime_modules([{"t": {"_target_": "custom.nothere.X"}}], pkg)
    (pkg / "e.py").write_text("def f():\n    from tools.phantom import generate_phantom\n")  # a tool, at any depth
    with pytest.raises(ImportError, match=r"e\.py ships in the bundle but imports \['tools\.phantom'\]"):
        runtime_modules([cfg], pkg)


def test_no_runtime_module_imports_a_tool():
    """``custom/`` is what ships; ``tools/`` (phantoms, demo, export) stays in the repository."""
    runtime = sorted((ROOT / "custom").glob("*.py"))
    assert {p.name for p in runtime} >= {"__init__.py", "network.py", "inferer.py"}
    assert {p.relative_to(ROOT).as_posix(): imported_tool_modules(p) for p in runtime if imported_tool_modules(p)} == {}
    assert imported_tool_modules(ROOT / "tools" / "demo.py") == {"tools.phantom"}  # the scan sees tool imports
    assert not {"phantom.py", "demo.py", "export.py"} & {p.name for p in runtime}


# --------------------------------------------------------------------------------------------------------------------
# the exported folder


def _state_dict(path: Path) -> dict:
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    return ckpt["network"] if "network" in ckpt else ckpt


def test_export_layout(exported):
    root = exported.parents[1]
    assert exported == root / "models" / BUNDLE_NAME
    assert {p.name for p in root.iterdir()} == {"models", "ci"}
    assert {p.name for p in exported.iterdir()} == {"configs", "models", "docs", "custom", "LICENSE"}  # < 25 MB
    assert (root / "ci" / "unit_tests" / f"test_{BUNDLE_NAME}.py").is_file()
    # configs: every repository config; inference.json and train.json self-contained (common.json + demo.json values)
    assert {p.name for p in (exported / "configs").iterdir()} == {p.name for p in CONFIGS.iterdir()}
    for workflow in ("inference.json", "train.json"):
        cfg = json.loads((exported / "configs" / workflow).read_text())
        expected = flatten_config(CONFIGS, workflow, overlay="demo.json")
        assert set(cfg) == set(expected) and {"network_def", "labels", "preprocessing_transforms"} <= set(cfg)
        assert cfg["bundle_root"] == "." and cfg["features"] == DEMO["features"]
    for path in (exported / "configs").glob("*.json"):
        assert "stage2.pt" not in path.read_text(), path.name  # renamed to the zoo's models/model.pt
    inference = ConfigParser(json.loads((exported / "configs" / "inference.json").read_text()))
    inference["bundle_root"] = str(exported)
    assert Path(inference.get_parsed_content("stage2_weights")) == exported / "models" / "model.pt"
    assert Path(inference.get_parsed_content("stage1_weights")) == exported / "models" / "stage1.pt"
    # weights: plain state_dicts (torch.load, no key) equal to the repository's checkpoints
    assert {p.name for p in (exported / "models").iterdir()} == {"model.pt", "stage1.pt", "checksums.json"}
    for exported_name, repo_name in (("model.pt", "stage2.pt"), ("stage1.pt", "stage1.pt")):
        sd = torch.load(str(exported / "models" / exported_name), map_location="cpu", weights_only=True)
        assert all(torch.is_tensor(v) for v in sd.values())
        repo = _state_dict(ROOT / "bundle" / "models" / repo_name)
        assert sd.keys() == repo.keys() and all(torch.equal(sd[k], repo[k]) for k in sd)
    listing = json.loads((exported / "models" / "checksums.json").read_text())["files"]
    for f, entry in listing.items():
        assert entry["sha256"] == hashlib.sha256((exported / "models" / f).read_bytes()).hexdigest()
    # code: exactly the modules the configs import, transitively; no tool
    shipped = sorted(p.name for p in (exported / "custom").iterdir())
    configs = [json.loads(p.read_text()) for p in (exported / "configs").glob("*.json") if p.name != "metadata.json"]
    assert shipped == runtime_modules(configs, ROOT / "custom")
    assert (
        {"network.py", "inferer.py", "checkpoint.py"} <= set(shipped) <= {p.name for p in (ROOT / "custom").glob("*")}
    )
    assert not [f.name for f in (exported / "custom").glob("*.py") if imported_tool_modules(f)]
    assert not [p for p in exported.rglob("*") if p.name in ("tools", "phantom", "demo.py", "export.py")]
    for f in (exported / "custom").glob("*.py"):  # the zoo's CI runs Python 3.10
        ast.parse(f.read_text(), filename=str(f), feature_version=(3, 10))
    everything = [p.relative_to(exported).as_posix() for p in exported.rglob("*")]
    assert not [p for p in everything if re.search(r"__pycache__|\.pyc$|(^|/)tests?(/|$)|/\.", p)]
    assert all(p.stat().st_size <= MAX_FILE_BYTES for p in exported.rglob("*") if p.is_file())
    assert (exported / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert (exported / "docs" / "README.md").read_text() == (ROOT / "bundle" / "docs" / "README.md").read_text()
    assert json.loads((exported / "configs" / "metadata.json").read_text()) == META


def test_zoo_pr_form_lists_the_weights_in_large_files_yml(exported_pr):
    root = exported_pr.parents[1]
    assert not list((exported_pr / "models").glob("*.pt"))  # not committed to the zoo: uploaded
    assert sorted(p.name for p in (root / "upload").iterdir()) == ["model.pt", "stage1.pt"]
    listed = yaml.safe_load((exported_pr / "large_files.yml").read_text())["large_files"]
    assert [e["path"] for e in listed] == ["models/model.pt", "models/stage1.pt"]
    for e in listed:
        assert set(e) == {"path", "url", "hash_val", "hash_type"} and e["hash_type"] == "sha256"
        upload = root / "upload" / Path(e["path"]).name
        assert e["hash_val"] == hashlib.sha256(upload.read_bytes()).hexdigest()
        assert e["url"] == "https://example.org/cascaded_3d_fcn/v1/" + upload.name


def test_export_refuses_weights_that_do_not_fit_the_exported_network(tmp_path):
    # the shipped weights are 8 features (demo.json); without the overlay the exported network_def has 32
    with pytest.raises(ValueError, match=r"stage2\.pt does not fit network_def .*no overlay.*size mismatch"):
        export_bundle(out=str(tmp_path / "out"), overlay="none")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_export_refuses_to_overwrite_unless_asked(tmp_path):
    dest = export_bundle(out=str(tmp_path / "e"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_bundle(out=str(tmp_path / "e"))
    (dest / "stale.txt").write_text("x")
    assert export_bundle(out=str(tmp_path / "e"), overwrite=True) == dest
    assert not (dest / "stale.txt").exists() and (dest / "models" / "model.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["ci", "models"]  # no temporary folder left
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no bundle export"):
        export_bundle(out=str(other), overwrite=True)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


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
# the zoo's CI, made as ci/verify_bundle.py and ci/unit_tests/runner.py make it


def test_zoo_ci_passes_on_the_pull_request_form(exported_pr):
    passed = verify_bundle(str(exported_pr.parents[1]), schema=str(SCHEMA), unit_test=True)
    zoo = ["directory", "version", "verify_metadata", "verify_net_in_out", "ckpt_export"]
    assert passed[:5] == zoo, passed
    assert "verify_net_in_out stage1_network_data_format" in passed
    assert "ckpt_export stage1_network_data_format" in passed
    assert any(p.startswith("torchscript network_data_format (max diff") for p in passed)
    assert passed[-1] == "unit test: [zoo_ci] unit tests: 2 run, 0 failed, 0 errors"


def _broken_copy(exported: Path, tmp_path: Path, edit) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(exported.parents[1], root)
    edit(root / "models" / BUNDLE_NAME)
    return root


def test_zoo_ci_fails_without_models_model_pt(exported, tmp_path):
    root = _broken_copy(exported, tmp_path, lambda b: (b / "models" / "model.pt").unlink())
    with pytest.raises(RuntimeError, match="necessary file models/model.pt"):
        verify_bundle(str(root), schema=str(SCHEMA), mode="min")


def test_zoo_ci_fails_on_an_inference_json_that_needs_common_json(exported, tmp_path):
    """The old export: inference.json as the repository has it, network_def only in common.json."""

    def unflatten(bundle: Path) -> None:
        shutil.copy2(CONFIGS / "inference.json", bundle / "configs" / "inference.json")

    root = _broken_copy(exported, tmp_path, unflatten)
    with pytest.raises(RuntimeError, match="network_def"):
        verify_bundle(str(root), schema=str(SCHEMA))


def _lint(export_root: Path) -> list[tuple[str, str, str]]:
    res = subprocess.run(
        [sys.executable, str(ZOO_CI), "lint", "--zoo_root", str(export_root), "--bundle", BUNDLE_NAME],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    if res.returncode == 3:
        pytest.skip(f"the zoo's format tools are not installed: {res.stdout.strip()}")
    out = []
    for line in res.stdout.splitlines():
        if line.startswith("FINDING "):
            tool, rest = line[len("FINDING ") :].split(" ", 1)
            m = re.match(r"(\S+?):\d+:\d+: ([A-Z]+\d+)", rest)
            out.append((tool, *(m.groups() if m else (rest, ""))))
    assert (res.returncode == 1) == bool(out), res.stdout[-3000:] + res.stderr[-3000:]
    return out


def _relative(findings):
    return {(tool, f.replace(f"models/{BUNDLE_NAME}/", ""), code) for tool, f, code in findings}


def test_zoo_format_and_precommit_are_clean_on_the_pull_request_form(exported_pr):
    findings = _relative(_lint(exported_pr.parents[1]))
    assert findings == set(), findings


def test_zoo_precommit_refuses_weights_committed_to_git(exported):
    findings = _relative(_lint(exported.parents[1]))
    big = {f.split(" ")[0] for tool, f, _ in findings if tool == "check_added_large_files"}
    assert big == {"models/stage1.pt", "models/model.pt"}, findings


# --------------------------------------------------------------------------------------------------------------------
# the zoo user's command: configs/inference.json alone, from another directory, equals the repository's


#: Runs ``python -m monai.bundle`` with the repository's editable install hidden, so that ``custom`` can only come
#: from the bundle folder (as in the zoo), and reports where it came from.
NO_REPO = """
    import atexit, runpy, sys
    sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    atexit.register(lambda: print("CUSTOM_FILE", getattr(sys.modules.get("custom"), "__file__", None)))
    sys.argv = ["monai.bundle", *sys.argv[1:]]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def test_zoo_inference_command_equals_the_repository_command(exported, tmp_path):
    phantom = generate_phantom(11, preset="tiny", orientation="LPS")
    image = tmp_path / "in" / "case_z.nii.gz"
    image.parent.mkdir()
    phantom.save(image, tmp_path / "label.nii.gz")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    zoo_cmd = [sys.executable, "-c", textwrap.dedent(NO_REPO), "run", "--config_file"]
    zoo_cmd += [str(exported / "configs" / "inference.json")]
    zoo_cmd += ["--bundle_root", str(exported), "--input", str(image), "--output_dir", str(tmp_path / "zoo")]
    res = subprocess.run(zoo_cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    custom_file = next(x.split(" ", 1)[1] for x in res.stdout.splitlines() if x.startswith("CUSTOM_FILE "))
    assert Path(custom_file).resolve().is_relative_to(exported.resolve()), custom_file
    files = "['bundle/configs/common.json','bundle/configs/inference.json','bundle/configs/demo.json']"
    repo_cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--input", str(image)]
    repo_cmd += ["--output_dir", str(tmp_path / "repo")]
    res = subprocess.run(repo_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    src = nib.load(str(image))
    zoo, repo = (nib.load(str(tmp_path / d / "case_z_seg.nii.gz")) for d in ("zoo", "repo"))
    assert zoo.shape == repo.shape == src.shape
    np.testing.assert_allclose(zoo.affine, src.affine, atol=1e-5)
    seg = np.asarray(zoo.dataobj)
    np.testing.assert_array_equal(seg, np.asarray(repo.dataobj))
    assert len(np.unique(seg)) > 2  # the shipped weights segment several organs of a phantom
    assert not [p for p in cwd.iterdir()]  # nothing written to the working directory


# --------------------------------------------------------------------------------------------------------------------
# pins


def _pins() -> list[str]:
    pins = [f"monai=={META['monai_version']}", f"torch=={META['pytorch_version']}", f"numpy=={META['numpy_version']}"]
    return pins + [f"{k}=={v}" for k, v in META["required_packages_version"].items()]


#: Import names whose distribution has another name.
DISTRIBUTIONS = {"PIL": "pillow", "ignite": "pytorch-ignite", "skimage": "scikit-image", "yaml": "pyyaml"}


def test_every_third_party_import_of_the_shipped_code_is_pinned(exported):
    """The zoo installs only the metadata's pins (plus its own dev tools): an unpinned import fails there."""
    imported = set()
    for f in (exported / "custom").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {DISTRIBUTIONS.get(m, m) for m in imported if m not in sys.stdlib_module_names and m != "custom"}
    pinned = {"monai", "torch", "numpy", *META["required_packages_version"]}
    assert third_party <= pinned, sorted(third_party - pinned)
    assert {"tqdm", "nibabel", "pydicom", "scipy"} <= third_party  # the scan sees the imports


@pytest.mark.slow
@pytest.mark.parametrize("pin", _pins())
def test_metadata_pin_has_a_python_310_wheel(pin):
    """The zoo's premerge installs the pins on Python 3.10 (premerge-cpu.yml, python-version 3.10.14)."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "-q"]
    cmd += ["--python-version", "3.10", "--only-binary=:all:", "--implementation", "cp", "--target", "/nonexistent"]
    for platform in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"):
        cmd += ["--platform", platform]
    res = subprocess.run([*cmd, pin], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 0, f"{pin} does not install on Python 3.10: {res.stderr[-2000:]}"
