"""Ignite handlers of the inference workflow (``inference.json``): per-case QC JSON, preview, metrics, C2 recall rows,
and the run's summary.

Each per-case handler runs on ``ITERATION_COMPLETED`` of :class:`custom.evaluator.CascadeEvaluator`, after the
postprocessing, on the decollated output items (label maps already back on the input grid, the working-grid copies
under ``<key>_work``). Items of failed cases are skipped; an error inside a handler fails that case only (logged,
recorded, the run goes on and exits non-zero). Handlers that write files name them in ``planned_outputs(case_id)``,
so that existing files are refused before any case is computed.

Example (config)::

    {"_target_": "custom.case_handlers.CaseQC", "output_dir": "@output_dir", "labels": "@labels"}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from custom.evaluator import RunLevel, rank_suffix, write_csv
from custom.metrics import candidate_recall_fpr, dice_per_class
from custom.outputs import atomic_write, atomic_write_json, path_inside, safe_case_id

logger = logging.getLogger(__name__)

__all__ = ["CaseHandler", "CaseQC", "CasePreview", "CaseMetrics", "CaseSummary"]


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _affine(item: Mapping) -> np.ndarray:
    """The input's affine: that of the written label map (``pred`` after ``ToInputGridd``)."""
    pred = item["pred"]
    meta = getattr(pred, "meta", {}) or {}
    aff = meta.get("original_affine", meta.get("affine"))
    return np.asarray(_np(aff), dtype=np.float64)


def _out(folder: Path, case_id: str, suffix: str) -> Path:
    """``<folder>/<case_id><suffix>``, refused if the case id (from input data) would lead outside ``folder``."""
    return path_inside(folder, f"{safe_case_id(str(case_id), 'case id')}{suffix}")


def _json_list(value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [value]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def case_warnings(item: Mapping, c1_fraction: float, empty: bool) -> list[str]:
    """The warnings that matter for one case: those raised while it was read (in the DataLoader's worker,
    ``input_warnings``) and processed (``case_warnings``), and the case's own flags: C1 empty or covering nearly
    the whole volume, an output with no organ."""
    out = _json_list(item.get("input_warnings", [])) + _json_list(item.get("case_warnings", []))
    if c1_fraction == 0.0:
        out.append("C1 (the body mask) is empty: no body found in the image; the output is background")
    elif c1_fraction >= 0.99:
        out.append(
            f"C1 (the body mask) covers {100 * c1_fraction:.1f} % of the volume: no air around the body was found "
            "(not a CT in Hounsfield units, or cropped to the body?)"
        )
    if empty:
        out.append("the output is empty: no organ voxel was segmented")
    seen: set[str] = set()
    return [m for m in out if not (m in seen or seen.add(m))]


def _work(item: Mapping, key: str) -> Any:
    """The working-grid version of ``key`` (kept by ``ToInputGridd(working_postfix="work")``), else ``key``."""
    return item.get(f"{key}_work", item.get(key))


class CaseHandler:
    """Base of the per-case handlers: calls :meth:`case` for every good output item; an error fails that case."""

    event = Events.ITERATION_COMPLETED

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(self.event, self)

    def planned_outputs(self, case_id: str) -> list[Path]:
        return []

    def case(self, engine: Engine, item: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        outputs = out if isinstance(out, list) else [out]
        batch = engine.state.batch
        batches = batch if isinstance(batch, list) and len(batch) == len(outputs) else [{}] * len(outputs)
        for o, b in zip(outputs, batches, strict=True):
            if not isinstance(o, dict) or "failed" in o:
                continue
            item = {**b, **o} if isinstance(b, dict) else dict(o)  # what the postprocessing saw: batch + output
            try:
                self.case(engine, item)
            except Exception as e:
                record = getattr(engine, "record_failure", None)
                if record is None:
                    raise
                cid = item.get("case_id")
                record(cid, item.get("image_path"), e, failed=self.planned_outputs(str(cid)))
                o["failed"] = cid


class CaseQC(CaseHandler):
    """``<case>_qc.json``: shape, affine, organ volumes (ml) and empty organs of the written segmentation, stage-1
    flags (organs missing or below ``min_organ_ml``), C1/C2 fractions, tiles and seconds per step. Organs with no
    voxel are logged as a warning whether or not the file is written (``write=False``)."""

    def __init__(self, output_dir: str, labels: Mapping[str, int], write: bool = True):
        self.output_dir = Path(str(output_dir))
        self.labels = dict(labels)
        self.write = bool(write)

    def planned_outputs(self, case_id: str) -> list[Path]:
        return [_out(self.output_dir, case_id, "_qc.json")] if self.write else []

    def case(self, engine: Engine, item: dict) -> None:
        case_id = str(item["case_id"])
        final = _np(item["pred"])[0]
        affine = _affine(item)
        voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
        counts = np.bincount(final.ravel().astype(np.int64), minlength=max(self.labels.values(), default=0) + 1)
        volumes = {n: float(counts[k] * voxel_ml) if k < len(counts) else 0.0 for n, k in self.labels.items()}
        stats = item.get("cascade_stats", {})
        c2_stats = stats.get("c2", {})
        qc = {
            "case_id": case_id,
            "input": str(item.get("image_path")),
            "shape": list(final.shape),
            "affine": affine.tolist(),
            "organ_volumes_ml": volumes,
            "empty_organs": [n for n, v in volumes.items() if v == 0.0],
            "stage1_flags": (c2_stats.get("flags") or [[]])[0],
            "c2_fallback": bool((c2_stats.get("fallback") or [False])[0]),
            "c1_fraction": float(_np(_work(item, "c1")).astype(bool).mean()),
            "c2_fraction": float(c2_stats.get("fraction", float(_np(_work(item, "c2")).astype(bool).mean()))),
            "tiles": {
                s: {k: v.get(k) for k in _QC_TILE_KEYS} for s, v in stats.items() if s != "c2" and isinstance(v, dict)
            },
            "seconds": dict(item.get("seconds", {})),
        }
        header = item.get("input_header")
        header = json.loads(header) if isinstance(header, str) else header
        if header:  # the input's NIfTI header as stored: both matrices and their codes
            qc["input_qform"], qc["input_qform_code"] = header["qform"], header["qform_code"]
            qc["input_sform"], qc["input_sform_code"] = header["sform"], header["sform_code"]
        else:  # DICOM: one affine, from the series' geometry
            qc["input_qform"] = qc["input_sform"] = affine.tolist()
            qc["input_qform_code"] = qc["input_sform_code"] = None
        if qc["empty_organs"]:
            logger.warning("%s: no voxel of %s in the output", case_id, ", ".join(qc["empty_organs"]))
        empty = bool(self.labels) and len(qc["empty_organs"]) == len(self.labels)
        qc["warnings"] = case_warnings(item, qc["c1_fraction"], empty)
        store = getattr(engine, "case_warnings", None)
        if isinstance(store, dict):
            store[case_id] = qc["warnings"]
        if self.write:
            atomic_write_json(_out(self.output_dir, case_id, "_qc.json"), qc)


class CasePreview(CaseHandler):
    """``<case>_preview.png``: three orthogonal slices of the working-grid image with the segmentation on top.

    The image is the preprocessed one (``ScaleIntensityRanged`` maps ``hu_window`` to [-1, 1]); it is brought back
    to HU by undoing that scaling with the config's ``hu_window`` (values outside it were clipped), then shown with
    ``display_window`` (HU; default: a soft-tissue window)."""

    def __init__(
        self,
        output_dir: str,
        labels: Mapping[str, int],
        hu_window: Sequence[float] = (-500.0, 500.0),
        image_key: str = "image",
        label_key: str = "pred",
        display_window: Sequence[float] = (-160.0, 240.0),
    ):
        self.output_dir = Path(str(output_dir))
        self.labels = dict(labels)
        lo, hi = (float(v) for v in hu_window)
        if not hi > lo:
            raise ValueError(f"hu_window must be [low, high] with high > low, got {list(hu_window)}")
        self.hu_window = (lo, hi)
        self.image_key = image_key
        self.label_key = label_key
        self.display_window = tuple(float(v) for v in display_window)

    def planned_outputs(self, case_id: str) -> list[Path]:
        return [_out(self.output_dir, case_id, "_preview.png")]

    def case(self, engine: Engine, item: dict) -> None:
        from custom.preview import save_preview

        case_id = str(item["case_id"])
        image = _work(item, self.image_key)
        lo, hi = self.hu_window
        hu = lo + (_np(image)[0].astype(np.float32) + 1.0) * 0.5 * (hi - lo)
        lab = _np(_work(item, self.label_key))[0]
        with atomic_write(_out(self.output_dir, case_id, "_preview.png"), suffix=".png") as tmp:
            save_preview(
                hu,
                lab,
                np.asarray(_np(image.affine), dtype=np.float64),
                tmp,
                label_names={v: k for k, v in self.labels.items()},
                title=case_id,
                window=self.display_window,
            )


#: What the QC JSON keeps of each stage's tiled-inferer statistics: the tiles, and the precision chosen and why.
_QC_TILE_KEYS = (
    "tiles_run",
    "tiles_skipped",
    "candidate_fraction",
    "mode",
    "tile_size",
    "dtype",
    "channels_last",
    "precision",
)


class CaseMetrics(CaseHandler):
    """Per-case Dice per stage and organ against the label file as stored (``metrics.csv``), and C2 recall / FPR
    against the dilation radius on the working grid (``c2_recall_fpr.csv``), written when the run completes. With a
    ``label_mapping`` (``--source_labels``) the label file is mapped as the preprocessing maps it, and structures the
    dataset does not label are NaN.

    ``stages`` maps the output keys to the stage names of the report (``{"stage1": "stage1", "pred": "stage2",
    "stage2_nol": "stage2_nol"}``); keys missing from an item are skipped. The rows accumulate over runs of the same
    evaluator (out-of-fold folds). Sharded runs write ``metrics_rank<r>.csv``."""

    def __init__(
        self,
        output_dir: str,
        labels: Mapping[str, int],
        stages: Mapping[str, str] | None = None,
        radii: Sequence[int] = (0, 1, 2, 3, 4, 5, 6),
        label_mapping: Any = None,
    ):
        self.output_dir = Path(str(output_dir))
        self.labels = dict(labels)
        self.label_mapping = label_mapping  # custom.label_presets.LabelMapping: label files carry a dataset's own ids
        self.stages = dict(stages or {"stage1": "stage1", "pred": "stage2"})
        self.radii = [int(r) for r in radii]
        self.metrics_rows: list[dict] = []
        self.c2_rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def planned_run_outputs(self) -> list[Path]:
        return [self.output_dir / f"{n}{rank_suffix()}.csv" for n in ("metrics", "c2_recall_fpr")]

    def case(self, engine: Engine, item: dict) -> None:
        import nibabel as nib

        label_path = item.get("label_path")
        if not label_path:
            return
        case_id = str(item["case_id"])
        gt = np.asarray(nib.load(str(label_path)).dataobj).astype(np.int64)
        absent: list[str] = []
        if self.label_mapping is not None and self.label_mapping.active:
            gt = self.label_mapping.apply(gt)  # the same mapping as MapLabelValued in the preprocessing
            absent = sorted(self.label_mapping.absent)
        rows = []
        for key, stage in self.stages.items():
            if key not in item:
                continue
            pred = _np(item[key])[0]
            if pred.shape != gt.shape:
                raise ValueError(f"{label_path}: label shape {gt.shape} differs from the image's {pred.shape}")
            rows.append({"case_id": case_id, "stage": stage, **dice_per_class(pred, gt, self.labels, absent=absent)})
        c2_rows = []
        if "label" in item and item["label"] is not None:  # C2 recall / FPR on the working grid, where C2 is made
            gt_w = _np(item["label"])[0].astype(np.int64)
            body = _np(_work(item, "c1"))[0].astype(bool)
            stage1 = _np(_work(item, "stage1"))[0]
            for row in candidate_recall_fpr(stage1, gt_w, body, self.labels, self.radii):
                c2_rows.append({"case_id": case_id, **row})
        self.metrics_rows += rows
        self.c2_rows += c2_rows

    def write(self, engine: Engine | None = None) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.metrics_rows:
            write_csv(self.output_dir / f"metrics{rank_suffix()}.csv", self.metrics_rows)
        if self.c2_rows:
            write_csv(self.output_dir / f"c2_recall_fpr{rank_suffix()}.csv", self.c2_rows)


class CaseSummary(RunLevel):
    """``summary.json`` when the run completes: cases, succeeded, the failures (case, file, error), the partial cases
    (files written and not), the cases skipped as complete (``--skip_existing true``), the warnings per case and the
    seconds per step of every case (``summary_rank<r>.json`` when sharded)."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(str(output_dir))
        self.summary: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def planned_run_outputs(self) -> list[Path]:
        return [self.output_dir / f"summary{rank_suffix()}.json"]

    def __call__(self, engine: Engine) -> None:
        failures = list(getattr(engine, "failures", []))
        partial = list(getattr(engine, "partial", []))
        skipped = list(getattr(engine, "skipped", []))
        seconds = dict(getattr(engine, "case_seconds", {}))
        failed_ids = {f["case_id"] for f in failures + partial}
        seconds = {k: v for k, v in seconds.items() if k not in failed_ids}
        warned = {k: v for k, v in dict(getattr(engine, "case_warnings", {})).items() if v}
        self.summary = {
            "cases": len(seconds) + len(failures) + len(partial) + len(skipped),
            "succeeded": len(seconds),
            "failed": failures,
            "partial": partial,
            "skipped": skipped,
            "warnings": warned,
            "seconds": seconds,
        }
        atomic_write_json(self.output_dir / f"summary{rank_suffix()}.json", self.summary)
