"""The MONAI model zoo's CI checks, reimplemented step for step (own code), to run on an export before a pull request.

The zoo (Project-MONAI/model-zoo) checks a bundle with ``ci/verify_bundle.py`` and runs its unit test with
``ci/unit_tests/runner.py``. This script makes the same calls with the same arguments, in a folder laid out like the
zoo's checkout (``models/<bundle>/``, ``models/model_info.json``, ``ci/unit_tests/test_<bundle>.py``), so that an export
that passes here fails there only for reasons outside the bundle (a GPU, the network). The steps of ``verify``:

1. ``sys.path`` gets ``models/<bundle>`` in front, as the zoo's ``verify`` does (so ``custom`` is the bundle's);
2. directory: ``large_files.yml`` (if any) is "downloaded" with MONAI's ``download_url`` (``fuzzy=True``; an existing
   file is only hash-checked, so upload URLs may still be placeholders), then ``configs/metadata.json``, ``LICENSE``,
   ``models/model.pt`` and ``configs/inference.json`` must exist;
3. version: ``version`` is in ``changelog`` and ``<bundle>_v<version>`` is not yet in ``models/model_info.json``
   (modes other than ``regular``);
4. ``verify_metadata(meta_file=configs/metadata.json, filepath=eval/schema.json)``;
5. (``full`` only) ``verify_net_in_out(net_id="network_def", meta_file, config_file=configs/inference.json,
   bundle_root)`` and ``ckpt_export(net_id, filepath=models/verify_model.ts, ckpt_file=models/model.pt, meta_file,
   config_file, bundle_root)``: ``configs/inference.json`` alone, the checkpoint without a key.

``--extra`` adds what the zoo does not check: stage 1 (``<name>_data_format`` entries other than
``network_data_format``, whose weights are named in ``--extra_weights``) through the same two calls, and each
TorchScript module against the eager network on a random input.

``unittest`` imports ``ci/unit_tests/test_<bundle>.py`` as the zoo's runner does (``test_order`` when defined) and runs
it with ``unittest``'s text runner from the zoo root; the exit status is non-zero on any failure or when the file is
missing (the zoo's runner skips a missing file silently; here that is an error).

``lint`` runs the zoo's code-format check (``runtests.sh --codeformat``: isort, black ``--skip-magic-trailing-comma``,
flake8, with the zoo's ``setup.cfg``/``pyproject.toml`` values) and its pre-commit hooks (pre-commit-hooks package:
end of file, trailing whitespace, YAML, docstring first, shebangs, 1 MB file limit, JSON layout with indent 4 in key
order, line endings, private keys) on ``models/<bundle>`` and ``ci/unit_tests/test_<bundle>.py``. It prints every
finding as ``FINDING <tool> <file>: <message>`` and exits 1 on any, 3 when a tool is not installed.

Usage (from the export root written by ``python -m tools.export``, which is laid out like the zoo)::

    python scripts/zoo_ci.py verify --zoo_root export --bundle cascaded_3d_fcn --mode full --extra
    python scripts/zoo_ci.py unittest --zoo_root export --bundle cascaded_3d_fcn
    python scripts/zoo_ci.py lint --zoo_root export --bundle cascaded_3d_fcn
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path


def _step(msg: str) -> None:
    print(f"[zoo_ci] {msg}", flush=True)


def _large_files(bundle_path: Path) -> None:
    from monai.apps.utils import download_url
    from monai.bundle.config_parser import ConfigParser

    for suffix in ("json", "yaml", "yml"):
        f = bundle_path / f"large_files.{suffix}"
        if not f.is_file():
            continue
        parser = ConfigParser()
        parser.read_config(str(f))
        for entry in parser.get()["large_files"]:
            entry = dict(entry, fuzzy=True)
            for k in ("hash_val", "hash_type"):
                if entry.get(k, None) == "":
                    entry.pop(k)
            entry["filepath"] = str(bundle_path / entry.pop("path"))
            download_url(**entry)
        _step(f"large files of {f.name} present and hash-checked")


def verify(zoo_root: Path, bundle: str, mode: str = "full", extra: bool = False, extra_weights: str = "") -> list[str]:
    models_path = zoo_root / "models"
    bundle_path = models_path / bundle
    sys.path.insert(0, str(bundle_path))
    passed = []

    # 2. directory
    _large_files(bundle_path)
    for rel in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
        if not (bundle_path / rel).is_file():
            raise ValueError(f"necessary file {rel} is not existing in {bundle_path}.")
    passed.append("directory")

    meta_file = bundle_path / "configs" / "metadata.json"
    metadata = json.loads(meta_file.read_text())
    # 3. version and changelog
    if mode != "regular":
        if metadata.get("version") not in metadata.get("changelog", {}):
            raise ValueError(f"version {metadata.get('version')} is missing in the changelog of {meta_file}.")
        model_info = json.loads((models_path / "model_info.json").read_text())
        if f"{bundle}_v{metadata['version']}" in model_info:
            raise ValueError(f"version {metadata['version']} is already used by {bundle}.")
        passed.append("version")

    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

    # 4. metadata against the schema (prepared beforehand at eval/schema.json, as the zoo's prepare_schema does)
    verify_metadata(meta_file=str(meta_file), filepath=str(bundle_path / "eval" / "schema.json"))
    passed.append("verify_metadata")
    if mode in ("min", "regular"):
        return passed

    import custom

    if not Path(custom.__file__).resolve().is_relative_to(bundle_path.resolve()):
        raise RuntimeError(f"custom was imported from {custom.__file__}, not from the bundle {bundle_path}")

    # 5. shape and TorchScript on configs/inference.json alone
    config_file = str(bundle_path / "configs" / "inference.json")
    verify_net_in_out(
        net_id="network_def", meta_file=str(meta_file), config_file=config_file, bundle_root=str(bundle_path)
    )
    passed.append("verify_net_in_out")
    ckpt_export(
        net_id="network_def",
        filepath=str(bundle_path / "models" / "verify_model.ts"),
        ckpt_file=str(bundle_path / "models" / "model.pt"),
        meta_file=str(meta_file),
        config_file=config_file,
        bundle_root=str(bundle_path),
    )
    passed.append("ckpt_export")
    tses = {"network_data_format": (bundle_path / "models" / "verify_model.ts", bundle_path / "models" / "model.pt")}

    if extra:
        weights = dict(kv.split("=", 1) for kv in extra_weights.split(",") if kv)
        scratch = bundle_path.parent.parent / "zoo_ci_extra"
        scratch.mkdir(exist_ok=True)
        for fmt in sorted(k for k in metadata if k.endswith("_data_format") and k != "network_data_format"):
            if fmt not in weights:
                raise ValueError(f"{meta_file} lists {fmt} but --extra_weights names no file for it")
            second_meta = scratch / f"{fmt}.json"
            second_meta.write_text(json.dumps({"network_data_format": metadata[fmt]}))
            metas = f"{meta_file},{second_meta}"
            verify_net_in_out(
                net_id="network_def", meta_file=metas, config_file=config_file, bundle_root=str(bundle_path)
            )
            passed.append(f"verify_net_in_out {fmt}")
            ts = scratch / f"{fmt}.ts"
            ckpt_export(
                net_id="network_def",
                filepath=str(ts),
                ckpt_file=str(bundle_path / weights[fmt]),
                meta_file=metas,
                config_file=config_file,
                bundle_root=str(bundle_path),
            )
            passed.append(f"ckpt_export {fmt}")
            tses[fmt] = (ts, bundle_path / weights[fmt])
        passed += _compare_torchscript(config_file, str(bundle_path), tses)
    return passed


def _compare_torchscript(config_file: str, bundle_root: str, tses: dict) -> list[str]:
    import torch
    from monai.bundle import ConfigParser

    from custom.network import MIN_INPUT

    out = []
    for fmt, (ts_file, ckpt) in tses.items():
        parser = ConfigParser()
        parser.read_config(config_file)
        parser["bundle_root"] = bundle_root
        net = parser.get_parsed_content("network_def")
        net.load_state_dict(torch.load(str(ckpt), map_location="cpu", weights_only=True))
        net.eval()
        ts = torch.jit.load(str(ts_file), map_location="cpu").eval()
        x = torch.rand(1, 1, MIN_INPUT, MIN_INPUT, MIN_INPUT, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((ts(x) - net(x)).abs().max())
        if not diff < 1e-4:
            raise RuntimeError(f"{ts_file} differs from the eager network by {diff:.3g}")
        out.append(f"torchscript {fmt} (max diff {diff:.1e})")
    return out


def run_unittest(zoo_root: Path, bundle: str) -> bool:
    tests_dir = zoo_root / "ci" / "unit_tests"
    name = f"test_{bundle}"
    if not (tests_dir / f"{name}.py").is_file():
        raise FileNotFoundError(f"no unit test {tests_dir / name}.py: the zoo's runner would pass vacuously")
    os.chdir(zoo_root)
    sys.path.append(str(tests_dir))
    module = importlib.import_module(name)
    loader = unittest.TestLoader()
    if hasattr(module, "test_order"):
        loader.sortTestMethodsUsing = module.test_order
    suite = loader.loadTestsFromNames([name])
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    _step(f"unit tests: {result.testsRun} run, {len(result.failures)} failed, {len(result.errors)} errors")
    return result.wasSuccessful() and result.testsRun > 0


#: The zoo's setup.cfg values for flake8 and isort, and its black settings (pyproject.toml + runtests.sh).
FLAKE8_ARGS = [
    "--select=B,C,E,F,N,P,T4,W,B9",
    "--max-line-length=120",
    "--ignore=E203,E501,E741,W503,W504,C408,N812,B023,B905,B028,B907,C419",
    "--per-file-ignores=__init__.py:F401 __main__.py:F401",
]
ISORT_ARGS = ["--profile", "black", "--line-length", "120", "-p", "models"]
BLACK_ARGS = ["--skip-magic-trailing-comma", "--line-length", "120", "-t", "py37", "-t", "py38", "-t", "py39"]
#: (module, arguments) of the pre-commit hooks the zoo's .pre-commit-config.yaml enables, in check mode.
HOOKS = [
    ("end_of_file_fixer", []),
    ("trailing_whitespace_fixer", []),
    ("check_yaml", []),
    ("check_docstring_first", []),
    ("check_executables_have_shebangs", []),
    ("check_case_conflict", []),
    ("check_added_large_files", ["--maxkb=1024"]),
    ("detect_private_key", []),
    ("pretty_format_json", ["--no-sort-keys", "--indent=4"]),
    ("mixed_line_ending", []),
]
TOOLS = ("isort", "black", "flake8", "pre_commit_hooks", "bugbear", "flake8_comprehensions", "pep8ext_naming")


def lint(zoo_root: Path, bundle: str) -> list[str]:
    """Findings of the zoo's formatters, linters and pre-commit hooks on the bundle and its unit test (a copy)."""
    import importlib.util

    missing = [t for t in TOOLS if importlib.util.find_spec(t) is None]
    if missing:
        print(f"MISSING {missing}", flush=True)
        sys.exit(3)
    with tempfile.TemporaryDirectory() as scratch:  # the fixers rewrite files: work on a copy
        root = Path(scratch)
        shutil.copytree(zoo_root / "models" / bundle, root / "models" / bundle)
        test = zoo_root / "ci" / "unit_tests" / f"test_{bundle}.py"
        if test.is_file():
            (root / "ci" / "unit_tests").mkdir(parents=True)
            shutil.copy2(test, root / "ci" / "unit_tests" / test.name)
        # pre-commit runs on the files a commit adds: a git repository with everything staged
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        subprocess.run(["git", "add", "-A"], cwd=root, check=True)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".git" not in p.parts)
        py = [f for f in files if f.endswith(".py")]
        # pre-commit gives text hooks only text files (identify: no NUL byte); the large-file hook gets every file
        text = [f for f in files if b"\0" not in (root / f).read_bytes()[:8192]]
        findings = []

        def run(tool: str, argv: list[str], per_line: bool = True) -> None:
            res = subprocess.run([sys.executable, *argv], cwd=root, capture_output=True, text=True)
            if res.returncode != 0:
                lines = [x for x in (res.stdout + res.stderr).splitlines() if x.strip()] if per_line else ["failed"]
                findings.extend(f"FINDING {tool} {x}" for x in lines or [f"exit {res.returncode}"])

        run("isort", ["-m", "isort", "--check-only", *ISORT_ARGS, *py])
        run("black", ["-m", "black", "--check", "-q", *BLACK_ARGS, *py])
        run("flake8", ["-m", "flake8", *FLAKE8_ARGS, *py])
        for hook, args in HOOKS:
            targets = text
            if hook in ("check_added_large_files", "check_case_conflict"):
                targets = files
            elif hook == "trailing_whitespace_fixer":
                targets = [f for f in text if not f.endswith((".ts", ".pt"))]
            elif hook == "check_yaml":
                targets = [f for f in text if f.endswith((".yml", ".yaml"))]
            elif hook == "check_docstring_first":
                targets = py
            elif hook == "pretty_format_json":
                targets = [f for f in text if f.endswith(".json")]
            elif hook == "check_executables_have_shebangs":
                targets = [f for f in text if os.access(root / f, os.X_OK)]
            if targets:
                run(hook, ["-m", f"pre_commit_hooks.{hook}", *args, *targets])
    return findings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["verify", "unittest", "lint"])
    ap.add_argument("--zoo_root", required=True, help="folder holding models/<bundle> (and ci/unit_tests)")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--mode", default="full", choices=["full", "min", "regular"])
    ap.add_argument("--extra", action="store_true", help="also check the other *_data_format networks")
    ap.add_argument("--extra_weights", default="", help="e.g. stage1_network_data_format=models/stage1.pt")
    args = ap.parse_args()
    zoo_root = Path(args.zoo_root).resolve()
    if args.command == "verify":
        passed = verify(zoo_root, args.bundle, args.mode, args.extra, args.extra_weights)
        print("PASSED " + json.dumps(passed), flush=True)
    elif args.command == "lint":
        findings = lint(zoo_root, args.bundle)
        print("\n".join(findings) or "[zoo_ci] lint: no findings", flush=True)
        sys.exit(1 if findings else 0)
    else:
        sys.exit(0 if run_unittest(zoo_root, args.bundle) else 1)


if __name__ == "__main__":
    main()
