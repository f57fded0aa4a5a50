"""The cascade at inference: stage 1 inside C1, C2 from its dilated foreground, stage 2 inside C2, back to the input.

:class:`CascadeInferer` chains the two tiled inferers (a MONAI ``Inferer``) and makes C2 with
:class:`custom.candidates.CandidateRegiond`. ``bundle/configs/inference.json`` runs it as a MONAI bundle workflow:
``run`` is ``$@evaluator.run()`` on a :class:`CascadeEvaluator` (a ``SupervisedEvaluator``) over a
:class:`CaseDataset` in a ``DataLoader`` (reading and preprocessing in workers, overlapped with the networks), with
the cascade as its inferer and the rest declared in JSON: ``postprocessing`` (argmax, back to the input grid with
:class:`custom.postprocess.ToInputGridd`, writing with :class:`custom.postprocess.SaveCased`, a ``SaveImaged``) and
the handlers of :mod:`custom.case_handlers` (QC JSON, preview, metrics, C2 recall, summary). Every output is in the
input's own geometry (same voxel order, shape and affine); a failing case is logged and skipped so the others still
run (the run then exits non-zero with a summary); existing outputs are refused before the first case is computed.
Probabilities are never resampled back unless asked: labels are taken by argmax at the working resolution and
resampled with nearest neighbour, as the paper does for labels. :class:`OutOfFoldRunner` runs the evaluator fold by
fold, each fold's cases with the stage-1 model that did not train on them (out-of-fold C2 for training stage 2,
``candidates.json --out_of_fold true``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer
from monai.transforms import apply_transform

from custom.candidates import CandidateRegiond
from custom.errors import find_input_error
from custom.options import as_bool
from custom.outputs import atomic_write_json, atomic_write_text, check_output_dir, remove_stale_temps
from custom.workflow import CandidatePrepareBatch

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
    ``stage1`` (argmax labels), ``c2`` and one argmax label map per ``stage2_variants`` entry as (B, 1, ...) uint8
    MetaTensors with the input's meta, and ``last_stats`` the per-stage tile counts, candidate fractions, seconds and
    organ flags. With ``stage1_only`` the stage-2 network is never run and the stage-1 probabilities are returned.

    C2 is ``candidates``, a :class:`custom.candidates.CandidateRegiond` (keys ``stage1``, body key ``c1``, output
    ``c2``) as ``inference.json`` declares it: the one implementation of C2, with its fallback for organs that stage 1
    missed or made implausibly small (``labels`` + ``min_ml``). Without one, it is built from ``radius``, ``element``,
    ``labels`` and ``min_organ_ml`` (fallback ``"c1"`` when ``min_organ_ml`` is given, else none).
    ``c2_source="label"`` takes C2 from the dilated ground truth (the authors' code, for training stage 2): the
    evaluator's batch preparation then passes ``label=`` to the call.
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
        candidates: CandidateRegiond | None = None,
        stage2_variants: Mapping[str, Inferer] | None = None,
        stage1_only: bool = False,
        c2_source: str = "prediction",
    ):
        super().__init__()
        self.stage1_network = stage1_network
        self.stage1_inferer = stage1_inferer
        self.stage2_inferer = stage2_inferer
        if candidates is None:
            use_flags = labels is not None and min_organ_ml is not None
            candidates = CandidateRegiond(
                "stage1",
                body_key="c1",
                output_key="c2",
                radius=radius,
                element=element,
                labels=dict(labels) if use_flags else None,
                min_ml=min_organ_ml if use_flags else 0.0,
                fallback="c1" if use_flags else "none",
            )
        self.c2_transform = candidates
        self.spacing = spacing
        self.stage2_variants = dict(stage2_variants or {})
        self.stage1_only = as_bool(stage1_only, "stage1_only")
        if c2_source not in ("prediction", "label"):
            raise ValueError(f"c2_source must be 'prediction' (paper) or 'label' (authors' code), got {c2_source!r}")
        self.c2_source = c2_source
        self.last_outputs: dict[str, torch.Tensor] = {}
        self.last_stats: dict = {}

    def stage1_probabilities(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        prob = self.stage1_inferer(inputs, self.stage1_network, mask=mask)
        self.last_stats["stage1"] = {
            **getattr(self.stage1_inferer, "last_stats", {}),
            "seconds": time.perf_counter() - t0,
        }
        return prob

    def stage1(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        labels = self.stage1_probabilities(inputs, mask).argmax(1, keepdim=True).to(torch.uint8)
        self.last_stats["stage1"]["seconds"] = time.perf_counter() - t0
        return labels

    def _affine(self, t: torch.Tensor, b: int) -> torch.Tensor:
        """Item ``b``'s affine (organ volumes of the fallback check); ``spacing`` overrides the voxel size."""
        if self.spacing is not None:
            return torch.diag(torch.tensor([*map(float, self.spacing), 1.0], dtype=torch.float64))
        if isinstance(t, MetaTensor):
            aff = torch.as_tensor(t.affine, dtype=torch.float64).cpu()
            return aff[b] if aff.ndim == 3 else aff
        return torch.eye(4, dtype=torch.float64)

    def candidates(
        self, stage1_labels: torch.Tensor, mask: torch.Tensor | None = None, like: torch.Tensor | None = None
    ) -> torch.Tensor:
        """C2 for each batch item through ``c2_transform`` (``CandidateRegiond``), on the CPU."""
        t0 = time.perf_counter()
        like = stage1_labels if like is None else like
        out, flags, fallback = [], [], []
        for b in range(stage1_labels.shape[0]):
            lab = stage1_labels[b].detach().cpu()
            lab = lab.as_tensor() if isinstance(lab, MetaTensor) else lab
            item = {"stage1": MetaTensor(lab, affine=self._affine(like, b))}
            if mask is not None:
                item["c1"] = mask[b].detach().cpu()
            elif self.c2_transform.body_key is not None:
                item[self.c2_transform.body_key] = torch.ones_like(item["stage1"].as_tensor(), dtype=torch.uint8)
            c2 = self.c2_transform(item)[self.c2_transform.output_key]
            names = [f for f in str(c2.meta.get("c2_flags", "")).split(",") if f]
            flags.append(names if self.c2_transform.labels is not None else [])
            fallback.append(bool(c2.meta.get("c2_fallback", False)))
            if not c2.any():  # nothing to crop or tile: stage 2 runs no tile and the case comes out as background
                logger.warning(
                    "stage 1 found no foreground%s: C2 is empty, stage 2 is skipped and the output is background",
                    f" (batch item {b})" if stage1_labels.shape[0] > 1 else "",
                )
            out.append(c2.as_tensor().to(torch.uint8).reshape(stage1_labels.shape[1:]))
        c2 = torch.stack(out)
        self.last_stats["c2"] = {
            "seconds": time.perf_counter() - t0,
            "fraction": float(c2.float().mean()),
            "flags": flags,
            "fallback": fallback,
        }
        return c2

    def stage2(self, inputs, network, c2, inferer: Inferer | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        inferer = inferer or self.stage2_inferer
        prob = inferer(inputs, network, mask=c2.to(inputs.device))
        self.last_stats["stage2"] = {**getattr(inferer, "last_stats", {}), "seconds": time.perf_counter() - t0}
        return prob

    def __call__(
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module | None,
        mask: torch.Tensor | None = None,
        label: torch.Tensor | None = None,
        **kwargs,
    ):
        self.last_stats = {}
        prob1 = self.stage1_probabilities(inputs, mask)
        lab1 = prob1.argmax(1, keepdim=True).to(torch.uint8)
        if self.c2_source == "label":
            if label is None:
                raise ValueError("c2_source='label' needs the case's label (load_keys image and label)")
            c2 = self.candidates(label.round().to(torch.uint8), mask, like=inputs)
        else:
            c2 = self.candidates(lab1, mask, like=inputs)
        outputs = {"stage1": _as_mask_tensor(lab1.cpu().numpy(), inputs), "c2": _as_mask_tensor(c2.numpy(), inputs)}
        if self.stage1_only:
            self.last_outputs = outputs
            return prob1
        del prob1
        stats = dict(self.last_stats)
        for name, inferer in self.stage2_variants.items():
            p = self.stage2(inputs, network, c2, inferer)
            stats[name] = self.last_stats.pop("stage2")
            outputs[name] = _as_mask_tensor(p.argmax(1, keepdim=True).to(torch.uint8).cpu().numpy(), inputs)
            del p
        prob = self.stage2(inputs, network, c2)
        self.last_stats = {**stats, "stage2": self.last_stats["stage2"]}
        self.last_outputs = outputs
        return prob


def output_set(save: Sequence[str] | str | None) -> list[str]:
    """``save_outputs`` checked: any of ``probabilities``, ``c1``, ``stage1``, ``c2``, ``qc``, ``preview``."""
    save = [save] if isinstance(save, str) else list(save or [])
    unknown = sorted(set(save) - set(OPTIONAL_OUTPUTS))
    if unknown:
        raise ValueError(f"unknown outputs to save: {unknown}; choose from {list(OPTIONAL_OUTPUTS)}")
    return save


OPTIONAL_OUTPUTS = ("probabilities", "c1", "stage1", "c2", "qc", "preview")


class CaseDataset(Dataset):
    """MONAI ``Dataset`` of the cases to segment, where a case that cannot be read or preprocessed becomes a marked
    item instead of an exception.

    Reading and preprocessing run in the ``DataLoader``'s workers, overlapped with the networks; an error there would
    end the whole run (and MONAI's ``Compose`` wraps it). Here the item is ``{"case_id", "image_path", "error"}``
    with the file and the problem (:func:`custom.io.find_input_error`), which :class:`CascadeEvaluator` logs, records
    and skips. Good items get ``image_path`` / ``label_path`` (the raw files: evaluation compares with the label as
    stored) and ``seconds_read`` (reading + preprocessing time, measured in the worker).
    """

    def __init__(self, data: Sequence[Mapping], transform: Callable | None = None):
        data = list(data)
        if not data:
            raise ValueError("no input cases: the input list is empty")
        super().__init__(data=data, transform=transform)

    def _transform(self, index: int):
        case = self.data[index]
        paths = {"image_path": str(case.get("image")), "label_path": str(case.get("label") or "")}
        t0 = time.perf_counter()
        try:
            with capture_warnings() as caught:
                item = super()._transform(index)
        except Exception as e:
            err = find_input_error(e) or e  # MONAI's Compose wraps errors: report the file and the problem
            logger.debug(traceback.format_exc())
            return {"case_id": str(case.get("case_id")), **paths, "error": str(err)}
        # strings (JSON) travel through the DataLoader's collation and the decollation unchanged
        extra = {"input_warnings": json.dumps(caught), "input_header": json.dumps(input_header(case.get("image")))}
        return {**item, **paths, **extra, "seconds_read": time.perf_counter() - t0}


class _ListHandler(logging.Handler):
    def __init__(self, out: list[str]):
        super().__init__(logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


@contextlib.contextmanager
def capture_warnings(loggers: Sequence[str] = ("custom",)):
    """Collect the messages of the warnings (``warnings.warn``: :class:`custom.io.InputWarning`, ...) and of the
    ``logging`` warnings of ``loggers`` raised inside the block, into the yielded list, so that they can be kept with
    the case (its QC JSON, the summary). The warnings are still shown as usual."""
    out: list[str] = []
    handler = _ListHandler(out)
    logs = [logging.getLogger(n) for n in loggers]
    for lg in logs:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield out
    finally:
        for lg in logs:
            lg.removeHandler(handler)
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            continue
        out.append(str(w.message))
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    seen: set[str] = set()
    out[:] = [m for m in out if not (m in seen or seen.add(m))]


def input_header(path) -> dict | None:
    """qform and sform of a NIfTI input as stored (matrices and codes), read from its header only; ``None`` for
    DICOM (there the output's qform and sform are both the series' affine)."""
    try:
        from custom.nifti_io import nifti_case_id

        if path is None or nifti_case_id(path) is None or not Path(str(path)).is_file():
            return None
        import nibabel as nib

        hdr = nib.load(str(path)).header
        return {
            "qform": np.asarray(hdr.get_qform(), dtype=np.float64).tolist(),
            "qform_code": int(hdr["qform_code"]),
            "sform": np.asarray(hdr.get_sform(), dtype=np.float64).tolist(),
            "sform_code": int(hdr["sform_code"]),
        }
    except Exception:  # the image was read: a header it cannot give again is no reason to fail the case
        return None


class _TimedCompose:
    """The evaluator's postprocessing, run transform by transform with the seconds of each kept per item
    (``seconds_post``: a transform's ``timing_name``, or its class name)."""

    def __init__(self, transform: Callable):
        self.transform = transform
        self.transforms = list(getattr(transform, "transforms", [transform]))

    def __call__(self, data: dict) -> dict:
        seconds: dict[str, float] = {}
        for t in self.transforms:
            t0 = time.perf_counter()
            data = apply_transform(t, data)
            name = getattr(t, "timing_name", type(t).__name__)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        data["seconds_post"] = seconds
        return data


class CascadeEvaluator(SupervisedEvaluator):
    """MONAI ``SupervisedEvaluator`` for batch inference: per-case failure isolation, no clobbering, an exit code.

    The loop is MONAI's (``DataLoader`` → ``prepare_batch`` → ``inferer`` → decollate → ``postprocessing`` →
    handlers); ``inference.json`` declares every part. What it adds:

    - a case that failed to load (a :class:`CaseDataset` item with ``error``) or raised in the networks or the
      postprocessing is logged by name, recorded in ``failures`` and skipped; the run goes on; ``exit_if_failed()``
      (the config's ``finalize``) then lists the failures and exits 1;
    - before the first case, every output that the postprocessing transforms and handlers plan (their
      ``planned_outputs(case_id)``) is checked for all cases: existing files are an error unless ``overwrite``;
    - each item gets ``cascade_stats`` (the inferer's ``last_stats``) and ``seconds`` (per step, and ``total``),
      and the inferer's extra outputs (``stage1``, ``c2``, stage-2 variants) join the output for the postprocessing.

    Use ``batch_size=1`` (whole CTs differ in size).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader,
        network: torch.nn.Module,
        inferer: Inferer,
        postprocessing: Callable | None = None,
        val_handlers: Sequence | None = None,
        overwrite: bool = False,
        output_dir: str | None = None,
        min_free_mb: float = 100.0,
        skip_existing: bool = False,
        **kwargs,
    ):
        self.overwrite = as_bool(overwrite, "overwrite")
        self.skip_existing = as_bool(skip_existing, "skip_existing")
        self.output_dir = output_dir
        self.min_free_mb = float(min_free_mb)
        self.skipped: list[str] = []
        self.partial: list[dict] = []
        self.case_warnings: dict[str, list[str]] = {}
        self._run_start = time.time()
        self.case_postprocessing = postprocessing
        self.case_handlers = [h for h in (val_handlers or []) if h is not None]
        self.failures: list[dict] = []
        self.case_seconds: dict[str, dict] = {}
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            inferer=inferer,
            postprocessing=None if postprocessing is None else _TimedCompose(postprocessing),
            val_handlers=self.case_handlers,
            **kwargs,
        )
        from monai.engines.utils import IterationEvents

        # before decollation (MODEL_COMPLETED): the cascade's extra outputs are split per item with the rest
        self.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._add_cascade_outputs)

    def _add_cascade_outputs(self, engine) -> None:
        for k, v in getattr(self.inferer, "last_outputs", {}).items():
            engine.state.output[k] = v.as_tensor() if isinstance(v, MetaTensor) else v

    @property
    def data(self) -> list[dict]:
        return self.data_loader.dataset.data

    @data.setter
    def data(self, cases: Sequence[Mapping]) -> None:
        self.data_loader.dataset.data = list(cases)

    def planned_outputs(self, case_id: str, handlers: bool = True) -> list[Path]:
        parts = list(getattr(self.case_postprocessing, "transforms", [])) + (self.case_handlers if handlers else [])
        return [Path(p) for part in parts if hasattr(part, "planned_outputs") for p in part.planned_outputs(case_id)]

    def planned_run_outputs(self) -> list[Path]:
        """Files written once per run (``summary.json``, ``metrics.csv``, ``c2_recall_fpr.csv``)."""
        return [
            Path(p) for h in self.case_handlers if hasattr(h, "planned_run_outputs") for p in h.planned_run_outputs()
        ]

    def is_complete(self, case_id: str) -> bool:
        """All planned files of the case exist; every one is written atomically, so "exists" means "complete"."""
        planned = self.planned_outputs(case_id)
        return bool(planned) and all(p.exists() for p in planned)

    def check_existing(self, cases: Sequence[Mapping] | None = None) -> None:
        """Refuse before any computation when an output of any case already exists (unless ``overwrite``); with
        ``skip_existing`` the incomplete cases' own leftovers are replaced and the run's files rewritten."""
        cases = self.data if cases is None else cases
        if self.output_dir is not None:
            check_output_dir(self.output_dir, self.min_free_mb)
        planned = [p for c in cases for p in self.planned_outputs(str(c["case_id"]))] + self.planned_run_outputs()
        for p in planned:  # temporary files a killed run left behind (SIGKILL, power loss)
            remove_stale_temps(p)
        if self.overwrite or self.skip_existing:
            return
        existing = [str(p) for p in planned if p.exists()]
        if existing:
            raise FileExistsError(
                f"{len(existing)} output file(s) already exist and overwrite is off (pass --overwrite true to replace "
                f"them, or --skip_existing true to segment only the cases not complete): "
                f"{', '.join(existing[:5])}{' ...' if len(existing) > 5 else ''}"
            )

    def split_complete(self, cases: Sequence[Mapping]) -> list[dict]:
        """With ``skip_existing``: the cases still to segment (complete ones are recorded in ``skipped``); those with
        some outputs of an earlier run are marked to replace them."""
        todo = []
        for c in cases:
            cid = str(c["case_id"])
            if self.is_complete(cid):
                self.skipped.append(cid)
                continue
            left = [str(p) for p in self.planned_outputs(cid) if p.exists()]
            if left:
                logger.info("case %s: incomplete outputs of an earlier run (%s) are replaced", cid, ", ".join(left))
            todo.append({**c, "replace_partial": "yes" if left else "no"})
        if self.skipped:
            logger.info("%d case(s) complete from an earlier run, skipped: %s", len(self.skipped), self.skipped)
        return todo

    def run(self, global_epoch: int = 1, check: bool = True) -> None:  # type: ignore[override]
        self._run_start = time.time() - 1.0  # file times may be rounded to the second
        all_cases = self.data
        if check:
            self.check_existing()
        if self.skip_existing and not self.overwrite:
            self.data = self.split_complete(all_cases)
        try:
            if not self.data:
                logger.info("nothing to segment: every case is complete")
                for h in self.case_handlers:
                    if isinstance(h, _RunLevel):
                        h(self)
                return
            self.state.epoch_length = len(self.data_loader)  # the case list may change between runs (folds, shards)
            with _sigterm_as_exit():
                super().run(global_epoch)
        finally:
            self.data = all_cases

    def record_failure(self, case_id: str, image: str, error: BaseException | str, failed: Sequence = ()) -> None:
        """A case that raised: ``partial`` when some of its files were written in this run (``failed``: the files of
        the step that raised), else ``failures``."""
        if isinstance(error, BaseException):
            error = find_input_error(error) or error
        written = [str(p) for p in self.planned_outputs(str(case_id)) if _written_since(p, self._run_start)]
        if written:
            missing = [str(p) for p in self.planned_outputs(str(case_id)) if str(p) not in written]
            logger.error("case %s (%s) partial: %s written, %s failed: %s", case_id, image, written, missing, error)
            self.partial.append(
                {
                    "case_id": str(case_id),
                    "image": str(image),
                    "written": written,
                    "failed_files": [str(p) for p in failed] or missing,
                    "error": str(error),
                }
            )
            return
        logger.error("case %s (%s) failed: %s", case_id, image, error)
        self.failures.append({"case_id": str(case_id), "image": str(image), "error": str(error)})

    def _iteration(self, engine, batchdata):
        case_id = _first(batchdata.get("case_id"))
        image = _first(batchdata.get("image_path"))
        if "error" in batchdata:
            self.record_failure(case_id, image, _first(batchdata["error"]))
            return [{"failed": case_id}]
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), capture_warnings() as caught:
                output = super()._iteration(engine, batchdata)
        except Exception as e:
            logger.debug(traceback.format_exc())
            self.record_failure(case_id, image, e)
            return [{"failed": case_id}]
        outputs = output if isinstance(output, list) else [output]
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for out, b in zip(outputs, batches, strict=False):
            item = {**b, **out} if isinstance(b, dict) else out
            cid = str(item.get("case_id", case_id))
            seconds = {"read_preprocess": float(_first(item.get("seconds_read", 0.0)))}
            stats = dict(getattr(self.inferer, "last_stats", {}))
            seconds.update({k: v["seconds"] for k, v in stats.items() if isinstance(v, dict) and "seconds" in v})
            seconds.update(item.get("seconds_post", {}))
            seconds["total"] = time.perf_counter() - t0 + seconds["read_preprocess"]
            out["cascade_stats"] = stats
            out["case_warnings"] = json.dumps(list(caught))  # a string: decollated as it is
            out["seconds"] = seconds
            self.case_seconds[cid] = seconds
            logger.info("case %s: %.1f s", cid, seconds["total"])
        return output

    def exit_if_failed(self) -> None:
        """For the config's ``finalize``: a run with failed cases exits non-zero after listing them."""
        if self.failures or self.partial:
            n = len({str(c["case_id"]) for c in self.data} | {f["case_id"] for f in self.failures + self.partial})
            if self.failures:
                lines = [f"  {f['case_id']}: {f['image']}: {f['error']}" for f in self.failures]
                print(f"{len(self.failures)} of {n} case(s) failed:\n" + "\n".join(lines), file=sys.stderr)
            if self.partial:
                lines = [
                    f"  {f['case_id']}: written {f['written']}; not written {f['failed_files']}: {f['error']}"
                    for f in self.partial
                ]
                print(f"{len(self.partial)} of {n} case(s) partial:\n" + "\n".join(lines), file=sys.stderr)
            sys.exit(1)


class _RunLevel:
    """Marks a handler that writes once per run (``summary.json``): called directly when nothing is left to run."""


def _written_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM (``kill``, a scheduler's time limit) becomes ``SystemExit`` while the run lasts, so that the
    temporary files of an unfinished write are removed (:func:`custom.io.atomic_write`) as after Ctrl-C."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _first(value):
    """The single item of a collated batch value (batch size 1), or the value itself."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


class CascadePrepareBatch(CandidatePrepareBatch):
    """:class:`custom.workflow.CandidatePrepareBatch` for the cascade: C1 as the inferer's ``mask``, the label (when
    it was loaded: a tensor, not a path) as the evaluator's target, and also as ``label=`` when C2 comes from it
    (``c2_source="label"``)."""

    def __init__(self, candidate_key: str | None = "c1", pass_label: bool = False, **kwargs):
        super().__init__(candidate_key, **kwargs)
        self.pass_label = bool(pass_label)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        label = batchdata.get(self.label_key)
        if not isinstance(label, torch.Tensor):  # not loaded (a path from dataset.json): no target
            batchdata = {k: v for k, v in batchdata.items() if k != self.label_key}
        image, label, args, extra = super().__call__(batchdata, device, non_blocking, **kwargs)
        if self.pass_label:
            extra["label"] = label
        return image, label, args, extra


def _rank_suffix() -> str:
    """``_rank<r>`` when sharded over several processes (each writes its own summary), else empty."""
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        return f"_rank{torch.distributed.get_rank()}"
    return ""


def write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


class OutOfFoldRunner:
    """Candidate regions out of fold: each case's C2 comes from the stage-1 model whose validation fold held it.

    Why: stage 2 learns to segment inside C2 as stage 1 makes it on CTs it has never seen. A stage-1 model that
    trained on a case segments it better than it will segment an unseen CT, so C2 made by it is tighter and misses
    less than at test time, and stage 2 learns from regions nicer than those it will get. With one stage-1 model per
    fold (``train.json`` with ``fold=k``: trained on every fold but k, validated on fold k), every training case gets a
    C2 from a model that never trained on it.

    The folds are :func:`custom.workflow.datalist` with ``split="val"`` and ``fold=k`` on ``dataset_json``, the very
    call the training made, so they agree with it as long as ``n_folds`` and ``seed`` do. Fold ``k``'s weights
    (``fold_weights.format(fold=k)``) are loaded into the evaluator's stage-1 network (``inferer.stage1_network``)
    and the evaluator runs over that fold's cases; outputs, failures and metrics rows accumulate in it as in one run,
    and ``summary.json`` records which fold and weights file produced each case. Every weights file and every case's
    fold are checked, and existing outputs refused, before anything is computed. With ``fold_weights=None`` it is the
    evaluator's own run.

    Example (``candidates.json``, ``--out_of_fold true``)::

        {"_target_": "custom.cascade.OutOfFoldRunner", "runner": "@evaluator", "dataset_json": "@data_list_file_path",
         "fold_weights": "runs/stage1_fold{fold}/checkpoints/model_final.pt", "n_folds": 5, "seed": "@seed",
         "output_dir": "@output_dir"}
    """

    def __init__(
        self,
        runner: CascadeEvaluator,
        fold_weights: str | None = None,
        dataset_json: str | None = None,
        n_folds: int = 5,
        seed: int = 0,
        sha256: str | None = None,
        output_dir: str | None = None,
    ):
        self.runner = runner
        self.output_dir = Path(str(output_dir)) if output_dir is not None else None
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
            self.runner.run()
            return {}
        from custom.weights import load_weights

        plan = self.plan()
        self.runner.check_existing()  # every fold's outputs, before the first fold computes anything
        network = self.runner.inferer.stage1_network
        all_cases = self.runner.data
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
                self.runner.run(check=False)
        finally:
            self.runner.data = all_cases
        seconds = dict(self.runner.case_seconds)
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
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.output_dir / f"summary{_rank_suffix()}.json", self.summary)
        return self.summary

    def exit_if_failed(self) -> None:
        """For the config's ``finalize``: exits non-zero after listing the failed cases of all folds."""
        self.runner.exit_if_failed()
