"""Export the bundle in the MONAI model-zoo layout, and run the zoo's checks on the export.

The model zoo ships only the bundle folder and puts only that folder on ``sys.path``; ``verify_net_in_out`` and
``ckpt_export`` put nothing there at all. In this repository the configs live in ``bundle/`` and the code in
``custom/`` beside it, so ``_target_: custom.network.ValidUNet3D`` resolves here only because the repository is
installed. :func:`export_bundle` therefore writes one self-contained folder::

    export/cascaded_3d_fcn/
        configs/        every config of bundle/configs, common.json with "bundle_root": "."
        models/         the shipped weights (stage1.pt, stage2.pt) when present, with checksums.json
        docs/           README.md (the zoo's model card) and the pages it links
        custom/         the package, copied inside the bundle (no __pycache__, no tests, no data)
        LICENSE
        large_files.yml files over 25 MB (to upload and download by URL); "large_files: []" when none

``bundle_root`` becomes ``"."`` (the zoo's convention): run from the bundle folder, or pass
``--bundle_root <path>``. Before copying, every path in the configs is checked (:func:`config_path_problems`): it is
built from ``@bundle_root`` or lies in one of the folders a user owns (``runs``, ``data``, ``outputs``, ``eval``);
an absolute or otherwise anchored path would break once the bundle is moved. An existing export is replaced only with
``overwrite=True``, and the new export is assembled beside it first, so a failed export leaves the old one intact.

:func:`verify_bundle` runs the zoo's CI commands (``python -m monai.bundle verify_metadata``, ``verify_net_in_out``
and ``ckpt_export``) on an export, for stage 2 (``network_data_format``) and stage 1
(``stage1_network_data_format``, given to the tools through a second meta file), from a scratch working directory
with only the export on ``PYTHONPATH``, then loads each TorchScript file and compares it with the eager network.

Command line::

    python -m custom.export --out export/                    # -> export/cascaded_3d_fcn/
    python -m custom.export --out export/ --overwrite
    python -m custom.export verify --bundle export/cascaded_3d_fcn --schema tests/data/meta_schema_20240725.json
    python -m custom.export verify --bundle export/cascaded_3d_fcn --stage1_weights w1.pt --stage2_weights w2.pt \\
        --features 2                                          # small random weights: any override of common.json
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLE_NAME",
    "MAX_FILE_BYTES",
    "USER_ROOTS",
    "config_path_problems",
    "export_bundle",
    "large_file_entries",
    "verify_bundle",
    "write_large_files",
    "zoo_commands",
]

_logger = logging.getLogger(__name__)

#: Name of the exported bundle folder (the zoo's ``models/<name>``).
BUNDLE_NAME = "cascaded_3d_fcn"
#: Files above this size may not be committed to the model zoo: they are listed in ``large_files.yml`` instead.
MAX_FILE_BYTES = 25 * 1000 * 1000
#: Relative path roots a user owns (inputs and outputs in the working directory); everything else comes from
#: ``@bundle_root``. These are the folders the repository's .gitignore keeps out of git.
USER_ROOTS: tuple[str, ...] = ("runs", "data", "outputs", "eval")
#: The parts of ``bundle/`` that are exported; anything else there is left out (and logged).
BUNDLE_PARTS: tuple[str, ...] = ("configs", "models", "docs")
#: Never exported, at any depth.
EXCLUDED: tuple[str, ...] = ("__pycache__", "*.pyc", "*.pyo", ".*", "*.egg-info", "*~")
#: Shipped weights, in stage order.
WEIGHT_FILES: tuple[str, ...] = ("stage1.pt", "stage2.pt")

_ROOT = Path(__file__).resolve().parents[1]
_PATH_KEY = re.compile(r"(_dir|_path|_file|_weights|^input)$")
_JOIN_FIRST = re.compile(r"os\.path\.join\(\s*(['\"])(.*?)\1")
_LITERAL = re.compile(r"(['\"])(.*?)\1")


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
# large files


def large_file_entries(
    bundle: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES, url_base: str = ""
) -> list[dict[str, str]]:
    """Zoo ``large_files`` entries (``path``, ``url``, ``hash_val``, ``hash_type``) for files over ``max_bytes``.

    The zoo's CI downloads each listed file to ``path`` (relative to the bundle) from ``url`` and checks the hash.
    ``url`` is ``url_base + "/" + path`` when ``url_base`` is given, else empty: to be filled in after uploading.

    Example::

        large_file_entries("export/cascaded_3d_fcn")  # [] for the small demo weights
    """
    from custom.checkpoint import sha256_file

    bundle = Path(bundle)
    entries = []
    for f in sorted(p for p in bundle.rglob("*") if p.is_file()):
        if f.stat().st_size > max_bytes:
            rel = f.relative_to(bundle).as_posix()
            url = f"{url_base.rstrip('/')}/{rel}" if url_base else ""
            entries.append({"path": rel, "url": url, "hash_val": sha256_file(f), "hash_type": "sha256"})
    return entries


def write_large_files(bundle: str | os.PathLike, entries: Sequence[Mapping[str, str]]) -> Path:
    """Write ``<bundle>/large_files.yml`` in the zoo's format (``large_files: []`` when there are none)."""
    lines = [
        "# Files over 25 MB are not committed to the MONAI model zoo: upload each one, put its address in `url`, and",
        "# the zoo downloads it to `path` and checks `hash_val`. Written by `python -m custom.export`.",
    ]
    if not entries:
        lines.append("large_files: []")
    else:
        lines.append("large_files:")
        for e in entries:
            lines.append(f'  - path: "{e["path"]}"')
            lines += [f'    {k}: "{e[k]}"' for k in ("url", "hash_val", "hash_type")]
    out = Path(bundle) / "large_files.yml"
    out.write_text("\n".join(lines) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# export


def _ignore(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if any(fnmatch.fnmatch(n, pat) for pat in EXCLUDED)}


def _is_export(folder: Path) -> bool:
    return (folder / "configs" / "metadata.json").is_file() and (folder / "custom" / "__init__.py").is_file()


def export_bundle(
    out: str = "export",
    overwrite: bool = False,
    name: str = BUNDLE_NAME,
    source: str | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
    large_file_url: str = "",
) -> Path:
    """Write ``<out>/<name>/``: the bundle folder with the ``custom`` package inside it; return its path.

    ``source`` is the repository root holding ``bundle/``, ``custom/`` and ``LICENSE`` (default: this checkout).
    Raises ``ValueError`` listing every config path that would break when moved (nothing is written then), and
    ``FileExistsError`` when the export exists and ``overwrite`` is false (or the folder is not an export).

    Example::

        export_bundle("export")  # -> Path("export/cascaded_3d_fcn")
    """
    from custom.checkpoint import write_checksums

    src = Path(source) if source is not None else _ROOT
    bundle_src, pkg_src, license_src = src / "bundle", src / "custom", src / "LICENSE"
    for needed in (bundle_src / "configs" / "common.json", bundle_src / "configs" / "metadata.json", pkg_src):
        if not needed.exists():
            raise FileNotFoundError(f"Not a checkout of this bundle: {needed} is missing.")
    if not license_src.is_file():
        raise FileNotFoundError(f"{license_src} is missing: the model zoo requires a LICENSE in every bundle.")
    problems = config_path_problems(bundle_src / "configs")
    if problems:
        raise ValueError(
            f"{len(problems)} config path(s) would break in an exported bundle:\n  " + "\n  ".join(problems)
        )

    dest = Path(out) / name
    if dest.exists():
        if not overwrite:
            raise FileExistsError(f"{dest} exists; pass --overwrite to replace it.")
        if not (_is_export(dest) or (dest.is_dir() and not any(dest.iterdir()))):
            raise FileExistsError(f"{dest} exists and is not a bundle export; refusing to delete it.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    try:
        for part in sorted(p.name for p in bundle_src.iterdir()):
            if part in BUNDLE_PARTS and (bundle_src / part).is_dir():
                shutil.copytree(bundle_src / part, tmp / part, ignore=_ignore)
            elif part not in ("large_files.yml", *EXCLUDED) and not part.startswith("."):
                _logger.warning(f"not exported: bundle/{part} (only {list(BUNDLE_PARTS)} are)")
        (tmp / "models").mkdir(exist_ok=True)
        shutil.copytree(pkg_src, tmp / "custom", ignore=_ignore)
        shutil.copy2(license_src, tmp / "LICENSE")

        common_path = tmp / "configs" / "common.json"
        common = json.loads(common_path.read_text())
        common["bundle_root"] = "."
        common_path.write_text(json.dumps(common, indent=4) + "\n")

        weights = [p for p in sorted((tmp / "models").iterdir()) if p.suffix in (".pt", ".pth", ".ts")]
        (tmp / "models" / "checksums.json").unlink(missing_ok=True)
        if weights:
            write_checksums(tmp / "models")
        entries = large_file_entries(tmp, max_file_bytes, large_file_url)
        write_large_files(tmp, entries)
        for e in entries:
            _logger.warning(f"{e['path']} is over {max_file_bytes} bytes: upload it and set its url in large_files.yml")
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _logger.info(f"exported {dest} ({', '.join(p.name for p in weights) or 'no weights'})")
    return dest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# zoo checks


def _cli_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def zoo_commands(
    bundle: str | os.PathLike,
    work_dir: str | os.PathLike,
    schema: str | None = None,
    weights: Mapping[str, str | None] | None = None,
    n: int = 1,
    device: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[tuple[str, list[str]]]:
    """The zoo's CI checks as ``python -m monai.bundle`` argument lists, ``(label, argv)``, for both stages.

    Stage 1 is checked through a second meta file in ``work_dir`` whose ``network_data_format`` is the metadata's
    ``stage1_network_data_format`` (the tools read only ``network_data_format``). ``weights`` maps ``"stage1"`` /
    ``"stage2"`` to checkpoint files (``{"network": state_dict}``); a stage without weights gets no ``ckpt_export``.
    """
    bundle, work = Path(bundle).resolve(), Path(work_dir).resolve()
    meta_file = bundle / "configs" / "metadata.json"
    common = str(bundle / "configs" / "common.json")
    meta = json.loads(meta_file.read_text())
    if "stage1_network_data_format" not in meta:
        raise KeyError(f"{meta_file} has no stage1_network_data_format")
    stage1_meta = work / "stage1_meta.json"
    stage1_meta.write_text(json.dumps({"network_data_format": meta["stage1_network_data_format"]}, indent=1))
    metas = {"stage2": str(meta_file), "stage1": f"{meta_file},{stage1_meta}"}
    extra = [a for k, v in {"bundle_root": str(bundle), **(overrides or {})}.items() for a in (f"--{k}", _cli_value(v))]
    schema_path = str(Path(schema).resolve()) if schema else str(work / "schema.json")
    cmds = [("verify_metadata", ["verify_metadata", "--meta_file", str(meta_file), "--filepath", schema_path])]
    for stage in ("stage2", "stage1"):
        argv = ["verify_net_in_out", "network_def", "--meta_file", metas[stage], "--config_file", common, "--n", str(n)]
        cmds.append((f"verify_net_in_out {stage}", argv + (["--device", device] if device else []) + extra))
    for stage in ("stage1", "stage2"):
        ckpt = (weights or {}).get(stage)
        if ckpt:
            argv = ["ckpt_export", "network_def", "--filepath", str(work / f"{stage}.ts"), "--ckpt_file", str(ckpt)]
            argv += ["--meta_file", metas[stage], "--config_file", common, "--key_in_ckpt", "network"]
            cmds.append((f"ckpt_export {stage}", argv + extra))
    return cmds


def _run_in_process(argv: list[str]) -> None:
    saved = sys.argv
    sys.argv = ["monai.bundle", *argv]
    try:
        runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"python -m monai.bundle {' '.join(argv)} exited with {e.code}") from e
    finally:
        sys.argv = saved


def _run_subprocess(argv: list[str], bundle: Path, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(bundle)}
    res = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *argv], cwd=cwd, env=env, capture_output=True, text=True
    )
    if res.returncode != 0:
        tail = res.stdout[-2000:] + res.stderr[-4000:]
        raise RuntimeError(f"python -m monai.bundle {' '.join(argv)} failed ({res.returncode}):\n{tail}")


def _compare_torchscript(bundle: Path, ts_file: Path, ckpt: str, overrides: Mapping[str, Any]) -> float:
    """Max |TorchScript - eager| on a random smallest valid input; the eager net loads ``ckpt`` itself."""
    import torch
    from monai.bundle import ConfigParser

    from custom.checkpoint import load_network
    from custom.network import MIN_INPUT

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "common.json"))
    for k, v in {"bundle_root": str(bundle), **overrides}.items():
        parser[k] = v
    net = load_network(parser.get_parsed_content("network_def"), ckpt)
    ts = torch.jit.load(str(ts_file), map_location="cpu").eval()
    x = torch.rand(1, 1, MIN_INPUT, MIN_INPUT, MIN_INPUT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((ts(x) - net(x)).abs().max())


def verify_bundle(
    bundle: str = ".",
    schema: str | None = None,
    stage1_weights: str | None = None,
    stage2_weights: str | None = None,
    n: int = 1,
    device: str | None = None,
    in_process: bool = False,
    work_dir: str | None = None,
    **overrides: Any,
) -> list[str]:
    """Run the model zoo's checks on an exported bundle; raise ``RuntimeError`` at the first failure.

    Each check is a ``python -m monai.bundle`` command run from a scratch directory (``work_dir`` or a temporary
    one) with only ``bundle`` on ``PYTHONPATH`` (``in_process=True``: the same commands, through the module's
    ``__main__``, in this process, which must then import ``custom`` from the bundle). Without explicit weights the
    shipped ``models/stage1.pt`` / ``stage2.pt`` are exported when present. ``n``: the size factor of
    ``verify_net_in_out`` (the zoo's CI uses 1). ``overrides``: config overrides, e.g. ``features=2`` for small test
    weights. Returns the names of the checks that passed.

    Example::

        verify_bundle("export/cascaded_3d_fcn", schema="tests/data/meta_schema_20240725.json")
    """
    bundle_path = Path(bundle).resolve()
    if not _is_export(bundle_path):
        raise FileNotFoundError(f"{bundle_path} is not an exported bundle (configs/metadata.json + custom/).")
    weights = {"stage1": stage1_weights, "stage2": stage2_weights}
    for stage, w in weights.items():
        shipped = bundle_path / "models" / f"{stage}.pt"
        if w is None and shipped.is_file():
            weights[stage] = str(shipped)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(work_dir or scratch).resolve()
        work.mkdir(parents=True, exist_ok=True)
        passed = []
        for label, argv in zoo_commands(bundle_path, work, schema, weights, n, device, overrides):
            _logger.info(f"[verify] python -m monai.bundle {' '.join(argv)}")
            cwd = os.getcwd()
            try:
                if in_process:
                    os.chdir(work)
                    _run_in_process(argv)
                else:
                    _run_subprocess(argv, bundle_path, work)
            except Exception as e:
                raise RuntimeError(f"zoo check '{label}' failed: {e}") from e
            finally:
                os.chdir(cwd)
            passed.append(label)
        for stage, ckpt in weights.items():
            if ckpt:
                diff = _compare_torchscript(bundle_path, work / f"{stage}.ts", ckpt, overrides)
                if not diff < 1e-4:
                    raise RuntimeError(f"{stage}.ts differs from the eager network by {diff:.3g}")
                passed.append(f"torchscript {stage} (max diff {diff:.1e})")
    _logger.info(f"[verify] {bundle_path}: all {len(passed)} checks passed")
    return passed


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m custom.export [--out ...]`` exports; ``python -m custom.export verify ...`` checks an export."""
    import fire

    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args[:1] == ["verify"]:
            fire.Fire(verify_bundle, command=args[1:], name="custom.export verify")
        else:
            fire.Fire(export_bundle, command=args, name="custom.export")
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"custom.export: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
