"""Export the bundle as the MONAI model zoo receives it, and check the export as the zoo's CI does.

The zoo reads ``configs/inference.json`` alone, loads ``models/model.pt`` without a checkpoint key, ships only the
bundle folder and puts only that folder on ``sys.path``. In this repository the configs are composed
(``common.json`` + a workflow file [+ ``demo.json``]), the weights are ``{"network": state_dict}`` checkpoints named
``stage1.pt`` / ``stage2.pt``, and the runtime code lives in ``custom/`` beside ``bundle/`` (the tools in ``tools/``,
this module among them, never ship). :func:`export_bundle` writes a folder laid out like a checkout of the zoo::

    export/
        models/cascaded_3d_fcn/       the bundle
            configs/inference.json    common.json + inference.json (+ overlay), one self-contained file
            configs/train.json        common.json + train.json (+ overlay), one self-contained file
            configs/*.json            the other configs unchanged: overlays (evaluate.json, multi_gpu_*.json, ...)
            models/model.pt           stage 2 as a plain state_dict (network_data_format)
            models/stage1.pt          stage 1 as a plain state_dict (stage1_network_data_format)
            models/checksums.json     their SHA-256
            custom/                   only the modules the configs import, transitively
            docs/, LICENSE            the model card and its pages
            large_files.yml           when a file is listed for download (over 25 MB, or every weight file with
                                      --zoo_pr); the listed files then go to export/upload/ instead
        ci/unit_tests/test_cascaded_3d_fcn.py   the zoo's unit test for this bundle (train 1 iteration, infer 1 case)

Flattening follows MONAI's own merge (``ConfigParser.load_config_files``: files in order, top-level keys of later
files replace earlier ones). The optional ``overlay`` (default ``demo.json``, the configs the shipped weights were
trained with) then sets the keys the merged workflow already has (``features``, ``patch_size``, ...), and only those:
the exported ``inference.json`` describes the network its ``models/model.pt`` holds, which :func:`export_bundle`
checks by loading every weight file into ``network_def`` (strict). Config strings naming ``stage2.pt`` are renamed to
``model.pt``. ``bundle_root`` is ``"."`` (the zoo's convention).

The shipped Python is formatted with the zoo's isort and black settings (line length 120, black profile, black's
``--skip-magic-trailing-comma``), when those tools are installed: the zoo checks formatting with them, while this
repository uses ruff. Every JSON file is written with the zoo's ``pretty-format-json`` layout (indent 4, keys in order).

:func:`verify_bundle` copies an export into a scratch zoo-like folder and runs ``scripts/zoo_ci.py`` there (the zoo's
``verify_bundle.py`` steps with the same arguments, plus stage 1), and optionally the zoo unit test as the zoo's
runner calls it.

Command line::

    python -m tools.export --out export/                    # -> export/models/cascaded_3d_fcn/
    python -m tools.export --out export/ --overwrite --zoo_pr --large_file_url https://example.org/v0.3.0
    python -m tools.export --out export/ --overlay none --stage1_weights runs/stage1/checkpoints/model_final.pt \\
        --stage2_weights runs/stage2/checkpoints/model_final.pt     # your own paper-width weights
    python -m tools.export verify --export export --schema tests/data/meta_schema_20240725.json --unit_test true
"""

from __future__ import annotations

import ast
import fnmatch
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from custom.outputs import atomic_write_text, atomic_write_with

__all__ = [
    "BUNDLE_NAME",
    "MAX_FILE_BYTES",
    "USER_ROOTS",
    "config_path_problems",
    "export_bundle",
    "flatten_config",
    "imported_tool_modules",
    "large_file_entries",
    "runtime_modules",
    "verify_bundle",
    "write_large_files",
]

_logger = logging.getLogger(__name__)

#: Name of the exported bundle folder (the zoo's ``models/<name>``).
BUNDLE_NAME = "cascaded_3d_fcn"
#: Files above this size may not be committed to the model zoo: they are listed in ``large_files.yml`` instead.
MAX_FILE_BYTES = 25 * 1000 * 1000
#: The zoo's pre-commit refuses files above this size (``check-added-large-files --maxkb=1024``).
PRECOMMIT_MAX_BYTES = 1024 * 1024
#: Relative path roots a user owns (inputs and outputs in the working directory); everything else comes from
#: ``@bundle_root``. These are the folders the repository's .gitignore keeps out of git.
USER_ROOTS: tuple[str, ...] = ("runs", "data", "outputs", "eval")
#: Config files merged in front of every workflow file (MONAI's order), and the workflow files made self-contained.
BASE_CONFIGS: tuple[str, ...] = ("common.json",)
WORKFLOW_CONFIGS: tuple[str, ...] = ("inference.json", "train.json")
#: Shipped weights: repository file -> (exported file, metadata entry describing its network).
WEIGHTS: dict[str, tuple[str, str]] = {
    "stage2.pt": ("model.pt", "network_data_format"),
    "stage1.pt": ("stage1.pt", "stage1_network_data_format"),
}
#: Never exported, at any depth.
EXCLUDED: tuple[str, ...] = ("__pycache__", "*.pyc", "*.pyo", ".*", "*.egg-info", "*~")
#: isort and black as the zoo's setup.cfg / pyproject.toml configure them (black also gets --skip-magic-trailing-comma).
ZOO_ISORT: dict[str, Any] = {"profile": "black", "line_length": 120, "known_first_party": ["models"]}
ZOO_BLACK: dict[str, Any] = {
    "line_length": 120,
    "magic_trailing_comma": False,
    "target_versions": ("py37", "py38", "py39"),
}

_ROOT = Path(__file__).resolve().parents[1]
_PATH_KEY = re.compile(r"(_dir|_path|_file|_weights|^input)$")
_JOIN_FIRST = re.compile(r"os\.path\.join\(\s*(['\"])(.*?)\1")
_LITERAL = re.compile(r"(['\"])(.*?)\1")
_CUSTOM_REF = re.compile(r"\bcustom\.([A-Za-z_]\w*)")


# ---------------------------------------------------------------------------------------------------------------------
# config paths


def _walk(value: Any, key: str = "") -> list[tuple[str, str, str]]:
    """(id, last key, string value) for every string in a config tree."""
    if isinstance(value, Mapping):
        out = []
        for k, v in value.items():
            out += _walk(v, f"{key}#{k}" if key else str(k))
        return out
    if isinstance(value, list):
        return [t for i, v in enumerate(value) for t in _walk(v, f"{key}#{i}")]
    if isinstance(value, str):
        return [(key, key.rsplit("#", 1)[-1], value)]
    return []


def _root_problem(path: str, user_roots: Sequence[str]) -> str | None:
    if path.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", path):
        return f"absolute path {path!r}"
    root = path.replace("\\", "/").lstrip("./").split("/", 1)[0]
    if root not in user_roots:
        return f"relative path {path!r} is neither built from @bundle_root nor under a user folder {list(user_roots)}"
    return None


def config_path_problems(configs_dir: str | os.PathLike, user_roots: Sequence[str] = USER_ROOTS) -> list[str]:
    """Paths in the bundle configs that would break once the bundle folder is moved; empty when all are fine.

    A path is fine when it is built from a reference (``@bundle_root``, ``@output_dir``, ...) or is a user-facing
    input or output: a relative path whose first component is one of ``user_roots``. Checked: plain strings under
    path-like keys (``*_dir``, ``*_path``, ``*_file``, ``*_weights``, ``input``) or containing ``/``, the first
    argument of ``os.path.join`` in ``$`` expressions, and any absolute path literal. ``bundle_root`` may be set only
    in ``common.json``. ``metadata.json`` (prose and the schema URL) is not a config and is skipped.

    Example::

        config_path_problems("bundle/configs")  # [] or ["inference.json: stage1_weights: absolute path '/home/..'"]
    """
    problems = []
    for path in sorted(Path(configs_dir).glob("*.json")):
        if path.name == "metadata.json":
            continue
        data = json.loads(path.read_text())
        if path.name != "common.json" and "bundle_root" in data:
            problems.append(f"{path.name}: bundle_root may only be set in common.json")
        for cid, key, value in _walk(data):
            if cid == "bundle_root" or key in ("_target_", "_mode_") or value.startswith(("@", "%")):
                continue
            found: list[str | None] = []
            if value.startswith("$"):
                found += [_root_problem(m.group(2), user_roots) for m in _JOIN_FIRST.finditer(value)]
                found += [f"absolute path {m.group(2)!r}" for m in _LITERAL.finditer(value) if m.group(2)[:1] == "/"]
            elif "://" not in value and (_PATH_KEY.search(key) or "/" in value):
                found.append(_root_problem(value, user_roots))
            problems += [f"{path.name}: {cid}: {p}" for p in found if p]
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# flattening


def _dump_json(obj: Any) -> str:
    """JSON as the zoo's ``pretty-format-json --indent=4 --no-sort-keys`` writes it."""
    return json.dumps(obj, indent=4, ensure_ascii=True) + "\n"


def flatten_config(
    configs_dir: str | os.PathLike,
    workflow: str,
    base: Sequence[str] = BASE_CONFIGS,
    overlay: str | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One self-contained config: ``base`` files then ``workflow`` merged by MONAI, then ``overlay`` values applied.

    The merge is MONAI's (``ConfigParser.load_config_files``), so the result equals what
    ``--config_file "[common.json, <workflow>]"`` parses. ``overlay`` (a file name in ``configs_dir`` or a mapping)
    sets each of its keys (``a#b`` ids included) that the merged config already has; keys it lacks are not added
    (logged), so an overlay written for training adds no optimiser to an inference config.

    Example::

        flatten_config("bundle/configs", "inference.json", overlay="demo.json")["features"]  # 8
    """
    from monai.bundle import ConfigParser

    folder = Path(configs_dir)
    files = [folder / f for f in (*base, workflow)]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: cannot flatten {workflow}.")
    parser = ConfigParser(ConfigParser.load_config_files([str(f) for f in files]))
    if overlay is not None:
        values = ConfigParser.load_config_file(str(folder / overlay)) if isinstance(overlay, str) else overlay
        skipped = []
        for key, value in values.items():
            if key in parser:
                parser[key] = value
            else:
                skipped.append(key)
        if skipped:
            _logger.info(f"{workflow}: overlay keys not in the workflow, not added: {skipped}")
    return parser.get()


def _rename_refs(obj: Any, renames: Mapping[str, str]) -> Any:
    """Every string in a config tree with each file name in ``renames`` replaced as a whole word."""
    if isinstance(obj, Mapping):
        return {k: _rename_refs(v, renames) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rename_refs(v, renames) for v in obj]
    if isinstance(obj, str):
        for old, new in renames.items():
            obj = re.sub(rf"(?<![\w.-]){re.escape(old)}(?![\w.-])", new, obj)
    return obj


# ---------------------------------------------------------------------------------------------------------------------
# runtime code


def _imported_custom_modules(path: Path) -> set[str]:
    """Top-level ``custom`` submodules a module imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("custom.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module == "custom":
                found |= {a.name for a in node.names}
            elif node.level == 0 and node.module and node.module.startswith("custom."):
                found.add(node.module.split(".")[1])
            elif node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return found


def imported_tool_modules(path: str | os.PathLike) -> set[str]:
    """The ``tools`` modules (dotted names) a module imports anywhere; a runtime module may import none."""
    path = Path(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == "tools" or a.name.startswith("tools.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tools" or node.module.startswith("tools."):
                found.add(node.module)
    return found


def runtime_modules(configs: Sequence[Any], package: str | os.PathLike) -> list[str]:
    """The ``custom`` modules (file names) that ``configs`` import, transitively, plus ``__init__.py``.

    Roots: every ``custom.<module>`` named in a config string (``_target_``, ``$`` expressions, imports); then every
    ``custom`` import of those modules, at any depth of their code. Raises ``FileNotFoundError`` naming a module a
    config or a module asks for that the package does not have, and ``ImportError`` naming a shipped module that
    imports ``tools`` (phantoms, demo, export: they stay in the repository).
    """
    pkg = Path(package)
    todo = {m.group(1) for _, _, s in (t for c in configs for t in _walk(c)) for m in _CUSTOM_REF.finditer(s)}
    seen: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        path = pkg / f"{mod}.py"
        if not path.is_file():
            raise FileNotFoundError(f"custom.{mod} is imported by the exported configs or code, but {path} is missing.")
        tools = imported_tool_modules(path)
        if tools:
            raise ImportError(f"{path} ships in the bundle but imports {sorted(tools)}, which does not ship")
        seen.add(mod)
        todo |= _imported_custom_modules(path) - seen
    return ["__init__.py", *sorted(f"{m}.py" for m in seen)]


def _format_python(files: Sequence[Path], required: bool | None, zoo_root: Path) -> bool:
    """Format ``files`` in place with the zoo's isort + black settings; False when the tools are absent (allowed)."""
    try:
        import black
        import isort
    except ImportError as e:
        if required:
            raise RuntimeError(
                f"format_code needs isort and black ({e}); install them (pip install -e '.[dev]') or pass "
                "--format_code false"
            ) from e
        if required is None:
            _logger.warning("isort/black not installed: the exported code keeps the repository's ruff formatting")
        return False
    mode = black.Mode(
        line_length=ZOO_BLACK["line_length"],
        magic_trailing_comma=ZOO_BLACK["magic_trailing_comma"],
        target_versions={black.TargetVersion[v.upper()] for v in ZOO_BLACK["target_versions"]},
    )
    # isort tells first-party from third-party modules by the folders in src_paths (default: the working directory);
    # the zoo runs it from its root, where ``custom`` is no top-level folder, so ``custom`` sorts as third-party
    cfg = isort.Config(**ZOO_ISORT, src_paths=(str(zoo_root),))
    for f in files:
        src = f.read_text()
        out = black.format_str(isort.code(src, config=cfg), mode=mode)
        if out != src:
            atomic_write_text(f, out)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# weights


def _plain_state_dict(path: Path) -> dict:
    """The network state_dict of a repository checkpoint (``{"network": sd, "meta": ...}`` or a raw state_dict)."""
    import torch

    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(ckpt, Mapping) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return dict(ckpt)
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("network"), Mapping):
        return dict(ckpt["network"])
    raise ValueError(f"{path}: neither a state_dict nor a checkpoint with a 'network' state_dict.")


def _check_weights_fit(inference: Mapping[str, Any], bundle: Path, weight_files: Mapping[str, Path], hint: str) -> None:
    """Load every exported weight file into the exported ``network_def`` (strict); raise naming file and mismatch."""
    import torch
    from monai.bundle import ConfigParser

    for src, path in weight_files.items():
        parser = ConfigParser(dict(inference))
        parser["bundle_root"] = str(bundle)
        net = parser.get_parsed_content("network_def")
        try:
            net.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True), strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ValueError(
                f"{src} does not fit network_def of the exported inference.json ({hint}): "
                f"{' '.join(x.strip() for x in first[:3])[:600]}"
            ) from e


# ---------------------------------------------------------------------------------------------------------------------
# large files


def large_file_entries(
    bundle: str | os.PathLike,
    files: Sequence[str] | None = None,
    max_bytes: int = MAX_FILE_BYTES,
    url_base: str = "",
) -> list[dict[str, str]]:
    """Zoo ``large_files`` entries (``path``, ``url``, ``hash_val``, ``hash_type``): ``files`` (paths relative to
    ``bundle``), or else every file over ``max_bytes``.

    The zoo's CI downloads each listed file to ``path`` from ``url`` and checks the hash (a file already there is
    only checked). ``url`` is ``url_base + "/" + file name`` when ``url_base`` is given, else a placeholder to replace
    after uploading.

    Example::

        large_file_entries("export/models/cascaded_3d_fcn", ["models/model.pt"], url_base="https://x.org/v1")
    """
    from custom.weights import sha256_file

    bundle = Path(bundle)
    if files is None:
        paths = sorted(p for p in bundle.rglob("*") if p.is_file() and p.stat().st_size > max_bytes)
    else:
        paths = [bundle / f for f in files]
    entries = []
    for f in paths:
        rel = f.relative_to(bundle).as_posix()
        url = f"{url_base.rstrip('/')}/{f.name}" if url_base else f"REPLACE_WITH_THE_DOWNLOAD_URL_OF/{f.name}"
        entries.append({"path": rel, "url": url, "hash_val": sha256_file(f), "hash_type": "sha256"})
    return entries


def write_large_files(bundle: str | os.PathLike, entries: Sequence[Mapping[str, str]]) -> Path:
    """Write ``<bundle>/large_files.yml`` in the zoo's format."""
    lines = [
        "# Files not committed to the MONAI model zoo: upload each one (export/upload/), put its address in `url`;",
        "# the zoo downloads it to `path` and checks `hash_val`. Written by `python -m tools.export`.",
        "large_files:",
    ]
    for e in entries:
        lines.append(f'  - path: "{e["path"]}"')
        lines += [f'    {k}: "{e[k]}"' for k in ("url", "hash_val", "hash_type")]
    out = Path(bundle) / "large_files.yml"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the zoo's unit test

UNIT_TEST = '''\
# Copyright (c) Cascaded 3D FCN bundle contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

import json
import os
import shutil
import sys
import tempfile
import unittest

import nibabel as nib
import numpy as np
from monai.bundle import ConfigWorkflow
from parameterized import parameterized
from utils import check_workflow

BUNDLE_ROOT = "models/{name}"
TINY = {tiny}
TEST_CASE_1 = [{{"bundle_root": BUNDLE_ROOT, **TINY}}]  # train 1 iteration
TEST_CASE_2 = [{{"bundle_root": BUNDLE_ROOT, "features": TINY["features"], "target_spacing": TINY["target_spacing"]}}]


def test_order(test_name1, test_name2):
    def get_order(name):
        if "train" in name:
            return 1
        if "infer" in name:
            return 2
        return 3

    return get_order(test_name1) - get_order(test_name2)


def write_case(folder, name, seed):
    """A 64x64x48 CT at 3 mm: air, a body of soft tissue, and one sphere per label (1-{n_labels}) at its own HU."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in (64, 64, 48)], indexing="ij"))
    image = np.full((64, 64, 48), -1000.0, dtype=np.float32)
    label = np.zeros((64, 64, 48), dtype=np.uint8)
    body = ((grid[0] - 32) / 28.0) ** 2 + ((grid[1] - 32) / 24.0) ** 2 < 1
    image[body] = 40.0
    for k in range(1, {n_labels} + 1):
        centre = rng.integers(18, 46, size=3) - np.array([0, 0, 8])
        sphere = ((grid - centre[:, None, None, None]) ** 2).sum(0) < 16
        image[sphere & body] = 40.0 + 20.0 * k
        label[sphere & body] = k
    image += rng.normal(0, 5, image.shape).astype(np.float32)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), os.path.join(folder, "imagesTr", f"{{name}}.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), os.path.join(folder, "labelsTr", f"{{name}}.nii.gz"))
    return {{"image": f"./imagesTr/{{name}}.nii.gz", "label": f"./labelsTr/{{name}}.nii.gz"}}


class TestCascaded3DFCN(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # the bundle's code (custom/) is found from its folder, as the zoo's verify_bundle.py does
        sys.path.insert(0, os.path.abspath(BUNDLE_ROOT))
        cls.work_dir = tempfile.mkdtemp()
        cls.dataset_dir = os.path.join(cls.work_dir, "data")
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(cls.dataset_dir, sub))
        training = [write_case(cls.dataset_dir, f"case_{{i}}", seed=i) for i in range(3)]
        with open(os.path.join(cls.dataset_dir, "dataset.json"), "w") as f:
            json.dump({{"training": training, "test": []}}, f)
        cls.output_dir = os.path.join(cls.work_dir, "runs", "stage1")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.work_dir)

    def _workflow(self, workflow_type, config_file, override):
        return ConfigWorkflow(
            workflow_type=workflow_type,
            config_file=os.path.join(BUNDLE_ROOT, "configs", config_file),
            logging_file=os.path.join(BUNDLE_ROOT, "configs/logging.conf"),
            meta_file=os.path.join(BUNDLE_ROOT, "configs/metadata.json"),
            **override,
        )

    @parameterized.expand([TEST_CASE_1])
    def test_train_config(self, override):
        override = {{**override, "dataset_dir": self.dataset_dir, "output_dir": self.output_dir}}
        check_workflow(self._workflow("train", "train.json", override), check_properties={check_train})
        final = os.path.join(self.output_dir, "checkpoints", "model_final.pt")
        self.assertTrue(os.path.isfile(final), final)

    @parameterized.expand([TEST_CASE_2])
    def test_infer_config(self, override):
        weights = os.path.join(self.output_dir, "checkpoints", "model_final.pt")
        if not os.path.isfile(weights):
            self.skipTest("needs the weights test_train_config writes (the runner orders train first)")
        image = os.path.join(self.dataset_dir, "imagesTr", "case_0.nii.gz")
        out = os.path.join(self.work_dir, "out")
        override = {{**override, "input": image, "output_dir": out, "save_outputs": []}}
        override.update(stage1_weights=weights, stage2_weights=weights, stage1_sha256=None, stage2_sha256=None)
        check_workflow(self._workflow("infer", "inference.json", override), check_properties=True)
        seg, src = nib.load(os.path.join(out, "case_0_seg.nii.gz")), nib.load(image)
        self.assertEqual(seg.shape, src.shape)
        np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
        self.assertTrue(set(np.unique(np.asarray(seg.dataobj)).tolist()) <= set(range({n_labels} + 1)))


if __name__ == "__main__":
    loader = unittest.TestLoader()
    loader.sortTestMethodsUsing = test_order
    unittest.main(testLoader=loader)
'''

#: Overrides that make the exported train.json run one iteration in seconds on a CPU.
UNIT_TEST_TINY: dict[str, Any] = {
    "features": 2,
    "patch_size": [100, 100, 92],
    "target_spacing": [6.0, 6.0, 6.0],
    "max_epochs": 1,
    "epoch_length": 1,
    "batch_size": 1,
    "samples_per_volume": 1,
    "num_workers": 0,
    "val_interval": 1,
    "val_max_cases": 1,
    "cache_rate": 0.0,
    "train#augment#translation": 4,
}


def unit_test_source(name: str = BUNDLE_NAME, n_labels: int = 7, check_train_properties: bool = True) -> str:
    """The zoo unit test ``ci/unit_tests/test_<name>.py`` for the exported bundle."""
    tiny = json.dumps(UNIT_TEST_TINY, indent=4)
    return UNIT_TEST.format(name=name, tiny=tiny, n_labels=n_labels, check_train=check_train_properties)


# ---------------------------------------------------------------------------------------------------------------------
# export


def _ignore(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if any(fnmatch.fnmatch(n, pat) for pat in EXCLUDED)}


def _is_export(folder: Path) -> bool:
    return (folder / "configs" / "metadata.json").is_file() and (folder / "custom" / "__init__.py").is_file()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _none(value: Any) -> Any:
    return None if isinstance(value, str) and value.lower() in ("", "none", "null") else value


def export_bundle(
    out: str = "export",
    overwrite: bool = False,
    name: str = BUNDLE_NAME,
    source: str | None = None,
    overlay: str | None = "demo.json",
    stage1_weights: str | None = None,
    stage2_weights: str | None = None,
    zoo_pr: bool = False,
    large_file_url: str = "",
    max_file_bytes: int = MAX_FILE_BYTES,
    format_code: bool | None = None,
) -> Path:
    """Write the zoo form of the bundle under ``out`` (see the module docstring); return ``<out>/models/<name>``.

    Args:
        out: the export root, laid out like a checkout of the zoo (``models/<name>``, ``ci/unit_tests``).
        overwrite: replace an earlier export in ``out`` (never anything that is not an export).
        source: the repository root holding ``bundle/``, ``custom/`` and ``LICENSE`` (default: this checkout).
        overlay: a config of ``bundle/configs`` whose values the flattened workflows take (default ``demo.json``,
            which the shipped weights need); ``None``/``"none"`` for none (weights at ``common.json``'s widths).
        stage1_weights, stage2_weights: checkpoints to ship (default ``bundle/models/stage1.pt`` / ``stage2.pt``).
        zoo_pr: the form of a zoo pull request: every weight file is listed in ``large_files.yml`` (URL, SHA-256)
            and written to ``<out>/upload/`` for uploading instead of into the bundle (the zoo's pre-commit refuses
            files over 1 MB). Otherwise only files over ``max_file_bytes`` are.
        large_file_url: the folder URL the listed files will be uploaded to (else a placeholder).
        format_code: format the shipped Python with the zoo's isort/black (``None``: when they are installed).

    Raises ``ValueError`` for config paths that break when moved or weights that do not fit the exported
    ``network_def`` (nothing is written then), ``FileExistsError`` when ``out`` holds an export and ``overwrite`` is
    false, or holds anything else.

    Example::

        export_bundle("export")  # -> Path("export/models/cascaded_3d_fcn")
    """
    import torch
    from monai.bundle import ConfigParser

    from custom.options import as_bool
    from custom.weights import write_checksums

    overlay = _none(overlay)
    overwrite, zoo_pr = as_bool(overwrite, "overwrite"), as_bool(zoo_pr, "zoo_pr")
    format_code = None if _none(format_code) is None else as_bool(format_code, "format_code")
    src = Path(source) if source is not None else _ROOT
    configs_src, pkg_src, license_src = src / "bundle" / "configs", src / "custom", src / "LICENSE"
    for needed in (configs_src / "metadata.json", pkg_src / "__init__.py", *(configs_src / f for f in BASE_CONFIGS)):
        if not needed.exists():
            raise FileNotFoundError(f"Not a checkout of this bundle: {needed} is missing.")
    if not license_src.is_file():
        raise FileNotFoundError(f"{license_src} is missing: the model zoo requires a LICENSE in every bundle.")
    if overlay is not None and not (configs_src / overlay).is_file():
        raise FileNotFoundError(f"overlay {configs_src / overlay} is missing.")
    problems = config_path_problems(configs_src)
    if problems:
        raise ValueError(
            f"{len(problems)} config path(s) would break in an exported bundle:\n  " + "\n  ".join(problems)
        )
    given = {"stage1.pt": stage1_weights, "stage2.pt": stage2_weights}
    weight_src = {k: Path(v) if v else src / "bundle" / "models" / k for k, v in given.items()}
    for k, p in weight_src.items():
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: the export ships both stages' weights ({k}).")

    out_root = Path(out)
    dest = out_root / "models" / name
    unit_test = out_root / "ci" / "unit_tests" / f"test_{name}.py"
    upload = out_root / "upload"
    ours = [dest, unit_test, upload]
    if out_root.exists() and any(out_root.iterdir()):
        if not _is_export(dest):
            raise FileExistsError(f"{out_root} exists and holds no bundle export; refusing to write into it.")
        if not overwrite:
            raise FileExistsError(f"{dest} exists; pass --overwrite to replace it.")
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_root))
    try:
        bundle = tmp / "models" / name
        (bundle / "configs").mkdir(parents=True)
        renames = {k: v[0] for k, v in WEIGHTS.items() if k != v[0]}
        configs: dict[str, Any] = {}
        for path in sorted(configs_src.iterdir()):
            if path.suffix != ".json":
                if path.is_file() and not any(fnmatch.fnmatch(path.name, p) for p in EXCLUDED):
                    shutil.copy2(path, bundle / "configs" / path.name)  # logging.conf
                continue
            if path.name == "metadata.json":
                configs[path.name] = json.loads(path.read_text())
            elif path.name in WORKFLOW_CONFIGS:
                configs[path.name] = _rename_refs(flatten_config(configs_src, path.name, overlay=overlay), renames)
            else:
                configs[path.name] = _rename_refs(json.loads(path.read_text()), renames)
            if "bundle_root" in configs[path.name]:
                configs[path.name]["bundle_root"] = "."
        for fname, cfg in configs.items():
            atomic_write_text(bundle / "configs" / fname, _dump_json(cfg))

        models = bundle / "models"
        models.mkdir()
        shipped = {}
        for k, (new, _) in WEIGHTS.items():
            state = _plain_state_dict(weight_src[k])
            atomic_write_with(models / new, lambda f, state=state: torch.save(state, f))
            shipped[str(weight_src[k])] = models / new
        hint = f"overlay {overlay}" if overlay else "no overlay"
        _check_weights_fit(configs["inference.json"], bundle, shipped, hint)
        write_checksums(models)
        listing = models / "checksums.json"
        atomic_write_text(listing, _dump_json(json.loads(listing.read_text())))  # the zoo's JSON layout

        modules = runtime_modules([c for f, c in configs.items() if f != "metadata.json"], pkg_src)
        (bundle / "custom").mkdir()
        for m in modules:
            shutil.copy2(pkg_src / m, bundle / "custom" / m)
        docs_src = src / "bundle" / "docs"
        if docs_src.is_dir():
            shutil.copytree(docs_src, bundle / "docs", ignore=_ignore)
        shutil.copy2(license_src, bundle / "LICENSE")

        test_file = tmp / "ci" / "unit_tests" / unit_test.name
        test_file.parent.mkdir(parents=True)
        n_labels = len(ConfigParser(configs["inference.json"]).get_parsed_content("labels"))
        atomic_write_text(test_file, unit_test_source(name, n_labels))
        _format_python([*(bundle / "custom").glob("*.py"), test_file], format_code, tmp)

        listed = [f"models/{v[0]}" for v in WEIGHTS.values()] if zoo_pr else None
        entries = large_file_entries(bundle, listed, max_file_bytes, large_file_url)
        if entries:
            write_large_files(bundle, entries)
            for e in entries:
                target = tmp / "upload" / Path(e["path"]).name
                target.parent.mkdir(exist_ok=True)
                os.replace(bundle / e["path"], target)
                _logger.warning(f"{e['path']}: listed in large_files.yml, written to {upload / target.name} to upload")
        for folder in (tmp, bundle):
            os.chmod(folder, 0o777 & ~_umask())
        for p in ours:  # only what an earlier export wrote
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        for p in ours:
            staged = tmp / p.relative_to(out_root)
            if staged.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _logger.info(f"exported {dest} ({len(modules)} code files; weights: {', '.join(v[0] for v in WEIGHTS.values())})")
    return dest


# ---------------------------------------------------------------------------------------------------------------------
# the zoo's checks


ZOO_CI_SCRIPT = _ROOT / "scripts" / "zoo_ci.py"

UNIT_TEST_UTILS = '''\
"""check_workflow as the zoo's ci/unit_tests/utils.py defines it (reimplemented): initialize, check properties, run,
finalize."""


def check_workflow(workflow, check_properties=False):
    workflow.initialize()
    if check_properties is True:
        check_result = workflow.check_properties()
        if check_result is not None and len(check_result) > 0:
            raise ValueError(f"check properties for workflow failed: {check_result}")
    workflow.run()
    workflow.finalize()
'''


def _zoo_tree(export_root: Path, name: str, schema: str, work: Path) -> Path:
    """A scratch copy laid out like the zoo's checkout, with the schema prepared and uploads 'downloaded'."""
    zoo = work / "zoo"
    bundle = zoo / "models" / name
    shutil.copytree(export_root / "models" / name, bundle)
    atomic_write_text(zoo / "models" / "model_info.json", "{}\n")
    (bundle / "eval").mkdir()
    shutil.copy2(schema, bundle / "eval" / "schema.json")
    upload = export_root / "upload"
    if (bundle / "large_files.yml").is_file():
        import yaml

        for e in yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]:
            got = upload / Path(e["path"]).name
            if got.is_file() and not (bundle / e["path"]).exists():
                shutil.copy2(got, bundle / e["path"])  # what the zoo's download would put there
    tests = export_root / "ci" / "unit_tests"
    (zoo / "ci" / "unit_tests").mkdir(parents=True)
    for f in tests.glob("*.py"):
        shutil.copy2(f, zoo / "ci" / "unit_tests" / f.name)
    atomic_write_text(zoo / "ci" / "unit_tests" / "utils.py", UNIT_TEST_UTILS)
    return zoo


def _run_zoo_ci(argv: list[str], cwd: Path, timeout: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(cwd)  # the zoo's scripts export PYTHONPATH=$PWD (the zoo root)
    res = subprocess.run(
        [sys.executable, str(ZOO_CI_SCRIPT), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if res.returncode != 0:
        raise RuntimeError(
            f"zoo_ci {' '.join(argv)} failed ({res.returncode}):\n{res.stdout[-3000:]}{res.stderr[-6000:]}"
        )
    return res.stdout + res.stderr


def verify_bundle(
    export: str = "export",
    schema: str | None = None,
    name: str = BUNDLE_NAME,
    mode: str = "full",
    unit_test: bool = False,
    work_dir: str | None = None,
    timeout: int = 1800,
) -> list[str]:
    """Run the zoo's CI on an export (``scripts/zoo_ci.py`` in a scratch zoo-like copy); return the checks passed.

    ``schema``: the metadata schema file (the zoo downloads it; default: ``tests/data/meta_schema_20240725.json``).
    Stage 1 is checked too (``stage1_network_data_format`` with ``models/stage1.pt``). ``unit_test=True`` also runs
    ``ci/unit_tests/test_<name>.py`` as the zoo's runner does. Raises ``RuntimeError`` with the output of the first
    failing step.

    Example::

        verify_bundle("export", unit_test=True)  # ["directory", "version", "verify_metadata", ...]
    """
    from custom.options import as_bool

    unit_test = as_bool(unit_test, "unit_test")
    export_root = Path(export).resolve()
    if not _is_export(export_root / "models" / name):
        raise FileNotFoundError(
            f"{export_root / 'models' / name} is not an exported bundle; run python -m tools.export"
        )
    schema = str(Path(schema or _ROOT / "tests" / "data" / "meta_schema_20240725.json").resolve())
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(work_dir or scratch).resolve()
        work.mkdir(parents=True, exist_ok=True)
        zoo = _zoo_tree(export_root, name, schema, work)
        extra = ",".join(f"{fmt}=models/{f}" for f, fmt in WEIGHTS.values() if fmt != "network_data_format")
        argv = ["verify", "--zoo_root", str(zoo), "--bundle", name, "--mode", mode, "--extra", "--extra_weights", extra]
        log = _run_zoo_ci(argv, zoo, timeout)
        line = next(x for x in log.splitlines() if x.startswith("PASSED "))
        passed = json.loads(line[len("PASSED ") :])
        if unit_test:
            log = _run_zoo_ci(["unittest", "--zoo_root", str(zoo), "--bundle", name], zoo, timeout)
            passed.append("unit test: " + next(x for x in log.splitlines() if x.startswith("[zoo_ci] unit tests")))
    _logger.info(f"[verify] {export_root}: all {len(passed)} checks passed")
    return passed


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tools.export [--out ...]`` exports; ``python -m tools.export verify ...`` checks an export."""
    import fire

    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args[:1] == ["verify"]:
            fire.Fire(verify_bundle, command=args[1:], name="tools.export verify")
        else:
            fire.Fire(export_bundle, command=args, name="tools.export")
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"tools.export: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
