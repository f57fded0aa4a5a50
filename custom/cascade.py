"""The cascade at inference: stage 1 inside C1, C2 from its dilated foreground, stage 2 inside C2, back to the input.

:class:`CascadeInferer` chains the two tiled inferers (a MONAI ``Inferer``: usable by an evaluator);
:class:`CascadeRunner` is the batch front end used by ``bundle/configs/inference.json`` and ``evaluate.json``: one
case at a time, every output written in the input's own geometry (same voxel order, shape and affine), a per-case QC
JSON and preview, and a failing case logged and skipped so the others still run (the run then exits non-zero with a
summary). Probabilities are never resampled back unless asked: labels are taken by argmax at the working resolution
and resampled with nearest neighbour, as the paper does for labels (8 classes of float probabilities at full
resolution are GBs). :class:`OutOfFoldRunner` runs a runner fold by fold, each fold's cases with the stage-1 model
that did not train on them (out-of-fold C2 for training stage 2, ``candidates.json --out_of_fold true``).
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import Compose, Invertd

from custom.candidates import candidate_region, organ_flags
from custom.io import find_input_error, write_nifti_safely
from custom.metrics import candidate_recall_fpr, dice_per_class

logger = logging.getLogger(__name__)


def _as_mask_tensor(array: np.ndarray, like: torch.Tensor) -> MetaTensor:
    t = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.uint8)
    meta = dict(like.meta) if isinstance(like, MetaTensor) else {}
    ops = list(like.applied_operations) if isinstance(like, MetaTensor) else []
    return MetaTensor(t, meta=meta, applied_operations=ops)


def nearest_to_input_grid(labels: torch.Tensor | np.ndarray, image: MetaTensor) -> np.ndarray | None:
    """A working-grid label map (1, X, Y, Z) back on the input's voxel grid by nearest neighbour, as index gathers.

    When the input grid and the working grid are axis-aligned (the affine from input voxels to working voxels is a
    scaled permutation: orientation flips, axis swaps, resampling, crops and pads; no rotation), every input voxel's
    nearest working voxel follows from one index per axis, so the resampling is three gathers instead of a
    full-resolution interpolation grid: ~0.1 s instead of ~6-14 s for 512x512x400 on a 2-core CPU, and the same
    voxels as ``Invertd(nearest_interp=True)`` except at exact ties (an input voxel midway between two working voxels:
    both are nearest; here ties round half to even in float64, Invertd's float32 grid may pick the other one). Returns
    None when it does not apply (oblique grids, input voxels beyond the working grid's border voxels, missing
    metadata): the caller then uses ``Invertd``.
    """
    meta = getattr(image, "meta", None) or {}
    if "original_affine" not in meta or "spatial_shape" not in meta:
        return None
    a_in = np.asarray(meta["original_affine"], dtype=np.float64)
    a_work = np.asarray(image.affine, dtype=np.float64)
    shape = [int(s) for s in np.asarray(meta["spatial_shape"]).tolist()]
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    arr = arr[0] if arr.ndim == 4 else arr
    if a_in.shape != (4, 4) or a_work.shape != (4, 4) or arr.ndim != 3 or len(shape) != 3:
        return None
    m = np.linalg.inv(a_work) @ a_in  # input voxel index -> working voxel index
    rot = m[:3, :3]
    src = np.argmax(np.abs(rot), axis=1)  # the input axis each working axis follows
    if sorted(src.tolist()) != [0, 1, 2]:
        return None
    off = rot.copy()
    off[np.arange(3), src] = 0.0
    if np.abs(off).max() > 1e-6 * np.abs(rot).max():
        return None
    g = arr
    for a in range(3):
        pos = rot[a, src[a]] * np.arange(shape[src[a]]) + m[a, 3]
        n = arr.shape[a]
        if pos.min() < -0.5 - 1e-6 or pos.max() > n - 0.5 + 1e-6:
            return None  # input voxels beyond the working grid's border voxels
        idx = np.clip(np.rint(pos).astype(np.int64), 0, n - 1)  # a tie at the border: the voxel inside
        g = np.take(g, idx, axis=a)  # working axis a now runs over input axis src[a]
    return np.ascontiguousarray(np.transpose(g, np.argsort(src)), dtype=np.uint8)


class CascadeInferer(Inferer):
    """Stage 1 (inside C1) → C2 = dilated stage-1 foreground ∩ C1 → stage 2 (inside C2).

    ``__call__(inputs, network, mask=c1)`` returns the stage-2 probabilities (B, K, ...); ``network`` is the stage-2
    network (so MONAI's evaluator can own it), ``stage1_network`` is held here. After a call, ``last_outputs`` holds
    ``stage1`` (argmax labels) and ``c2`` as (B, 1, ...) uint8 tensors, and ``last_stats`` the per-stage tile counts,
    candidate fractions, seconds and organ flags.

    When an organ is missing or implausibly small in the stage-1 output (``min_organ_ml``), the case is flagged and
    C2 uses ``fallback`` (see :func:`custom.candidates.candidate_region` / ``CandidateRegiond``): the default widens the
    candidate region instead of letting stage 2 miss the organ.
    """

    def __init__(
        self,
        stage1_network: torch.nn.Module,
        stage1_inferer: Inferer,
        stage2_inferer: Inferer,
        radius: int = 3,
        element: str = "ball",
        labels: Mapping[str, int] | None = None,
        min_organ_ml: float | Mapping[str, float] | None = None,
        spacing: Sequence[float] | None = None,
    ):
        super().__init__()
        self.stage1_network = stage1_network
        self.stage1_inferer = stage1_inferer
        self.stage2_inferer = stage2_inferer
        self.radius = radius
        self.element = element
        self.labels = dict(labels) if labels else None
        self.min_organ_ml = min_organ_ml
        self.spacing = spacing
        self.last_outputs: dict[str, torch.Tensor] = {}
        self.last_stats: dict = {}

    def stage1(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        prob = self.stage1_inferer(inputs, self.stage1_network, mask=mask)
        labels = prob.argmax(1, keepdim=True).to(torch.uint8)
        self.last_stats["stage1"] = {
            **getattr(self.stage1_inferer, "last_stats", {}),
            "seconds": time.perf_counter() - t0,
        }
        return labels

    def candidates(self, stage1_labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """C2 for each batch item: dilated stage-1 foreground ∩ C1 (computed on the CPU with a distance transform)."""
        t0 = time.perf_counter()
        out, flags = [], []
        for b in range(stage1_labels.shape[0]):
            pred = stage1_labels[b, 0].cpu().numpy()
            body = None if mask is None else mask[b, 0].cpu().numpy().astype(bool)
            c2 = candidate_region(pred, radius=self.radius, element=self.element, body=body)
            if self.labels and self.min_organ_ml is not None:
                vox_ml = float(np.prod(self._spacing(stage1_labels))) / 1000.0
                bad = organ_flags(pred, self.labels, vox_ml, self.min_organ_ml)
                if bad:
                    # fallback: a missing/too-small organ must not vanish from stage 2; keep the whole body region
                    logger.warning("stage-1 organs missing or too small %s: C2 falls back to C1 for this case", bad)
                    c2 = body if body is not None else np.ones_like(c2)
                flags.append(bad)
            if not c2.any():  # nothing to crop or tile: stage 2 runs no tile and the case comes out as background
                logger.warning(
                    "stage 1 found no foreground%s: C2 is empty, stage 2 is skipped and the output is background",
                    f" (batch item {b})" if stage1_labels.shape[0] > 1 else "",
                )
            out.append(torch.as_tensor(np.ascontiguousarray(c2))[None])
        c2 = torch.stack(out).to(torch.uint8)
        self.last_stats["c2"] = {
            "seconds": time.perf_counter() - t0,
            "fraction": float(c2.float().mean()),
            "flags": flags,
        }
        return c2

    def stage2(self, inputs, network, c2, inferer: Inferer | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        inferer = inferer or self.stage2_inferer
        prob = inferer(inputs, network, mask=c2.to(inputs.device))
        self.last_stats["stage2"] = {**getattr(inferer, "last_stats", {}), "seconds": time.perf_counter() - t0}
        return prob

    def _spacing(self, t: torch.Tensor) -> Sequence[float]:
        if self.spacing is not None:
            return self.spacing
        if isinstance(t, MetaTensor):
            return [float(s) for s in t.pixdim[: t.ndim - 2]]
        return [1.0, 1.0, 1.0]

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, mask: torch.Tensor | None = None, **kwargs):
        self.last_stats = {}
        lab1 = self.stage1(inputs, mask)
        c2 = self.candidates(lab1, mask)
        prob = self.stage2(inputs, network, c2)
        self.last_outputs = {
            "stage1": _as_mask_tensor(lab1.cpu().numpy(), inputs),
            "c2": _as_mask_tensor(c2.numpy(), inputs),
        }
        return prob


class CascadeRunner:
    """Runs the cascade over a list of cases and writes every output in the input's geometry.

    Args:
        data: case dicts with ``image`` (a NIfTI file or a DICOM series folder), ``case_id`` and, for evaluation,
            ``label``; see :func:`custom.io.list_inputs`.
        preprocessing: the deterministic preprocessing (``preprocessing_transforms`` of common.json); it must produce
            ``image`` and the body mask ``c1``; its spatial steps are inverted to go back to the input geometry.
        cascade: a :class:`CascadeInferer` (holds stage 1). ``stage2_network``: the stage-2 network.
        output_dir: where ``<case>_seg.nii.gz`` (and the optional outputs) go.
        save: which optional outputs to write: any of ``probabilities``, ``c1``, ``stage1``, ``c2``, ``qc``,
            ``preview``.
        stage2_variants: extra stage-2 inferers evaluated on the same C2 (e.g. ``{"stage2_ol": <overlap 4>}``);
            only the main one (``stage2``) is written as the label map.
        evaluate: compare with ``label`` and write ``metrics.csv`` (per case, per stage, per organ) and
            ``c2_recall_fpr.csv``.
        overwrite: existing outputs are an error unless True (checked for every case before any computation).
        stage1_only: stop after C2 (the step that writes candidate regions for stage-2 training).
        c2_source: ``"prediction"`` (paper: the stage-1 prediction, dilated) or ``"label"`` (the authors' code for
            training stage 2: the dilated ground truth).
    """

    def __init__(
        self,
        data: Sequence[Mapping],
        preprocessing: Compose,
        cascade: CascadeInferer,
        stage2_network: torch.nn.Module | None,
        output_dir: str,
        labels: Mapping[str, int],
        device: str | torch.device = "cpu",
        save: Sequence[str] = ("qc", "preview"),
        stage2_variants: Mapping[str, Inferer] | None = None,
        evaluate: bool = False,
        overwrite: bool = False,
        stage1_only: bool = False,
        radii: Sequence[int] = tuple(range(7)),
        progress: bool = True,
        c2_source: str = "prediction",
    ):
        self.data = list(data)
        if not self.data:
            raise ValueError("no input cases: the input list is empty")
        self.preprocessing = preprocessing
        self.cascade = cascade
        self.stage2_network = stage2_network
        self.output_dir = Path(output_dir)
        self.labels = dict(labels)
        self.device = torch.device(device)
        self.save = set(save)
        unknown = self.save - {"probabilities", "c1", "stage1", "c2", "qc", "preview"}
        if unknown:
            raise ValueError(f"unknown outputs to save: {sorted(unknown)}")
        self.stage2_variants = dict(stage2_variants or {})
        self.evaluate = evaluate
        self.overwrite = overwrite
        self.stage1_only = stage1_only
        self.radii = list(radii)
        self.progress = progress
        if c2_source not in ("prediction", "label"):
            raise ValueError(f"c2_source must be 'prediction' (paper) or 'label' (authors' code), got {c2_source!r}")
        self.c2_source = c2_source
        self.failures: list[dict] = []
        self.metrics_rows: list[dict] = []
        self.c2_rows: list[dict] = []

    # -- outputs -------------------------------------------------------------------------------------------------
    def planned_outputs(self, case_id: str) -> dict[str, Path]:
        o = self.output_dir
        if self.stage1_only:
            out = {"c2": o / f"{case_id}_c2.nii.gz", "stage1": o / f"{case_id}_stage1.nii.gz"}
        else:
            out = {"seg": o / f"{case_id}_seg.nii.gz"}
            for k in ("c1", "stage1", "c2"):
                if k in self.save:
                    out[k] = o / f"{case_id}_{k}.nii.gz"
            if "probabilities" in self.save:
                out["probabilities"] = o / f"{case_id}_prob.nii.gz"
        if "qc" in self.save:
            out["qc"] = o / f"{case_id}_qc.json"
        if "preview" in self.save and not self.stage1_only:
            out["preview"] = o / f"{case_id}_preview.png"
        return out

    def _check_existing(self) -> None:
        if self.overwrite:
            return
        existing = [str(p) for c in self.data for p in self.planned_outputs(c["case_id"]).values() if p.exists()]
        if existing:
            raise FileExistsError(
                f"{len(existing)} output file(s) already exist and overwrite is off (pass --overwrite true to replace "
                f"them): {', '.join(existing[:5])}{' ...' if len(existing) > 5 else ''}"
            )

    # -- one case ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run_case(self, case: Mapping) -> dict:
        case_id = case["case_id"]
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        d = self.preprocessing(dict(case))
        timings["read_preprocess"] = time.perf_counter() - t0
        image = d["image"][None].to(self.device)
        c1 = d["c1"][None].to(self.device)
        self.cascade.last_stats = {}
        lab1 = self.cascade.stage1(image, c1)
        if self.c2_source == "label":  # the authors' code: C2 from the dilated ground truth when training stage 2
            if "label" not in d:
                raise ValueError(f"{case.get('image')}: c2_source='label' needs the case's label")
            c2 = self.cascade.candidates(d["label"][None].round().to(torch.uint8), c1)
        else:
            c2 = self.cascade.candidates(lab1, c1)
        stats = dict(self.cascade.last_stats)
        timings["stage1"] = stats["stage1"]["seconds"]
        timings["c2"] = stats["c2"]["seconds"]
        preds: dict[str, torch.Tensor] = {}
        prob_main = None
        if not self.stage1_only:
            prob_main = self.cascade.stage2(image, self.stage2_network, c2)
            stats["stage2"] = self.cascade.last_stats["stage2"]
            timings["stage2"] = stats["stage2"]["seconds"]
            preds["stage2"] = prob_main.argmax(1, keepdim=True).to(torch.uint8)
            for name, inferer in self.stage2_variants.items():
                p = self.cascade.stage2(image, self.stage2_network, c2, inferer)
                stats[name] = self.cascade.last_stats["stage2"]
                timings[name] = stats[name]["seconds"]
                preds[name] = p.argmax(1, keepdim=True).to(torch.uint8)

        # back to the input geometry: argmax labels with nearest neighbour (never 8 float channels at full size)
        t1 = time.perf_counter()
        img = d["image"]
        work = {
            "image": img,
            "c1": _as_mask_tensor(d["c1"].cpu().numpy(), img),
            "stage1": _as_mask_tensor(lab1[0].cpu().numpy(), img),
            "c2": _as_mask_tensor(c2[0].numpy(), img),
        }
        for name, p in preds.items():
            work[name] = _as_mask_tensor(p[0].cpu().numpy(), img)
        paths = self.planned_outputs(case_id)
        out_keys = {"c2": "c2", "stage1": "stage1", "c1": "c1", "seg": "stage2"}
        # only what is written, evaluated or measured goes back (each map is a full-resolution resampling)
        needed = set(preds) | {out_keys[k] for k in paths if k in out_keys}
        if (self.evaluate and "label" in case) or not preds:
            needed.add("stage1")
        orig = self._to_input_geometry({k: v for k, v in work.items() if k == "image" or k in needed}, list(preds))
        timings["resample_back"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        affine = np.asarray(d["image"].meta.get("original_affine", d["image"].affine), dtype=np.float64)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for key, path in paths.items():
            if key in out_keys and out_keys[key] in orig:
                write_nifti_safely(orig[out_keys[key]], affine, path, overwrite=self.overwrite)
        if "probabilities" in paths and prob_main is not None:
            self._write_probabilities(prob_main, d, paths["probabilities"])
        timings["write"] = time.perf_counter() - t2

        voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
        final = orig.get("stage2", orig.get("stage1"))
        volumes = {n: float((final == k).sum() * voxel_ml) for n, k in self.labels.items()}
        qc = {
            "case_id": case_id,
            "input": str(case["image"]),
            "shape": list(final.shape),
            "affine": affine.tolist(),
            "organ_volumes_ml": volumes,
            "empty_organs": [n for n, v in volumes.items() if v == 0.0],
            "stage1_flags": (stats["c2"].get("flags") or [[]])[0],
            "c1_fraction": float(d["c1"].float().mean()),
            "c2_fraction": stats["c2"]["fraction"],
            "tiles": {
                s: {
                    k: stats[s].get(k)
                    for k in ("tiles_run", "tiles_skipped", "candidate_fraction", "mode", "tile_size")
                }
                for s in stats
                if s != "c2"
            },
            "seconds": timings,
        }
        if qc["empty_organs"]:
            logger.warning("%s: no voxel of %s in the output", case_id, ", ".join(qc["empty_organs"]))
        if self.evaluate and "label" in case:
            self._evaluate(case, d, lab1, orig, preds)
        if "qc" in paths:
            tmp = paths["qc"].with_suffix(".json.tmp")
            tmp.write_text(json.dumps(qc, indent=2))
            tmp.replace(paths["qc"])
        if "preview" in paths:
            self._preview(d, preds.get("stage2", lab1), paths["preview"], case_id)
        qc["seconds"]["total"] = time.perf_counter() - t0
        return qc

    def _to_input_geometry(self, work: dict, pred_keys: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for key in [k for k in ("c1", "stage1", "c2", *pred_keys) if k in work]:
            fast = nearest_to_input_grid(work[key], work["image"])
            if fast is not None:
                out[key] = fast
                continue
            inv = Invertd(keys=key, transform=self.preprocessing, orig_keys="image", nearest_interp=True)
            res = inv({"image": work["image"], key: work[key]})[key]
            out[key] = np.asarray(res[0].round().cpu().numpy(), dtype=np.uint8)
        return out

    def _write_probabilities(self, prob: torch.Tensor, d: Mapping, path: Path) -> None:
        # linear interpolation for probabilities (paper); channel-last 4D NIfTI (float32: NIfTI has no float16)
        inv = Invertd(keys="prob", transform=self.preprocessing, orig_keys="image", nearest_interp=False)
        p = MetaTensor(
            prob[0].float().cpu(), meta=dict(d["image"].meta), applied_operations=list(d["image"].applied_operations)
        )
        res = inv({"image": d["image"], "prob": p})["prob"].cpu().numpy()
        affine = np.asarray(d["image"].meta.get("original_affine", d["image"].affine), dtype=np.float64)
        write_nifti_safely(np.moveaxis(res, 0, -1).astype(np.float32), affine, path, overwrite=self.overwrite)

    def _evaluate(self, case, d, lab1, orig, preds) -> None:
        import nibabel as nib

        gt = np.asarray(nib.load(str(case["label"])).dataobj).astype(np.int64)
        stages = {"stage1": orig["stage1"], **{k: orig[k] for k in preds}}
        for stage, pred in stages.items():
            if pred.shape != gt.shape:
                raise ValueError(f"{case['label']}: label shape {gt.shape} differs from the image's {pred.shape}")
            row = {"case_id": case["case_id"], "stage": stage, **dice_per_class(pred, gt, self.labels)}
            self.metrics_rows.append(row)
        if "label" in d:  # C2 recall / FPR against r on the working grid, where C2 is defined
            gt_w = d["label"][0].cpu().numpy().astype(np.int64)
            body = d["c1"][0].cpu().numpy().astype(bool)
            for row in candidate_recall_fpr(lab1[0, 0].cpu().numpy(), gt_w, body, self.labels, self.radii):
                self.c2_rows.append({"case_id": case["case_id"], **row})

    def _preview(self, d, lab, path: Path, case_id: str) -> None:
        from custom.preview import save_preview

        hu = d["image"][0].cpu().numpy() * 500.0  # the default window maps -500..500 HU to -1..1
        save_preview(
            hu,
            lab[0, 0].cpu().numpy(),
            np.asarray(d["image"].affine),
            path,
            label_names={v: k for k, v in self.labels.items()},
            title=case_id,
        )

    # -- all cases -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self._check_existing()
        cases = self.data
        if self.progress:
            from tqdm import tqdm

            cases = tqdm(cases, desc="cascade", unit="case")
        results = []
        for case in cases:
            try:
                results.append(self.run_case(case))
            except Exception as e:  # one bad case must not stop the batch
                e = find_input_error(e) or e  # MONAI's Compose wraps errors: report the file and the problem
                logger.error("case %s (%s) failed: %s", case.get("case_id"), case.get("image"), e)
                logger.debug(traceback.format_exc())
                self.failures.append({"case_id": case.get("case_id"), "image": str(case.get("image")), "error": str(e)})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.metrics_rows:
            _write_csv(self.output_dir / f"metrics{_rank_suffix()}.csv", self.metrics_rows)
        if self.c2_rows:
            _write_csv(self.output_dir / f"c2_recall_fpr{_rank_suffix()}.csv", self.c2_rows)
        summary = {
            "cases": len(self.data),
            "succeeded": len(results),
            "failed": self.failures,
            "seconds": {r["case_id"]: r["seconds"] for r in results},
        }
        (self.output_dir / f"summary{_rank_suffix()}.json").write_text(json.dumps(summary, indent=2))
        self.summary = summary
        return summary

    def exit_if_failed(self) -> None:
        """For the config's ``finalize``: a run with failed cases exits non-zero after listing them."""
        if self.failures:
            lines = [f"  {f['case_id']}: {f['image']}: {f['error']}" for f in self.failures]
            print(f"{len(self.failures)} of {len(self.data)} case(s) failed:\n" + "\n".join(lines), file=sys.stderr)
            sys.exit(1)


def _rank_suffix() -> str:
    """``_rank<r>`` when sharded over several processes (each writes its own summary), else empty."""
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        return f"_rank{torch.distributed.get_rank()}"
    return ""


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


class OutOfFoldRunner:
    """Candidate regions out of fold: each case's C2 comes from the stage-1 model whose validation fold held it.

    Why: stage 2 learns to segment inside C2 as stage 1 makes it on CTs it has never seen. A stage-1 model that
    trained on a case segments it better than it will segment an unseen CT, so C2 made by it is tighter and misses
    less than at test time, and stage 2 learns from regions nicer than those it will get. With one stage-1 model per
    fold (``train.json`` with ``fold=k``: trained on every fold but k, validated on fold k), every training case gets a
    C2 from a model that never trained on it.

    The folds are :func:`custom.workflow.datalist` with ``split="val"`` and ``fold=k`` on ``dataset_json``, the very
    call the training made, so they agree with it as long as ``n_folds`` and ``seed`` do. Fold ``k``'s weights
    (``fold_weights.format(fold=k)``) are loaded into the runner's stage-1 network and the runner goes over that
    fold's cases; outputs, failures and metrics rows accumulate in the runner as in one run, and ``summary.json``
    records which fold and weights file produced each case. Every weights file and every case's fold are checked, and
    existing outputs refused, before anything is computed. With ``fold_weights=None`` it is the runner's own run.

    Example (``candidates.json``, ``--out_of_fold true``)::

        {"_target_": "custom.cascade.OutOfFoldRunner", "runner": "@runner", "dataset_json": "@data_list_file_path",
         "fold_weights": "runs/stage1_fold{fold}/checkpoints/model_final.pt", "n_folds": 5, "seed": "@seed"}
    """

    def __init__(
        self,
        runner: CascadeRunner,
        fold_weights: str | None = None,
        dataset_json: str | None = None,
        n_folds: int = 5,
        seed: int = 0,
        sha256: str | None = None,
    ):
        self.runner = runner
        self.fold_weights = fold_weights
        self.dataset_json = dataset_json
        self.n_folds = int(n_folds)
        self.seed = int(seed)
        self.sha256 = sha256
        if fold_weights is not None:
            if "{fold}" not in str(fold_weights):
                raise ValueError(f"fold_weights must contain '{{fold}}' (one file per fold), got {fold_weights!r}")
            if dataset_json is None:
                raise ValueError("out-of-fold candidates need dataset_json: the dataset the folds were trained on")
        self.summary: dict = {}

    def plan(self) -> list[tuple[int, Path, list[dict]]]:
        """``[(fold, weights, cases), ...]`` over the runner's cases; raises before any work if a file or a fold is
        missing."""
        from custom.workflow import datalist

        fold_of: dict[str, int] = {}
        for k in range(self.n_folds):
            for case in datalist(self.dataset_json, split="val", fold=k, n_folds=self.n_folds, seed=self.seed):
                fold_of[str(case["case_id"])] = k
        orphans = [str(c["case_id"]) for c in self.runner.data if str(c["case_id"]) not in fold_of]
        if orphans:
            raise ValueError(
                f"{len(orphans)} case(s) are in no fold of {self.dataset_json} (n_folds={self.n_folds}, "
                f"seed={self.seed}): {', '.join(orphans[:5])}; out-of-fold candidates are for its training cases"
            )
        weights = [Path(str(self.fold_weights).format(fold=k)) for k in range(self.n_folds)]
        missing = [str(w) for w in weights if not w.is_file()]
        if missing:
            raise FileNotFoundError(
                f"stage-1 weights missing for {len(missing)} of {self.n_folds} folds (train them with train.json "
                f"--fold k --n_folds {self.n_folds}): {', '.join(missing)}"
            )
        return [
            (k, weights[k], [c for c in self.runner.data if fold_of[str(c["case_id"])] == k])
            for k in range(self.n_folds)
        ]

    def run(self) -> dict:
        if self.fold_weights is None:
            self.summary = self.runner.run()
            return self.summary
        from custom.checkpoint import load_weights

        plan = self.plan()
        self.runner._check_existing()  # every fold's outputs, before the first fold computes anything
        network = self.runner.cascade.stage1_network
        all_cases = self.runner.data
        seconds: dict = {}
        folds: dict[str, dict] = {}
        try:
            for k, path, cases in plan:
                folds[str(k)] = {"weights": str(path), "cases": [str(c["case_id"]) for c in cases]}
                if not cases:
                    continue
                load_weights(path, map_location="cpu", expected_sha256=self.sha256, network=network)
                network.eval()
                logger.info("fold %d: %d case(s) with stage-1 weights %s", k, len(cases), path)
                self.runner.data = cases
                seconds.update(self.runner.run()["seconds"])
        finally:
            self.runner.data = all_cases
        self.summary = {
            "cases": len(all_cases),
            "succeeded": len(seconds),
            "failed": self.runner.failures,
            "seconds": seconds,
            "n_folds": self.n_folds,
            "seed": self.seed,
            "folds": folds,
            "case_fold": {cid: int(k) for k, f in folds.items() for cid in f["cases"]},
        }
        self.runner.output_dir.mkdir(parents=True, exist_ok=True)
        (self.runner.output_dir / f"summary{_rank_suffix()}.json").write_text(json.dumps(self.summary, indent=2))
        return self.summary

    def exit_if_failed(self) -> None:
        """For the config's ``finalize``: exits non-zero after listing the failed cases of all folds."""
        self.runner.exit_if_failed()
