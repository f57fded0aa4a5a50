"""Time the training data path per 132x132x116 patch: sampler crop, on-device augmentation, MONAI's Rand3DElasticd.

Not a test. Prints a markdown table (device, torch version, date). Example (about a minute on 2 CPU cores):

    .venv/bin/python scripts/bench_augment.py --repeats 3 --monai-patches 1

On a CUDA machine it also times the augmentation and the whole ``CascadeBatchPreparer`` (pinned host-to-device copy
+ augmentation) on the GPU, with ``torch.cuda.synchronize``. The bar: 5 ms or less per patch on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import monai
import numpy as np
import torch
from monai.data import MetaTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.augment import CascadeBatchPreparer, RandElasticRigid3D  # noqa: E402
from custom.sampling import RandCandidateCropd  # noqa: E402

PATCH = (132, 132, 116)


def timed(fn, repeats: int, device: torch.device | None = None) -> float:
    """Median wall time of ``fn()`` in ms, after one warm-up call."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_volume(shape: tuple[int, int, int], seed: int = 0) -> dict:
    """A CT-sized volume with an ellipsoidal body mask covering ~40% of the voxels (the paper's C1)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    body = (grids[0] ** 2 + grids[1] ** 2 + 0.0 * grids[2]) < 0.51
    image = rng.standard_normal(shape, dtype=np.float32)
    label = (rng.integers(0, 8, shape, dtype=np.uint8) * body).astype(np.uint8)
    label[~body] = 255
    return {
        "image": MetaTensor(torch.from_numpy(image)[None]),
        "label": MetaTensor(torch.from_numpy(label)[None]),
        "c1": MetaTensor(torch.from_numpy(body)[None]),
        "class_weights": torch.full((8,), 1 / 7),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", type=int, nargs=3, default=(256, 256, 250), help="volume size (x2-downsampled CT)")
    parser.add_argument("--batches", type=int, nargs="+", default=(2, 4))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--monai-patches", type=int, default=1, help="MONAI Rand3DElasticd calls (slow on CPU; 0: skip)"
    )
    parser.add_argument("--no-cuda", action="store_true")
    args = parser.parse_args()

    aug_cpu = RandElasticRigid3D(patch_size=PATCH, seed=0)
    margin = aug_cpu.required_margin()
    box = tuple(p + 2 * m for p, m in zip(PATCH, margin, strict=True))
    data = make_volume(tuple(args.volume))
    c1_fraction = float(data["c1"].float().mean())
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_cuda:
        devices.append(torch.device("cuda"))
    rows = []

    for b in args.batches:
        crop = RandCandidateCropd(
            patch_size=PATCH, aug_margin=margin, num_samples=b, image_pad_value=-1.0, keep_candidate=False
        )
        crop.set_random_state(0)
        ms = timed(lambda crop=crop: crop(data), args.repeats)
        rows.append(("sampler crop, image + label (RandCandidateCropd, lazy pad)", "cpu", b, ms / b))
        samples = crop(data)
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("image", "label", "class_weights")}
        for dev in devices:
            aug = RandElasticRigid3D(patch_size=PATCH, seed=0)
            image, label = batch["image"].to(dev), batch["label"].to(dev)
            ms = timed(lambda aug=aug, image=image, label=label: aug(image, label), args.repeats, dev)
            rows.append(("RandElasticRigid3D (elastic + rotation + translation, 1 grid_sample)", dev.type, b, ms / b))
            if dev.type == "cuda":
                pinned = {k: v.pin_memory() for k, v in batch.items()}
                prep = CascadeBatchPreparer(aug, channels_last=True)
                ms = timed(
                    lambda prep=prep, pinned=pinned, dev=dev: prep(pinned, dev, non_blocking=True), args.repeats, dev
                )
                rows.append(("CascadeBatchPreparer (pinned H2D copy + augmentation)", dev.type, b, ms / b))

    if args.monai_patches > 0:
        from monai.transforms import Rand3DElasticd

        one = crop(data)[0]
        for dev in devices:
            t = Rand3DElasticd(
                keys=("image", "label"),
                sigma_range=(9.0, 13.0),
                magnitude_range=(0.0, 900.0),
                prob=1.0,
                rotate_range=(math.radians(5),) * 3,
                translate_range=(20,) * 3,
                spatial_size=PATCH,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                device=dev,
            )
            t.set_random_state(0)
            d = {"image": one["image"].to(dev), "label": one["label"].to(dev)}
            ms = timed(lambda t=t, d=d: t(d), args.monai_patches, dev)
            rows.append(("MONAI Rand3DElasticd + crop to 132x132x116 (dense smoothed field)", dev.type, 1, ms))

    name = torch.cuda.get_device_name() if len(devices) > 1 else f"{platform.processor() or 'cpu'}"
    print(f"date {datetime.date.today()}, torch {torch.__version__}, monai {monai.__version__}, ", end="")
    print(f"{torch.get_num_threads()} CPU threads, device: {name}")
    print(
        f"volume {tuple(args.volume)} (C1 {c1_fraction:.0%} of voxels), patch {PATCH}, box {box} (aug margin {margin})"
    )
    print()
    print("| step | device | batch | ms per patch |")
    print("|---|---|---|---|")
    for step, dev, b, ms in rows:
        print(f"| {step} | {dev} | {b} | {ms:.1f} |")


if __name__ == "__main__":
    main()
