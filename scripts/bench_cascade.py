"""End-to-end speed and memory benchmark of the cascade (issue 7): one command, CPU or CUDA, markdown + JSON.

What it measures, on a synthetic full-size CT (``tools.phantom``, written to NIfTI first, then read back like any
input), with random Kaiming-initialised networks at the paper's widths (the same weights for every variant):

- **cascade**: one case through ``inference.json``'s evaluator (``CascadeEvaluator.run``: the bundle workflow, with
  the benchmark's networks and tiling variant), split into reading, preprocessing (per transform), stage 1, C2,
  stage 2, resampling back to the input grid and writing, for the project's default tiling (aligned, mask-aware
  tiles, stage 2 averaged over R = 4 pooling-phase passes), the same without mask-aware tiles, and the paper's
  tiling (44x44x28 output tiles, stage 1 non-overlapping, stage 2 with the paper's 4x overlap). C2 is the dilated
  *ground truth* (r = 3) of the phantom by default (``--c2 label``): random weights would predict foreground almost
  everywhere, and the point is the cost at a realistic C2 (~5-10 % of the voxels); the C2 step still runs the same
  distance transform.
- **monai**: MONAI's ``sliding_window_inference`` with the spleen bundle's UNet (16-256 channels, 2 residual units,
  batch norm), roi 96^3, overlap 0.25 and 0.5, sw_batch_size 4, on the same resampled volume: the usual reference.
- **train**: training throughput at the paper's patch (132x132x116; batch 2 on CUDA, 1 on CPU): the full loop (data
  loader + ``RandCandidateCropd`` sampler + on-device augmentation + step, MONAI's ``SupervisedTrainer`` with the
  components of ``train.json``) against the pure compute step (forward + loss + backward + SGD on a fixed batch).
- **levers**: precision / memory layout / BatchNorm folding of one tile, resampling labels vs probabilities back,
  C1 on the full vs the working grid, NIfTI gzip level, and the FLOPs of mask-aware vs budget-only tile choice.
- **precision**: float32 vs bfloat16 vs ``amp="auto"`` in one process, repeats interleaved: the whole case at the
  demo's width and grid (``demo.json``) and one paper tile's forward at widths 8 and 32, with the machine (CPU model,
  ISA flags, oneDNN's bfloat16 support) and what ``auto`` chose (run with ``ONEDNN_MAX_CPU_ISA=AVX2`` to see what an
  AVX2-only CPU gets).
- **large**: peak RAM (and GPU memory) of the project's cascade on a 512x512x1000 CT.

Peak RAM is the process's high-water mark (``VmHWM``, reset before each section through ``/proc/self/clear_refs``,
so it includes what the process already held); GPU peaks are ``torch.cuda.max_memory_allocated``.

Examples::

    python scripts/bench_cascade.py --quick                          # smoke test, ~1 minute on 2 CPU cores
    python scripts/bench_cascade.py --json bench.json                # everything (2-core CPU: ~20 minutes if alone)
    python scripts/bench_cascade.py --skip-paper --skip-large        # CPU: the project's cascade and levers only
    python scripts/bench_cascade.py --paper-extrapolate --large-features 8   # CPU: paper rows from timed tiles

On a 2-core CPU the paper's tiling takes ~4 minutes on this CT with the machine to itself (twice that with another
job); ``--paper-extrapolate`` times a few tiles per stage through the same inferer and multiplies by the number of
tiles that run (the table says so).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import custom.precision as precision_mod  # noqa: E402
from custom import runtime  # noqa: E402
from custom.cascade import CascadeInferer  # noqa: E402
from custom.inferer import ValidTiledInferer  # noqa: E402
from custom.network import ValidUNet3D, forward_flops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import device_name  # noqa: E402

CONFIGS = ROOT / "bundle" / "configs"
PATCH = (132, 132, 116)


# ------------------------------------------------------------------------------------------------ measuring helpers
def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


class Peak:
    """Peak memory over a block: process RSS high-water mark (Linux) and, on CUDA, max allocated GPU memory."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Peak:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        except OSError:
            pass
        self.rss_before_gb = (_status_kb("VmRSS") or 0) / 2**20
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0
        hwm = _status_kb("VmHWM")
        self.ram_gb = None if hwm is None else hwm / 2**20
        self.gpu_gb = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        self.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other jobs on the machine show here

    def as_dict(self) -> dict:
        return {
            "peak_ram_gb": self.ram_gb,
            "ram_before_gb": self.rss_before_gb,
            "peak_gpu_gb": self.gpu_gb,
            "load_average_1min": self.load,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1, warmup: int = 0) -> tuple[float, object]:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def log(msg: str) -> None:
    print(f"# [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------- set-up
def make_net(features: int, classes: int, seed: int, device: torch.device) -> ValidUNet3D:
    """A Kaiming-initialised :class:`ValidUNet3D` (the network's own init) with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    net = ValidUNet3D(in_channels=1, out_channels=classes, features=features)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):  # as after training: folding must matter
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
    return net.to(device).eval()


def parser_for(*names: str, **overrides):
    from monai.bundle import ConfigParser

    cp = ConfigParser()
    cp.read_config([str(CONFIGS / n) for n in names])
    for k, v in overrides.items():
        cp[k.replace("__", "#")] = v
    return cp


def write_phantom(folder: Path, seed: int, preset: str, **kw) -> dict:
    """Generate a phantom CT and its label map as NIfTI in ``folder`` (reused when the same one is already there)."""
    import hashlib

    from custom.nifti_io import write_nifti_safely
    from tools.phantom import GENERATOR_VERSION, generate_phantom

    key = json.dumps({"seed": seed, "preset": preset, "v": GENERATOR_VERSION, **kw}, sort_keys=True, default=str)
    name = f"ct_{preset}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    cached = folder / f"{name}.json"
    if cached.exists():
        info = json.loads(cached.read_text())
        if Path(info["image"]).exists() and Path(info["label"]).exists():
            log(f"reusing {info['image']}")
            return info
    t0 = time.perf_counter()
    p = generate_phantom(seed, preset=preset, **kw)
    gen = time.perf_counter() - t0
    img = write_nifti_safely(p.image, p.affine, folder / f"{name}.nii.gz", overwrite=True)
    lab = write_nifti_safely(p.label, p.affine, folder / f"{name}_label.nii.gz", overwrite=True)
    info = {
        "image": str(img),
        "label": str(lab),
        "case_id": name,
        "shape": list(p.image.shape),
        "spacing": [float(s) for s in np.abs(np.diag(p.affine)[:3])],
        "generate_seconds": gen,
        "file_mb": img.stat().st_size / 2**20,
        "labels": dict(p.labels),
    }
    del p
    gc.collect()
    cached.write_text(json.dumps(info))
    return info


class TimedCompose:
    """Builds a ``Compose`` whose call records the seconds of every transform (``times``); inversion is unchanged."""

    @staticmethod
    def make(transforms):
        from monai.transforms import Compose

        class _Timed(Compose):
            def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
                self.times = {}
                end = len(self.transforms) if end is None else end
                for i in range(start, end):
                    t0 = time.perf_counter()
                    input_ = super().__call__(input_, start=i, end=i + 1, threading=threading, lazy=lazy)
                    name = type(self.transforms[i]).__name__
                    self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
                return input_

        return _Timed(transforms)


class LabelC2Cascade(CascadeInferer):
    """The project's cascade with C2 taken from a fixed label map (the dilated ground truth) instead of stage 1.

    The C2 step is otherwise the same (the same distance transform and intersection with C1)."""

    c2_label: torch.Tensor | None = None

    def candidates(self, stage1_labels, mask=None, like=None):
        src = stage1_labels if self.c2_label is None else self.c2_label.to(stage1_labels.device)
        return super().candidates(src, mask, like)


# -------------------------------------------------------------------------------------------------------- sections
def preprocess_with_label(case: dict, target_spacing) -> dict:
    """The config's preprocessing with the label resampled alongside (for C2 from the label and for training)."""
    cp = parser_for("common.json", load_keys=["image", "label"], load_modes=["bilinear", "nearest"])
    if target_spacing is not None:
        cp["target_spacing"] = list(target_spacing)
    from monai.transforms import Compose

    return Compose(cp.get_parsed_content("preprocessing_transforms"))({"image": case["image"], "label": case["label"]})


#: Tiling variants of the cascade: tiling mode, mask-aware tile choice, encoder shared by the R passes, and the
#: stage-2 R (None: ``--stage2-overlap``, default 4 as inference.json).
VARIANTS = {
    "project": {"mode": "aligned", "mask_aware": True, "share_encoder": True, "r2": None},
    "project-r1": {"mode": "aligned", "mask_aware": True, "share_encoder": True, "r2": 1},
    "project-plain": {"mode": "aligned", "mask_aware": False, "share_encoder": False, "r2": None},
    "paper": {"mode": "paper", "mask_aware": False, "share_encoder": False, "r2": None},
}


def tile_inferers(cp, variant: str, args) -> tuple:
    """(stage-1, stage-2) inferers of a variant, as inference.json builds them (plus the variant's switches)."""
    v = VARIANTS[variant]
    r2 = v["r2"] or args.stage2_overlap
    common = {"pad_value": cp.get_parsed_content("pad_value"), "amp": args.amp, "compile": args.compile}
    if args.amp != "auto":  # a forced precision runs channels-last (the fastest layout measured for both dtypes)
        common["channels_last"] = True
    if v["mode"] == "paper":
        return (
            ValidTiledInferer(mode="paper", overlap=1, **common),
            ValidTiledInferer(mode="paper", overlap=r2, **common),
        )
    kw = {"mask_aware": v["mask_aware"], "share_encoder": v["share_encoder"], **common}
    return (
        ValidTiledInferer(mode="aligned", overlap=args.stage1_overlap, **kw),
        ValidTiledInferer(mode="aligned", overlap=r2, **kw),
    )


def run_cascade(case: dict, pre: dict, nets, variant: str, args, device, outdir: Path) -> dict:
    """One case through ``inference.json``'s evaluator with one tiling variant: the timings of every step and peaks.

    The config's own ``evaluator`` (data loader, postprocessing, handlers) runs with the benchmark's networks, the
    variant's inferers and the timed preprocessing put in its place; reading runs in the main process
    (``inference_workers 0``) so that the preprocessing steps can be timed one by one."""
    cp = parser_for(
        "common.json",
        "inference.json",
        load_keys=["image"],
        load_modes=["bilinear"],
        input=case["image"],
        output_dir=str(outdir / variant),
        save_outputs=["qc"],
        overwrite=True,
        inference_workers=0,
    )
    if args.target_spacing:
        cp["target_spacing"] = args.target_spacing
    pre_t = TimedCompose.make(cp.get_parsed_content("preprocessing_transforms"))
    s1, s2 = tile_inferers(cp, variant, args)
    labels = cp.get_parsed_content("labels")
    cascade = LabelC2Cascade(nets[0], s1, s2, radius=3, labels=labels)
    if args.c2 == "label":
        cascade.c2_label = pre["label"][None].round().to(torch.uint8)
    cp["datalist"] = [{"image": case["image"], "case_id": case["case_id"]}]
    cp["preprocessing"] = pre_t
    cp["stage1_network"] = nets[0]
    cp["network"] = nets[1]
    cp["inferer"] = cascade
    cp["device"] = device
    evaluator = cp.get_parsed_content("evaluator")
    log(f"cascade {variant}: running")
    with Peak(device) as pk:
        evaluator.run()
    if evaluator.failures:
        raise RuntimeError(f"the case failed: {evaluator.failures}")
    qc = json.loads((outdir / variant / f"{case['case_id']}_qc.json").read_text())
    sec = dict(qc["seconds"])
    reading = pre_t.times.get("CheckedLoadImaged", 0.0)
    row = {
        "variant": variant,
        "reading": reading,
        "preprocessing": sec["read_preprocess"] - reading,
        "preprocessing_steps": pre_t.times,
        "stage1": sec["stage1"],
        "c2": sec["c2"],
        "stage2": sec["stage2"],
        "resample_back": sec["resample_back"],
        "write": sec["write"],
        "total": sec["total"],
        "wall": pk.seconds,
        "c1_fraction": qc["c1_fraction"],
        "c2_fraction": qc["c2_fraction"],
        "working_shape": list(pre["image"].shape[1:]),
        "stages": {},
        **pk.as_dict(),
    }
    for st, inf in (("stage1", s1), ("stage2", s2)):
        ls = inf.last_stats
        row["stages"][st] = {
            k: ls.get(k)
            for k in (
                "tiles_run",
                "tiles_skipped",
                "tile_size",
                "input_tile_size",
                "passes",
                "flops",
                "seconds",
                "dtype",
                "precision",
            )
        }
        row["stages"][st]["encoder_tiles"] = ls.get("encoder_tiles")
    log(f"cascade {variant}: {row['total']:.1f} s, peak RAM {row['peak_ram_gb']:.2f} GB")
    return row


def count_tiles(inferer: ValidTiledInferer, spatial, mask: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """Tiles that run for ``mask`` (write region holds a candidate) and the tile size, without running anything."""
    passes = inferer.plan(spatial)
    m = mask.reshape(*spatial).bool()
    n = 0
    for p in passes:
        for w in p.write:
            n += bool(m[w[0][0] : w[0][1], w[1][0] : w[1][1], w[2][0] : w[2][1]].any())
    return n, passes[0].tile_size


def plan_cost(inferer: ValidTiledInferer, spatial, tile, mask: torch.Tensor, shared: bool, args) -> tuple:
    """(tiles run, distinct tile positions run, forward FLOPs) of a plan for ``mask``, counted tile by tile."""
    from custom.tile_choice import encoder_flops

    passes = inferer.plan(spatial, tile)
    m = mask.reshape(*spatial).bool()
    hit = [[bool(m[w[0][0] : w[0][1], w[1][0] : w[1][1], w[2][0] : w[2][1]].any()) for w in p.write] for p in passes]
    runs = sum(map(sum, hit))
    ins = [t + 88 for t in passes[0].tile_size]
    full = forward_flops(ins, 1, args.classes, args.features)
    if not shared or len(passes) == 1:
        return runs, runs, runs * full
    tiles = sum(any(col) for col in zip(*hit, strict=True))
    enc = encoder_flops([i + 4 for i in ins], 1, args.features)
    return runs, tiles, tiles * enc + runs * (full - encoder_flops(ins, 1, args.features))


def paper_extrapolated(pre: dict, nets, args, device) -> dict:
    """Paper tiling, per stage: tiles that run x the median time of one tile through the same inferer path."""
    cp = parser_for("common.json", "inference.json")
    s1, s2 = tile_inferers(cp, "paper", args)
    spatial = tuple(pre["image"].shape[1:])
    c1 = pre["c1"][0]
    from custom.candidates import candidate_region

    c2 = torch.as_tensor(candidate_region(pre["label"][0].numpy().round().astype(np.uint8), 3, body=c1.numpy() > 0))
    row = {"variant": "paper (extrapolated)", "stages": {}}
    for st, inf, mask, net in (("stage1", s1, c1, nets[0]), ("stage2", s2, c2, nets[1])):
        n, tile = count_tiles(inf, spatial, mask)
        one = ValidTiledInferer(mode="paper", overlap=1, tile_size=tile, amp=args.amp)
        x = torch.randn(1, 1, tile[0] * 2, *tile[1:], device=device)  # 2 tiles per call
        sec, _ = timed(lambda one=one, x=x, net=net: one(x, net), device, repeats=args.repeats, warmup=1)
        per_tile = sec / 2
        row["stages"][st] = {"tiles_run": n, "tile_size": list(tile), "seconds_per_tile": per_tile}
        row[st] = n * per_tile
        row["stages"][st]["flops"] = n * forward_flops([t + 88 for t in tile], 1, args.classes, args.features)
        log(f"paper extrapolated {st}: {n} tiles x {per_tile:.2f} s")
    return row


def monai_reference(pre: dict, args, device) -> list[dict]:
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=args.classes,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
        norm="batch",
    )
    net = net.to(device).eval()
    x = pre["image"][None].as_tensor().to(device)
    rows = []
    ctx = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        if not args.fp32
        else (lambda: torch.autocast(device_type=device.type, enabled=False))
    )
    for overlap in (0.25, 0.5):

        def run(overlap=overlap):
            with torch.no_grad(), ctx():
                return sliding_window_inference(x, (96, 96, 96), 4, net, overlap=overlap)

        with Peak(device) as pk:
            sec, out = timed(run, device, repeats=args.repeats, warmup=1 if device.type == "cuda" else 0)
        rows.append({"overlap": overlap, "seconds": sec, "shape": list(out.shape[2:]), **pk.as_dict()})
        log(f"monai UNet overlap {overlap}: {sec:.2f} s")
        del out
    return rows


def training(pre: dict, args, device) -> list[dict]:
    """Full loop (loader + sampler + augmentation + step) vs the compute step alone, samples per second."""
    from ignite.engine import Events
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedTrainer
    from monai.transforms import Compose, Randomizable

    batch = 2 if device.type == "cuda" else 1
    patch = list(args.patch)
    cp = parser_for(
        "common.json",
        "train.json",
        features=args.features,
        patch_size=patch,
        batch_size=batch,
        samples_per_volume=batch,
    )
    if args.quick:
        cp["train#augment#translation"] = 4
    if args.target_spacing:
        cp["target_spacing"] = args.target_spacing
    net = make_net(args.features, args.classes, 0, device).train()
    sampling = cp.get_parsed_content("train#sampling_transforms")
    first_random = next(i for i, t in enumerate(sampling) if isinstance(t, Randomizable))
    augment = cp.get_parsed_content("train#augment")
    prepare = cp.get_parsed_content("train#prepare_batch")
    loss_fn = cp.get_parsed_content("loss")
    amp = bool(cp.get_parsed_content("amp"))
    lr, momentum = cp.get_parsed_content("learning_rate"), cp.get_parsed_content("momentum")
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=1e-4)
    # as CacheDataset in train.json: the deterministic transforms once, the random ones (the sampler) per item
    item = Compose(sampling[:first_random])({k: pre[k] for k in ("image", "label", "c1")})
    n_iter = args.train_iters
    ds = Dataset([item] * (n_iter + 1), transform=Compose(sampling[first_random:]))
    workers = args.num_workers
    loader = DataLoader(ds, batch_size=1, shuffle=True, num_workers=workers)
    stamps: list[float] = []
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=loader,
        network=net,
        optimizer=opt,
        loss_function=loss_fn,
        prepare_batch=prepare,
        amp=amp,
        decollate=False,
    )

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stamp(engine):
        _sync(device)
        stamps.append(time.perf_counter())

    rows = []
    log(f"training: full loop, {n_iter + 1} iterations of batch {batch}")
    with Peak(device) as pk:
        t0 = time.perf_counter()
        trainer.run()
    first = stamps[0] - t0
    per = statistics.median(np.diff(stamps)) if len(stamps) > 1 else first
    rows.append(
        {
            "what": f"full loop: loader ({workers} workers) + sampler + augmentation + step (amp={amp})",
            "batch": batch,
            "seconds_per_iteration": per,
            "first_iteration": first,
            "samples_per_s": batch / per,
            **pk.as_dict(),
        }
    )
    # one fixed batch on the device for the compute-only rows
    data = next(iter(DataLoader(ds, batch_size=1, num_workers=0)))
    x, y = prepare(data, device)

    def step_fn(dtype, channels_last):
        xx = x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x
        scaler = torch.amp.GradScaler("cuda") if (dtype == torch.float16 and device.type == "cuda") else None

        def step():
            opt.zero_grad(set_to_none=True)
            ctx = torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()
            with ctx:
                loss = loss_fn(net(xx), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            return loss

        return step

    cfg_dtype = torch.float16 if amp else None
    variants = [("compute step as the config (fwd + CE + bwd + SGD)", cfg_dtype, False)]
    variants.append(("compute step, bf16 autocast + channels_last_3d", torch.bfloat16, True))
    for what, dtype, cl in variants:
        if cl:
            net.to(memory_format=torch.channels_last_3d)
        log(f"training: {what}")
        with Peak(device) as pk:
            sec, _ = timed(step_fn(dtype, cl), device, repeats=args.train_iters, warmup=1)
        rows.append({"what": what, "batch": batch, "seconds_per_iteration": sec, "samples_per_s": batch / sec})
        rows[-1].update(pk.as_dict())
    rows[0]["loader_share"] = 1.0 - rows[1]["seconds_per_iteration"] / rows[0]["seconds_per_iteration"]
    del augment
    return rows


def levers(case: dict, pre: dict, nets, args, device, outdir: Path) -> dict:
    """Each speed lever measured on its own."""
    out: dict = {}
    spatial = tuple(pre["image"].shape[1:])
    # 1. tile choice: FLOPs of the tiles that run, budget-only vs mask-aware, passes independent vs shared encoder
    from custom.candidates import candidate_region

    c1 = pre["c1"][0]
    c2 = torch.as_tensor(candidate_region(pre["label"][0].numpy().round().astype(np.uint8), 3, body=c1.numpy() > 0))
    rows = []
    budget = 4 * 2**30 if device.type == "cpu" else 40 * 2**30
    choices = (("budget only", False, False), ("mask-aware", True, False), ("mask-aware + shared encoder", True, True))
    for st, mask, r in (("stage1 (C1)", c1, args.stage1_overlap), ("stage2 (C2)", c2, args.stage2_overlap)):
        for name, aware, shared in choices:
            if shared and r == 1:
                continue
            inf = ValidTiledInferer(overlap=r, mask_aware=aware, share_encoder=shared)
            t0 = time.perf_counter()
            tile = inf.choose_tile_size(
                spatial,
                budget,
                out_channels=args.classes,
                features=args.features,
                elem_bytes=4 if args.fp32 else 2,
                device_type=device.type,
                mask=mask[None, None] if aware else None,
                shared=shared,
            )
            choose = time.perf_counter() - t0
            runs, tiles, flops = plan_cost(inf, spatial, tile, mask, shared, args)
            rows.append(
                {
                    "stage": st,
                    "overlap": r,
                    "choice": name,
                    "tile": list(tile),
                    "tiles_run": runs,
                    "encoder_tiles": tiles,
                    "tiles_total": sum(len(p.starts) for p in inf.plan(spatial, tile)),
                    "tflop": flops / 1e12,
                    "choose_seconds": choose,
                }
            )
        pt = ValidTiledInferer(mode="paper", overlap=1 if st.startswith("stage1") else args.stage2_overlap)
        runs, tiles, flops = plan_cost(pt, spatial, None, mask, False, args)
        rows.append(
            {
                "stage": st,
                "overlap": pt.overlap,
                "choice": "paper tiles",
                "tile": list(pt.plan(spatial)[0].tile_size),
                "tiles_run": runs,
                "encoder_tiles": tiles,
                "tiles_total": sum(len(p.starts) for p in pt.plan(spatial)),
                "tflop": flops / 1e12,
                "choose_seconds": 0.0,
            }
        )
    out["tile_choice"] = rows
    log("levers: tile choice done")

    # 2. precision, layout and BatchNorm folding: one tile through the inferer (paper-size input 132x132x116)
    tile = (44, 44, 28)
    x = torch.randn(1, 1, *tile, device=device)
    prec = []
    configs = [
        ("fp32, NCDHW, BN unfolded", dict(amp=False, channels_last=False, fold_bn=False)),
        ("fp32, channels_last_3d, BN unfolded", dict(amp=False, channels_last=True, fold_bn=False)),
        ("fp32, channels_last_3d, BN folded", dict(amp=False, channels_last=True, fold_bn=True)),
        ("bf16 autocast, channels_last_3d, BN unfolded", dict(amp=True, channels_last=True, fold_bn=False)),
        ("bf16, channels_last_3d, BN folded", dict(amp=True, channels_last=True, fold_bn=True)),
        ("auto (the default)", dict()),
    ]
    if args.compile:
        configs.append(("bf16, channels_last_3d, BN folded, torch.compile", dict(compile=True)))
    for name, kw in configs:
        inf = ValidTiledInferer(tile_size=tile, **kw)
        sec, _ = timed(lambda inf=inf: inf(x, nets[1]), device, repeats=args.repeats, warmup=1)
        fl = forward_flops([t + 88 for t in tile], 1, args.classes, args.features)
        prec.append({"config": name, "seconds_per_tile": sec, "tflop_per_s": fl / sec / 1e12})
        log(f"levers: {name}: {sec:.3f} s/tile")
    out["precision"] = prec

    # 3. back to the input grid: argmax labels (uint8, nearest; the runner's path) vs 8 float probabilities (linear)
    from monai.data import MetaTensor
    from monai.transforms import Compose, Invertd

    cp = parser_for("common.json", load_keys=["image"], load_modes=["bilinear"])
    if args.target_spacing:
        cp["target_spacing"] = args.target_spacing
    pre_img = Compose(cp.get_parsed_content("preprocessing_transforms"))
    d = pre_img({"image": case["image"]})
    img = d["image"]
    prob = torch.softmax(torch.randn(args.classes, *img.shape[1:]), 0)
    lab = prob.argmax(0, keepdim=True).to(torch.uint8)
    from custom.cascade import nearest_to_input_grid

    back = []
    ref = None
    for name, t, nearest in (
        ("Invertd: argmax labels, uint8, nearest", lab, True),
        ("Invertd: probabilities, float32, linear", prob, False),
    ):
        mt = MetaTensor(t, meta=dict(img.meta), applied_operations=list(img.applied_operations))
        inv = Invertd(keys="x", transform=pre_img, orig_keys="image", nearest_interp=nearest)
        with Peak(torch.device("cpu")) as pk:
            res = inv({"image": img, "x": mt})["x"]
        back.append({"what": name, "seconds": pk.seconds, "shape": list(res.shape), **pk.as_dict()})
        log(f"levers: resample back {name}: {pk.seconds:.2f} s")
        if nearest:
            ref = np.asarray(res[0].round().numpy(), dtype=np.uint8)
        del res, mt
    mt = MetaTensor(lab, meta=dict(img.meta), applied_operations=list(img.applied_operations))
    with Peak(torch.device("cpu")) as pk:
        fast = nearest_to_input_grid(mt, img)
    if fast is not None:
        differ = int((fast != ref).sum())
        back.append(
            {
                "what": f"index gathers (runner): argmax labels, uint8 ({differ} voxels differ from Invertd)",
                "seconds": pk.seconds,
                "shape": list(fast.shape),
                **pk.as_dict(),
            }
        )
        log(f"levers: resample back by index gathers: {pk.seconds:.2f} s, {differ} voxels differ from Invertd")
    del ref, fast
    out["resample_back"] = back
    del prob

    # 4. C1 on the working grid (what the config does) vs on the full-resolution grid
    from monai.transforms import LoadImaged, Orientationd

    from custom.body_mask import BodyMaskd

    full = Orientationd("image", "RAS")(LoadImaged("image", ensure_channel_first=True)({"image": case["image"]}))
    spacing_t = next(t for t in cp.get_parsed_content("preprocessing_transforms") if type(t).__name__ == "Spacingd")
    working = spacing_t(dict(full))
    thr = cp.get_parsed_content("body_threshold")
    c1_rows = []
    for name, dd in (("working grid", working), ("full resolution", full)):
        sec, _ = timed(lambda dd=dd: BodyMaskd("image", mask_key="c1", threshold=thr)(dict(dd)), torch.device("cpu"))
        c1_rows.append({"grid": name, "shape": list(dd["image"].shape[1:]), "seconds": sec})
    out["c1"] = c1_rows
    del full, working

    # 5. writing the label map: gzip level (nibabel's default is 1) and uncompressed
    import nibabel as nib

    seg = np.asarray(nib.load(case["label"]).dataobj).astype(np.uint8)
    aff = nib.load(case["label"]).affine
    wr = []
    for name, level in (
        ("gzip level 1 (default)", 1),
        ("gzip level 6", 6),
        ("gzip level 9", 9),
        ("uncompressed", None),
    ):
        path = outdir / ("seg_write.nii" if level is None else f"seg_write_{level}.nii.gz")
        from nibabel.openers import Opener

        old = Opener.default_compresslevel
        try:
            if level is not None:
                Opener.default_compresslevel = level
            t0 = time.perf_counter()
            nib.save(nib.Nifti1Image(seg, aff), str(path))
            sec = time.perf_counter() - t0
        finally:
            Opener.default_compresslevel = old
        wr.append({"what": name, "seconds": sec, "mb": path.stat().st_size / 2**20})
    out["write"] = wr
    return out


def _amp_list(text: str) -> list:
    return [precision_mod.auto_or_bool(a, "amp") for a in text.split(",") if a.strip()]


def _min_median(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "runs": list(xs)}


def precision_matrix(args, device, workdir: Path) -> dict:
    """float32 vs bfloat16 vs ``auto`` in one process: the whole case at the demo's width and grid (``demo.json``:
    8 features, 3 mm) and one paper tile's forward at each ``--precision-widths``; a forced ``amp`` runs
    channels-last, ``auto`` chooses the layout too; repeats interleaved (ABC ABC),
    so that other load on the machine hits every setting alike. Every ``auto`` case starts with an empty decision
    cache, so it pays its probe as a fresh ``monai.bundle run`` does."""
    out: dict = {"machine": runtime.cpu_info(), "case": [], "tile": []}
    demo = parser_for("common.json", "demo.json")
    f_demo = 2 if args.quick else int(demo.get_parsed_content("features"))
    spacing = [6.0] * 3 if args.quick else list(demo.get_parsed_content("target_spacing"))
    reps = args.precision_repeats
    case_amps = _amp_list(args.precision_case_amps)
    if case_amps:
        kw = {"preset": "tiny"} if args.quick else {"preset": "full", "spacing": (args.spacing,) * 3}
        if not args.quick:
            kw["n_slices"] = args.n_slices
        case = write_phantom(workdir, args.seed, **kw)
        pre = preprocess_with_label(case, spacing)
        nets = tuple(make_net(f_demo, args.classes, s, device) for s in (1, 2))
        sub = argparse.Namespace(**{**vars(args), "target_spacing": spacing, "features": f_demo})
        runs: dict = {str(a): [] for a in case_amps}
        for rep in range(reps):
            for amp in case_amps:
                if amp == "auto":
                    precision_mod.PRECISION_CACHE.clear()
                sub.amp = amp
                row = run_cascade(case, pre, nets, "project", sub, device, workdir / "precision")
                runs[str(amp)].append(row)
                log(f"precision case amp={amp} repeat {rep}: total {row['total']:.1f} s")
        for amp in case_amps:
            rows = runs[str(amp)]
            st = rows[-1]["stages"]
            out["case"].append(
                {
                    "amp": str(amp),
                    "features": f_demo,
                    "target_spacing": spacing,
                    "working_shape": rows[-1]["working_shape"],
                    "total": _min_median([r["total"] for r in rows]),
                    "networks": _min_median([r["stage1"] + r["stage2"] for r in rows]),
                    "chosen": {k: st[k].get("precision") for k in ("stage1", "stage2")},
                    "chosen_per_run": [
                        "/".join(str(r["stages"][k].get("dtype")) for k in ("stage1", "stage2")) for r in rows
                    ],
                    "load_average_1min": [r.get("load_average_1min") for r in rows],
                }
            )
        del pre, nets
        gc.collect()
    tile = (44, 44, 28)
    tile_amps = _amp_list(args.precision_tile_amps)
    for f in [int(w) for w in args.precision_widths.split(",") if w.strip()]:
        if not tile_amps:
            break
        net = make_net(f, args.classes, 1, device)
        x = torch.randn(1, 1, *tile, generator=torch.Generator().manual_seed(0)).to(device)
        infs = {
            str(a): ValidTiledInferer(
                mode="paper", tile_size=tile, amp=a, channels_last="auto" if a == "auto" else True
            )
            for a in tile_amps
        }
        times: dict = {k: [] for k in infs}
        for inf in infs.values():  # warm-up (and auto's probe) untimed
            inf(x, net)
        for _ in range(reps + 1):
            for k, inf in infs.items():
                sec, _ = timed(lambda inf=inf, x=x, net=net: inf(x, net), device)
                times[k].append(sec)
        fl = forward_flops([t + 88 for t in tile], 1, args.classes, f)
        for k, inf in infs.items():
            out["tile"].append(
                {
                    "amp": k,
                    "features": f,
                    "seconds": _min_median(times[k]),
                    "tflop_per_s": fl / min(times[k]) / 1e12,
                    "chosen": inf.last_stats.get("precision"),
                }
            )
            log(f"precision tile f={f} amp={k}: {min(times[k]):.3f} s (min)")
    return out


# ----------------------------------------------------------------------------------------------------------- report
def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def report(res: dict) -> str:
    L = [
        f"Device: {res['device_name']}; torch {res['torch']}, monai {res['monai_version']}; {res['date']}",
        f"CT {'x'.join(map(str, res['case']['shape']))} at {res['case']['spacing']} mm "
        f"({res['case']['file_mb']:.0f} MB .nii.gz); features {res['features']}, K = {res['classes']}, "
        f"amp {res['amp']}; stage 2 overlap R = {res['stage2_overlap']}; C2 from {res['c2']}",
        "",
    ]
    cas = res.get("cascade", [])
    if cas:
        w = cas[0].get("working_shape")
        L += [
            f"### Cascade, one case (working grid {'x'.join(map(str, w or []))}, "
            f"C1 {cas[0].get('c1_fraction', 0):.0%}, C2 {cas[0].get('c2_fraction', 0):.1%} of voxels)",
            "",
            "| variant | read | preprocess | stage 1 | C2 | stage 2 | back | write | total (s) | stage 1 tiles "
            "| stage 2 tiles | TFLOP 1 + 2 | peak RAM GB | peak GPU GB | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in cas:
            st = r.get("stages", {})
            tiles = []
            fl = 0.0
            for s in ("stage1", "stage2"):
                d = st.get(s, {})
                tiles.append(f"{d.get('tiles_run', '-')} x {'x'.join(map(str, d.get('tile_size') or []))}")
                fl += (d.get("flops") or 0) / 1e12
            L.append(
                f"| {r['variant']} | {_f(r.get('reading'))} | {_f(r.get('preprocessing'))} | {_f(r.get('stage1'))} "
                f"| {_f(r.get('c2'))} | {_f(r.get('stage2'))} | {_f(r.get('resample_back'))} | {_f(r.get('write'))} "
                f"| {_f(r.get('total'))} | {tiles[0]} | {tiles[1]} | {fl:.3g} | {_f(r.get('peak_ram_gb'), '{:.2f}')} "
                f"| {_f(r.get('peak_gpu_gb'), '{:.2f}')} | {_f(r.get('load_average_1min'))} |"
            )
        by = {r["variant"]: r for r in cas}
        ref = by.get("paper") or by.get("paper (extrapolated)")
        if ref and "project" in by:
            a = ref["stage1"] + ref["stage2"]
            b = by["project"]["stage1"] + by["project"]["stage2"]
            L += ["", f"Network stages, paper tiling / project: {a:.1f} s / {b:.1f} s = **{a / b:.2f}x**"]
        steps = cas[0].get("preprocessing_steps")
        if steps:
            L += ["", "Preprocessing steps (s): " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items())]
        L.append("")
    if res.get("monai"):
        L += ["### MONAI reference: spleen-bundle UNet, sliding_window_inference 96^3, sw_batch_size 4", ""]
        L += ["| overlap | seconds | peak RAM GB | peak GPU GB |", "|---|---|---|---|"]
        for r in res["monai"]:
            L.append(
                f"| {r['overlap']} | {r['seconds']:.2f} | {_f(r['peak_ram_gb'], '{:.2f}')} "
                f"| {_f(r['peak_gpu_gb'], '{:.2f}')} |"
            )
        L.append("")
    if res.get("train"):
        L += [f"### Training throughput, patch {'x'.join(map(str, res['patch']))}", ""]
        L += ["| what | batch | s / iteration | samples / s | peak RAM GB | peak GPU GB |", "|---|---|---|---|---|---|"]
        for r in res["train"]:
            L.append(
                f"| {r['what']} | {r['batch']} | {r['seconds_per_iteration']:.3f} | {r['samples_per_s']:.2f} "
                f"| {_f(r.get('peak_ram_gb'), '{:.2f}')} | {_f(r.get('peak_gpu_gb'), '{:.2f}')} |"
            )
        L.append("")
    lv = res.get("levers")
    if lv:
        L += [
            "### Levers",
            "",
            "| stage | R | tile choice | output tile | tiles run / all (positions) | TFLOP | choice s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in lv["tile_choice"]:
            L.append(
                f"| {r['stage']} | {r['overlap']} | {r['choice']} | {'x'.join(map(str, r['tile']))} | "
                f"{r['tiles_run']} / {r['tiles_total']} ({r['encoder_tiles']}) | {r['tflop']:.3g} | "
                f"{r['choose_seconds']:.2f} |"
            )
        L += ["", "| one 132x132x116 tile | s / tile | TFLOP/s |", "|---|---|---|"]
        for r in lv["precision"]:
            L.append(f"| {r['config']} | {r['seconds_per_tile']:.3f} | {r['tflop_per_s']:.3f} |")
        L += ["", "| back to the input grid | s | peak RAM GB |", "|---|---|---|"]
        for r in lv["resample_back"]:
            L.append(f"| {r['what']} | {r['seconds']:.2f} | {_f(r['peak_ram_gb'], '{:.2f}')} |")
        L += ["", "| C1 (BodyMaskd) on | shape | s |", "|---|---|---|"]
        for r in lv["c1"]:
            L.append(f"| {r['grid']} | {'x'.join(map(str, r['shape']))} | {r['seconds']:.2f} |")
        L += ["", "| write the label map | s | MB |", "|---|---|---|"]
        for r in lv["write"]:
            L.append(f"| {r['what']} | {r['seconds']:.2f} | {r['mb']:.1f} |")
        L.append("")
    pm = res.get("precision")
    if pm:
        m = pm["machine"]
        L += [
            "### Precision: float32 vs bfloat16 vs auto (same process, interleaved)",
            "",
            f"CPU {m['model']} ({m['usable_cpus']} usable cores, torch threads {m['torch_threads']}); ISA "
            f"{' '.join(m['isa_flags']) or '-'}; ONEDNN_MAX_CPU_ISA {m['onednn_max_cpu_isa'] or 'unset'}; "
            f"oneDNN native bf16: {m['mkldnn_bf16_supported']}",
            "",
        ]

        def chosen(c):
            return "-" if not c else f"{c['dtype']}, {'CL' if c['channels_last'] else 'NCDHW'} ({c['source']})"

        if pm["case"]:
            c0 = pm["case"][0]
            L += [
                f"Whole case (inference.json's evaluator), f = {c0['features']}, {c0['target_spacing'][0]} mm grid "
                f"{'x'.join(map(str, c0['working_shape']))}:",
                "",
                "| amp | total s (min / median) | networks s (min / median) | chosen (stage 1) | load |",
                "|---|---|---|---|---|",
            ]
            for r in pm["case"]:
                loads = ", ".join(_f(v) for v in r["load_average_1min"])
                L.append(
                    f"| {r['amp']} | {r['total']['min']:.1f} / {r['total']['median']:.1f} | "
                    f"{r['networks']['min']:.1f} / {r['networks']['median']:.1f} | {chosen(r['chosen']['stage1'])} "
                    f"| {loads} |"
                )
            L.append("")
        if pm["tile"]:
            L += [
                "One paper tile (132x132x116 input) forward:",
                "",
                "| features | amp | s / tile (min / median) | TFLOP/s | chosen |",
                "|---|---|---|---|---|",
            ]
            for r in pm["tile"]:
                L.append(
                    f"| {r['features']} | {r['amp']} | {r['seconds']['min']:.3f} / {r['seconds']['median']:.3f} | "
                    f"{r['tflop_per_s']:.3f} | {chosen(r['chosen'])} |"
                )
            L.append("")
    lg = res.get("large")
    if lg:
        L += [
            f"### Large CT {'x'.join(map(str, lg['case']['shape']))} (features {lg['features']})",
            "",
            f"total {lg['total']:.1f} s (stage 1 {lg['stage1']:.1f}, stage 2 {lg['stage2']:.1f}); "
            f"peak RAM {_f(lg.get('peak_ram_gb'), '{:.2f}')} GB (process held {lg['ram_before_gb']:.2f} GB before); "
            f"peak GPU {_f(lg.get('peak_gpu_gb'), '{:.2f}')} GB",
            "",
        ]
    return "\n".join(L)


# ------------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny phantom, features 2, coarse grid")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--workdir", default=None, help="where the phantom CTs and outputs go (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    p.add_argument("--n-slices", type=int, default=400)
    p.add_argument("--spacing", type=float, default=0.8, help="phantom voxel spacing (mm, all axes)")
    p.add_argument("--features", type=int, default=None, help="network width f (default 32, --quick 2)")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--fp32", action="store_true", help="float32 everywhere (same as --amp false)")
    p.add_argument("--amp", default="auto", help="inferer precision: auto (default, as the configs), true, false")
    p.add_argument("--compile", action="store_true", help="torch.compile the folded networks (CUDA)")
    p.add_argument("--stage1-overlap", type=int, default=1)
    p.add_argument("--stage2-overlap", type=int, default=4, help="R of stage 2 for every variant (default 4)")
    p.add_argument("--c2", choices=("label", "prediction"), default="label")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {list(VARIANTS)}")
    p.add_argument("--paper-extrapolate", action="store_true", help="paper rows from timed tiles x tiles that run")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of short measurements (default 3, CPU 1)")
    p.add_argument("--train-iters", type=int, default=None, help="timed training iterations (default 5, CPU 2)")
    p.add_argument("--num-workers", type=int, default=2, help="training data-loader workers (train.json: 2)")
    p.add_argument("--large-slices", type=int, default=1000)
    p.add_argument("--large-features", type=int, default=None, help="network width for the large CT (default f)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision-repeats", type=int, default=2, help="interleaved repeats of the precision rows")
    p.add_argument("--precision-case-amps", default="false,true,auto", help="amp values of the whole-case rows")
    p.add_argument("--precision-tile-amps", default="false,true,auto", help="amp values of the tile rows")
    p.add_argument("--precision-widths", default=None, help="network widths of the tile rows (default 8,32)")
    for s in ("cascade", "paper", "monai", "train", "levers", "precision", "large"):
        p.add_argument(f"--skip-{s}", action="store_true")
    args = p.parse_args(argv)
    args.amp = False if args.fp32 else precision_mod.auto_or_bool(args.amp, "amp")
    args.precision_widths = args.precision_widths or ("2" if args.quick else "8,32")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = device.type == "cpu"
    args.features = args.features or (2 if args.quick else 32)
    args.repeats = args.repeats or (1 if cpu else 3)
    args.train_iters = args.train_iters or (2 if cpu else 5)
    args.target_spacing = [6.0, 6.0, 6.0] if args.quick else None
    args.patch = [100, 100, 92] if args.quick else list(PATCH)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    if args.skip_paper or args.paper_extrapolate:
        variants = [v for v in variants if v != "paper"]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_cascade_"))
    workdir.mkdir(parents=True, exist_ok=True)

    import monai

    res: dict = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "monai_version": monai.__version__,
        "date": datetime.date.today().isoformat(),
        "features": args.features,
        "classes": args.classes,
        "fp32": args.fp32,
        "amp": args.amp,
        "machine": runtime.cpu_info(),
        "stage2_overlap": args.stage2_overlap,
        "c2": args.c2,
        "patch": args.patch,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    if args.quick:
        kw = {"preset": "tiny"}
    else:
        kw = {"preset": "full", "spacing": (args.spacing,) * 3, "n_slices": args.n_slices}
    log(f"phantom CT ({kw}) -> {workdir}")
    case = write_phantom(workdir, args.seed, **kw)
    res["case"] = {k: v for k, v in case.items() if k != "labels"}
    pre = preprocess_with_label(case, args.target_spacing)
    nets = (
        make_net(args.features, args.classes, 1, device),
        make_net(args.features, args.classes, 2, device),
    )

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, default=str))

    if not args.skip_cascade:
        res["cascade"] = []
        for v in variants:
            res["cascade"].append(run_cascade(case, pre, nets, v, args, device, workdir))
            save()
        if args.paper_extrapolate and not args.skip_paper:
            row = paper_extrapolated(pre, nets, args, device)
            res["cascade"].append(row)
            save()
    if not args.skip_monai:
        res["monai"] = monai_reference(pre, args, device)
        save()
    if not args.skip_train:
        res["train"] = training(pre, args, device)
        save()
    if not args.skip_levers:
        res["levers"] = levers(case, pre, nets, args, device, workdir)
        save()
    if not args.skip_precision:
        res["precision"] = precision_matrix(args, device, workdir)
        save()
    if not args.skip_large:
        del pre
        gc.collect()
        if args.quick:
            lkw = {"preset": "tiny", "n_slices": 2 * args.n_slices // 8}
        else:
            lkw = {"preset": "full", "spacing": (args.spacing,) * 3, "n_slices": args.large_slices}
        log(f"large CT ({lkw})")
        big = write_phantom(workdir, args.seed, **lkw)
        big_pre = preprocess_with_label(big, args.target_spacing)
        lf = args.large_features or args.features
        big_nets = nets if lf == args.features else tuple(make_net(lf, args.classes, s, device) for s in (1, 2))
        row = run_cascade(big, big_pre, big_nets, "project", args, device, workdir / "large")
        row["case"] = {k: v for k, v in big.items() if k != "labels"}
        row["features"] = lf
        res["large"] = row
        save()
    text = report(res)
    print(text)
    res["markdown"] = text
    save()
    return res


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
