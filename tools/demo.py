"""The README's main command: the whole cascade on the embedded default, end to end, on a laptop-class CPU.

1. Synthetic abdominal CT phantoms (MSD layout) for training and, from other seeds, for testing.
2. Stage 1 trained inside the body mask C1 (``train.json`` + ``demo.json``: narrow widths, coarse 3 mm grid).
3. Stage-1 predictions and C2 written for every training case (``inference.json`` with ``stage1_only``).
4. Stage 2 trained inside C2 (``stage2.json`` on top of the same configs).
5. Unseen phantoms segmented by the cascade (``evaluate.json``): per-stage Dice table, C2 recall/FPR curve,
   overlay PNGs, per-case QC JSON.

Every step is the same ``monai.bundle`` run a user would type; the commands are printed as they run. Re-running
reuses the dataset and resumes finished trainings, so a second run takes a fraction of the first.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"


def _bundle_run(configs: list[str], **overrides) -> None:
    from monai.bundle import run

    files = [str(CONFIGS / c) for c in configs]
    shown = " ".join(f"--{k} {json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items())
    print(f'\n$ python -m monai.bundle run --config_file "{files}" {shown}', flush=True)
    run(config_file=files, logging_file=str(CONFIGS / "logging.conf"), **overrides)


def main(
    workdir: str = "runs/demo",
    n_train: int = 10,
    n_test: int = 4,
    seed: int = 0,
    epochs_stage1: int = 12,
    epochs_stage2: int = 12,
    fresh: bool = False,
    phantoms_only: bool = False,
    preset: str = "varied",
) -> int:
    """Run the demo in ``workdir`` (``--fresh`` deletes it first; ``--phantoms_only`` stops after the data).

    ``preset``: the phantoms' ``tools.phantom`` preset; ``"varied"`` (the shipped weights' training data: fields of
    view, contrast and texture variety) or ``"demo"`` (the fixed upper-abdomen phantoms of releases up to 0.3.0).
    """
    from custom.preview import save_preview  # noqa: F401  (imported early: fail fast if Pillow is missing)
    from tools.phantom import write_dataset

    logging.basicConfig(level=logging.WARNING)
    work = Path(workdir)
    if fresh and work.exists():
        shutil.rmtree(work)
    t_start = time.perf_counter()
    data_dir = work / "data"
    dataset_json = data_dir / "dataset.json"
    if not dataset_json.is_file():
        print(f"[demo] writing {n_train} training and {n_test} test phantoms to {data_dir}", flush=True)
        t0 = time.perf_counter()
        write_dataset(data_dir, n_train=n_train, n_test=n_test, seed=seed, preset=preset)
        print(f"[demo] phantoms written in {time.perf_counter() - t0:.1f} s", flush=True)
    else:
        print(f"[demo] reusing the phantom dataset in {data_dir}", flush=True)
    _write_phantom_previews(dataset_json, work / "previews")
    if phantoms_only:
        return 0

    common = {"dataset_dir": str(data_dir)}
    s1_dir, s2_dir = work / "stage1", work / "stage2"
    _bundle_run(["common.json", "train.json", "demo.json"], output_dir=str(s1_dir), max_epochs=epochs_stage1, **common)
    s1_weights = str(s1_dir / "checkpoints" / "model_final.pt")
    cand_dir = s1_dir / "candidates"
    _bundle_run(
        ["common.json", "inference.json", "candidates.json", "demo.json"],
        stage1_weights=s1_weights, output_dir=str(cand_dir), overwrite=True, **common,
    )  # fmt: skip
    _bundle_run(
        ["common.json", "train.json", "stage2.json", "demo.json"],
        output_dir=str(s2_dir), candidates_dir=str(cand_dir), max_epochs=epochs_stage2, **common,
    )  # fmt: skip
    eval_dir = work / "eval"
    _bundle_run(
        ["common.json", "inference.json", "evaluate.json", "demo.json"],
        stage1_weights=s1_weights, stage2_weights=str(s2_dir / "checkpoints" / "model_final.pt"),
        output_dir=str(eval_dir), save_outputs=["qc", "preview"], overwrite=True, **common,
    )  # fmt: skip
    print(f"\n[demo] done in {time.perf_counter() - t_start:.0f} s. Report: {eval_dir / 'report.md'}; "
          f"overlays: {eval_dir}/*_preview.png; C2 curve: {eval_dir / 'c2_curve.png'}")  # fmt: skip
    return 0


def _write_phantom_previews(dataset_json: Path, out: Path, n: int = 2) -> None:
    import nibabel as nib

    from custom.preview import save_preview

    out.mkdir(parents=True, exist_ok=True)
    data = json.loads(dataset_json.read_text())
    names = {int(k): v for k, v in data["labels"].items() if int(k) > 0}
    for item in data["training"][:n]:
        png = out / (Path(item["image"]).name.split(".")[0] + ".png")
        if png.exists():
            continue
        img = nib.load(str(dataset_json.parent / item["image"]))
        lab = nib.load(str(dataset_json.parent / item["label"]))
        save_preview(img.get_fdata(), lab.get_fdata().astype("uint8"), img.affine, png, label_names=names)
    print(f"[demo] phantom previews in {out}", flush=True)


if __name__ == "__main__":
    import fire

    sys.exit(fire.Fire(main))
