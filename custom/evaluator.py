"""The inference run: the cases to segment (:class:`CaseDataset`), the batch preparation and the evaluator.

``bundle/configs/inference.json`` runs the cascade (:class:`custom.cascade.CascadeInferer`) as a MONAI bundle
workflow: ``run`` is ``$@evaluator.run()`` on a :class:`CascadeEvaluator` (a ``SupervisedEvaluator``) over a
:class:`CaseDataset` in a ``DataLoader`` (reading and preprocessing in workers, overlapped with the networks), with
:class:`CascadePrepareBatch` (C1 as the inferer's mask) and the rest declared in JSON: ``postprocessing`` (argmax,
back to the input grid with :class:`custom.postprocess.ToInputGridd`, writing with
:class:`custom.postprocess.SaveCased`, a ``SaveImaged``) and the handlers of :mod:`custom.case_handlers` (QC JSON,
preview, metrics, C2 recall, summary). A failing case is logged and skipped so the others still run (the run then
exits non-zero with a summary); existing outputs are refused before the first case is computed. Out-of-fold runs
(one stage-1 model per fold) are :class:`custom.out_of_fold.OutOfFoldRunner`.
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

from custom.errors import find_input_error
from custom.options import as_bool
from custom.outputs import atomic_write_text, check_output_dir, remove_stale_temps
from custom.workflow import CandidatePrepareBatch

logger = logging.getLogger(__name__)


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
                    if isinstance(h, RunLevel):
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


class RunLevel:
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


def rank_suffix() -> str:
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
