"""Phantom datasets in the Medical Segmentation Decathlon layout, the preview PNG and the command line.

``python -m tools.phantom write_dataset --out_dir data/phantoms --n_train 8 --n_test 4 --preset demo`` and
``python -m tools.phantom preview --seed 0 --out bundle/docs/phantom_preview.png``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from custom.labels import label_names, resolve_labels
from custom.outputs import atomic_write_text
from tools.phantom.generate import GENERATOR_VERSION, generate_phantom


def case_seeds(seed: int, n: int) -> list[int]:
    """n distinct case seeds derived from one dataset seed."""
    ss = np.random.SeedSequence(int(seed))
    out: list[int] = []
    for child in ss.spawn(n * 2 + 8):
        v = int(child.generate_state(1, np.uint32)[0] & 0x7FFFFFFF)
        if v not in out:
            out.append(v)
        if len(out) == n:
            break
    return out


_MSD_PARTS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "dataset.json")


def write_dataset(
    out_dir: str | Path,
    n_train: int = 8,
    n_test: int = 4,
    seed: int = 0,
    labels="paper",
    preset: str = "demo",
    overwrite: bool = False,
    **overrides,
) -> Path:
    """Write a phantom dataset in the Medical Segmentation Decathlon layout and return the path of ``dataset.json``.

    Case ids are ``phantom_0000``, ... (training first, then test); every case has its own seed derived from ``seed``,
    recorded with its parameters in the ``phantom`` block of ``dataset.json``. An existing non-empty folder is only
    replaced with ``overwrite=True`` (then the MSD parts are deleted first; other files are left alone).

    >>> import tempfile
    >>> from monai.data import load_decathlon_datalist
    >>> path = write_dataset(tempfile.mkdtemp(), n_train=1, n_test=1, preset="tiny")
    >>> len(load_decathlon_datalist(path, data_list_key="training"))
    1
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace the dataset there")
        for part in _MSD_PARTS:
            p = out / part
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    label_map = resolve_labels(labels)
    n_train, n_test = int(n_train), int(n_test)
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    seeds = case_seeds(seed, n_train + n_test)
    training, test, cases = [], [], []
    for i, case_seed in enumerate(seeds):
        cid = f"phantom_{i:04d}"
        split = "training" if i < n_train else "test"
        img_dir, lbl_dir = ("imagesTr", "labelsTr") if split == "training" else ("imagesTs", "labelsTs")
        p = generate_phantom(case_seed, labels=label_map, preset=preset, **overrides)
        p.save(out / img_dir / f"{cid}.nii.gz", out / lbl_dir / f"{cid}.nii.gz")
        entry = {"image": f"./{img_dir}/{cid}.nii.gz", "label": f"./{lbl_dir}/{cid}.nii.gz", "case_id": cid}
        (training if split == "training" else test).append(entry)
        cases.append({"case_id": cid, "split": split, "seed": case_seed, "params": p.params})
    names = label_names(label_map)
    meta = {
        "name": "CascadePhantoms",
        "description": "Synthetic abdominal CT phantoms (tools.phantom) for the cascaded 3D FCN bundle",
        "reference": "generated; see bundle/docs/phantoms.md",
        "licence": "Apache-2.0",
        "release": GENERATOR_VERSION,
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(i): n for i, n in enumerate(names)},
        "numTraining": n_train,
        "numTest": n_test,
        "training": training,
        "test": test,
        "phantom": {
            "generator": "tools.phantom",
            "version": GENERATOR_VERSION,
            "seed": int(seed),
            "preset": preset,
            "labels": label_map,
            "overrides": {k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items()},
            "cases": cases,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dataset.json"
    atomic_write_text(path, json.dumps(meta, indent=2))
    return path


def preview(
    seed: int = 0,
    out: str = "bundle/docs/phantom_preview.png",
    preset: str = "full",
    labels="extended",
    **overrides,
) -> str:
    """Generate one phantom and write its axial / coronal / sagittal preview PNG; returns the PNG path."""
    from custom.preview import save_preview

    p = generate_phantom(seed, labels=labels, preset=preset, **overrides)
    pr = p.params
    title = (
        f"phantom seed {seed} ({preset}): {pr['phase']}, {pr['orientation']}, "
        f"{'x'.join(map(str, pr['shape']))} @ {'x'.join(f'{s:g}' for s in pr['spacing'])} mm, "
        f"noise {pr['noise_std']:.0f} HU"
    )
    return str(save_preview(p.image, p.label, p.affine, out, label_names=label_names(p.labels), title=title))


def _cli_write_dataset(
    out_dir: str,
    n_train: int = 8,
    n_test: int = 4,
    seed: int = 0,
    labels="paper",
    preset: str = "demo",
    overwrite: bool = False,
    **overrides,
) -> str:
    from custom.options import as_bool  # fire passes --overwrite false as the truthy string 'false'

    return str(
        write_dataset(out_dir, n_train, n_test, seed, labels, preset, as_bool(overwrite, "overwrite"), **overrides)
    )


def main() -> None:
    """``python -m tools.phantom write_dataset ...`` / ``python -m tools.phantom preview ...``."""
    import fire

    fire.Fire({"write_dataset": _cli_write_dataset, "preview": preview}, name="tools.phantom")
