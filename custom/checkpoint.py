"""Checkpoints that survive a killed run and resume that continues where it stopped: ignite's ``Checkpoint`` with a
save handler that fills its gaps.

``ignite.handlers.Checkpoint`` collects the state dicts; :class:`AtomicDiskSaver` (its save handler) writes them.
What the handler and the savers add over ignite's ``DiskSaver`` and MONAI's ``CheckpointSaver``:

- every file goes through the bundle's one atomic-write helper (:func:`custom.outputs.atomic_write_with`: a temporary
  file in the same folder, flushed, fsynced, ``os.replace``), readable by group and others as the umask allows
  (``DiskSaver`` uses ``NamedTemporaryFile``: 0600 plus a chmod; MONAI even passes ``atomic=False``);
- a good checkpoint is never deleted before the new one is written: with a fixed file name ignite calls the handler's
  ``remove`` for the previous file *before* saving the new one, so a kill at that moment leaves none; here the new file
  replaces the old one in the rename and ``remove`` deletes nothing;
- nothing is saved while a weight is NaN/Inf or after :class:`custom.handlers.StopOnNaN` flagged the loss, and
  nothing on exceptions (MONAI saves at ``EXCEPTION_RAISED``: NaN weights, or an iteration count one ahead of the
  optimizer steps taken): the last periodic checkpoint is the state to resume from;
- a payload that ``torch.load(weights_only=True)`` could not read back is refused when saving, not when resuming.

Files in ``<ckpt_dir>``:

- ``checkpoint_last.pt``: everything needed to resume (network, optimizer, lr_scheduler, the trainer's iteration and
  epoch, the AMP scaler, the best-model saver's record), every N epochs or iterations and at the end;
- ``model_final.pt``: ``{"network": state_dict, "meta": {...}}`` at the end of training;
- ``model_best.pt``: the same for the best validation key metric (:class:`BestModelSaver` on the evaluator).

Loading (``weights_only=True``, checksums) is :mod:`custom.weights`; its names are re-exported here.

Example (bundle config, the trainer and its scaler are taken from the engine the handler is attached to, so no
circular reference to ``@train#trainer`` is needed)::

    "ckpt_best": {"_target_": "custom.checkpoint.BestModelSaver", "save_dir": "@ckpt_dir",
                  "save_dict": {"network": "@network"}},
    "validate#handlers": ["@ckpt_best", ...],
    "train#handlers": [
        {"_target_": "custom.checkpoint.ResumeFromCheckpoint", "load_path": "$@ckpt_dir + '/checkpoint_last.pt'",
         "load_dict": "@ckpt_objects", "resume": "@resume"},
        {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler"},
        {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "interval": 1, "epoch_level": true},
        {"_target_": "custom.checkpoint.AtomicCheckpointSaver", "save_dir": "@ckpt_dir",
         "save_dict": "@ckpt_objects", "save_interval": 1},
        {"_target_": "custom.handlers.StopOnNaN"}],
    "ckpt_objects": {"network": "@network", "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler",
                     "best_saver": "@ckpt_best"}
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler, Checkpoint

from custom.options import as_bool
from custom.outputs import atomic_write_with, remove_stale_temps
from custom.weights import (
    WEIGHT_KEYS,
    UnsafeCheckpointError,
    load_checkpoint,
    load_network,
    load_weights,
    sha256_file,
    verify_checksums,
    write_checksums,
)

__all__ = [
    "NONFINITE_STATE_ATTR",
    "WEIGHT_KEYS",
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "BestModelSaver",
    "ResumeFromCheckpoint",
    "UnsafeCheckpointError",
    "atomic_save",
    "load_checkpoint",
    "load_network",
    "load_weights",
    "sha256_file",
    "verify_checksums",
    "write_checksums",
]

#: Attribute that :class:`custom.handlers.StopOnNaN` sets on ``engine.state`` (the iteration of the non-finite loss);
#: savers refuse to write while it is set.
NONFINITE_STATE_ATTR = "nonfinite_loss_iteration"
#: Key of the small metadata record written beside the state dicts.
META_KEY = "meta"

_SAFE_LEAVES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a half-written ``path`` (:func:`custom.outputs.atomic_write_with`).

    Example::

        atomic_save({"network": net.state_dict()}, "runs/stage1/model_final.pt")
    """
    return atomic_write_with(path, lambda f: torch.save(obj, f))


def _check_loadable(obj: Any, where: str) -> None:
    """Refuse to write what ``torch.load(weights_only=True)`` would refuse to read back (found at save, not resume)."""
    if isinstance(obj, _SAFE_LEAVES):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_loadable(k, f"{where}[{k!r}] (key)")
            _check_loadable(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which torch.load(weights_only=True) cannot "
        "read back; convert it to a plain Python or tensor value in the object's state_dict()."
    )


class AtomicDiskSaver(BaseSaveHandler):
    """Save handler of ``ignite.handlers.Checkpoint``: each checkpoint replaces its file atomically, in ``dirname``.

    ``remove`` deletes nothing: the savers of this module write one fixed file name each, which ignite "removes"
    right before writing it again; the rename in :func:`atomic_save` replaces the previous file instead, so a good
    checkpoint exists at every moment.
    """

    def __init__(self, dirname: str | os.PathLike) -> None:
        self.dirname = Path(dirname)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        _check_loadable(checkpoint, filename)
        atomic_save(dict(checkpoint), self.dirname / filename)

    def remove(self, filename: str) -> None:
        """Nothing to delete: the next save replaces ``filename`` in one rename."""


class _MetaRecord:
    """The ``meta`` entry of a checkpoint (kind, iteration, epoch, time, versions), as an object ignite can save."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.kind, self.extra = engine, "checkpoint", {}

    def state_dict(self) -> dict[str, Any]:
        import monai

        state = self.engine.state
        return {
            "kind": self.kind,
            "iteration": int(state.iteration or 0),
            "epoch": int(state.epoch or 0),
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch_version": str(torch.__version__),  # TorchVersion is not a plain str: weights_only would refuse it
            "monai_version": str(monai.__version__),
            **self.extra,
        }


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _nonfinite_tensors(objects: Mapping[str, Any]) -> list[str]:
    """Names of floating-point parameters/buffers that hold NaN or Inf, over the modules in ``objects``."""
    bad = []
    for key, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            for name, t in obj.state_dict().items():
                if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(f"{key}.{name}")
    return bad


def _clean(objects: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """Drop ``None`` entries (a config may pass ``null`` for an optional scaler) and reject the reserved key."""
    if objects is None:
        return {}
    if META_KEY in objects:
        raise ValueError(f"{what}: the key {META_KEY!r} is reserved for the checkpoint's metadata record.")
    return {k: v for k, v in objects.items() if v is not None}


def _engine_objects(
    engine: Engine, objects: Mapping[str, Any], engine_key: str | None, scaler_key: str | None
) -> dict[str, Any]:
    """``objects`` plus the engine itself (its iteration/epoch) and its AMP scaler, when it has one."""
    out = dict(objects)
    if engine_key:
        out.setdefault(engine_key, engine)
    scaler = getattr(engine, "scaler", None)
    if scaler_key and scaler is not None and hasattr(scaler, "state_dict"):
        out.setdefault(scaler_key, scaler)
    return out


class _SaverBase:
    """Shared by the savers: one ignite ``Checkpoint`` per file name, written only when the state is finite."""

    def __init__(self, save_dir: str, save_dict: Mapping[str, Any], name: str | None) -> None:
        if not save_dir:
            raise ValueError("save_dir must name the checkpoint folder.")
        self.save_dir = Path(save_dir)
        self.save_dict = _clean(save_dict, type(self).__name__)
        self._name = name
        self.logger = logging.getLogger(name)
        self.last_saved: Path | None = None
        self._checkpoints: dict[tuple[int, str], tuple[Checkpoint, _MetaRecord]] = {}

    def _attach_logger(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger

    def _write(self, engine: Engine, objects: Mapping[str, Any], filename: str, kind: str, **extra: Any) -> Path | None:
        if not _is_main_process():
            return None
        flagged = getattr(engine.state, NONFINITE_STATE_ATTR, None)
        if flagged is not None:
            self.logger.warning(
                f"Not saving {filename}: the loss was NaN/Inf at iteration {flagged}; "
                f"the previous file is kept unchanged."
            )
            return None
        bad = _nonfinite_tensors(objects)
        if bad:
            self.logger.error(
                f"Not saving {filename} at iteration {engine.state.iteration}: {len(bad)} tensor(s) hold NaN/Inf "
                f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); the previous file is kept unchanged."
            )
            return None
        key = (id(engine), filename)
        if key not in self._checkpoints:
            meta = _MetaRecord(engine)
            saver = AtomicDiskSaver(self.save_dir)
            # n_saved=None: ignite keeps no ranking of its own (which file is best is decided here)
            checkpoint = Checkpoint({**objects, META_KEY: meta}, saver, filename_pattern=filename, n_saved=None)
            self._checkpoints[key] = (checkpoint, meta)
        checkpoint, meta = self._checkpoints[key]
        meta.kind, meta.extra = kind, extra
        checkpoint(engine)
        self.last_saved = self.save_dir / filename
        return self.last_saved


class AtomicCheckpointSaver(_SaverBase):
    """Save the training state every N epochs/iterations and at the end, atomically, never after a NaN.

    ``checkpoint_last.pt`` holds every item of ``save_dict`` plus the engine it is attached to (under ``engine_key``,
    so :class:`ResumeFromCheckpoint` restores the iteration and epoch) and the engine's AMP ``scaler`` when it has one.
    At ``COMPLETED`` it also writes ``final_filename`` with only ``final_keys`` (the weights to ship).

    The handler registers its events when the engine starts, so it runs after every handler attached when the trainer
    was built (``LrScheduleHandler``, ``ValidationHandler``): the saved scheduler step and best-model record belong to
    the same epoch as the weights, whatever the order of the handler list. Unfinished temporary files of its two
    files (left by a hard kill) are removed then.

    Args:
        save_dir: folder of the checkpoints (created if missing).
        save_dict: objects with ``state_dict()``, e.g. ``{"network": net, "optimizer": opt, "lr_scheduler": sched}``;
            ``None`` values are ignored.
        save_interval: save every N epochs (``epoch_level=True``) or iterations; 0 saves only at the end.
        epoch_level: unit of ``save_interval``.
        filename: name of the resumable checkpoint.
        save_final: also write ``final_filename`` (and ``filename``) when the run completes.
        final_filename: name of the final weights file.
        final_keys: items of ``save_dict`` written to ``final_filename``.
        engine_key: key under which the engine's state (iteration, epoch) is saved; ``None`` to leave it out.
        scaler_key: key for ``engine.scaler`` (MONAI's trainers create it when ``amp=True``); ``None`` to leave it out.
        name: logger name; default: the engine's logger.

    Example::

        saver = AtomicCheckpointSaver("runs/s1", {"network": net, "optimizer": opt}, save_interval=1)
        saver.attach(trainer)  # runs/s1/checkpoint_last.pt after every epoch, runs/s1/model_final.pt at the end
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        save_interval: int = 1,
        epoch_level: bool = True,
        filename: str = "checkpoint_last.pt",
        save_final: bool = True,
        final_filename: str = "model_final.pt",
        final_keys: Sequence[str] = ("network",),
        engine_key: str | None = "trainer",
        scaler_key: str | None = "scaler",
        name: str | None = None,
    ) -> None:
        super().__init__(save_dir, save_dict, name)
        if save_interval < 0:
            raise ValueError(f"save_interval must be >= 0, got {save_interval}.")
        if not self.save_dict and not engine_key:
            raise ValueError("AtomicCheckpointSaver: nothing to save (empty save_dict and no engine_key).")
        missing = [k for k in final_keys if k not in self.save_dict] if save_final else []
        if missing:
            raise ValueError(f"final_keys {missing} are not in save_dict (keys: {sorted(self.save_dict)}).")
        self.save_interval = int(save_interval)
        self.epoch_level = bool(epoch_level)
        self.filename = filename
        self.save_final = bool(save_final)
        self.final_filename = final_filename
        self.final_keys = tuple(final_keys)
        self.engine_key = engine_key
        self.scaler_key = scaler_key
        self._registered: set[int] = set()

    def attach(self, engine: Engine) -> None:
        self._attach_logger(engine)
        engine.add_event_handler(Events.STARTED, self._register)

    def _register(self, engine: Engine) -> None:
        if id(engine) in self._registered:
            return
        self._registered.add(id(engine))
        for name in (self.filename, self.final_filename):
            remove_stale_temps(self.save_dir / name)
        if self.save_interval > 0:
            event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
            engine.add_event_handler(event(every=self.save_interval), self.save_checkpoint)
        if self.save_final:
            engine.add_event_handler(Events.COMPLETED, self.completed)

    def save_checkpoint(self, engine: Engine) -> Path | None:
        """Write ``filename`` with the full training state now; returns its path, or ``None`` if refused."""
        objects = _engine_objects(engine, self.save_dict, self.engine_key, self.scaler_key)
        path = self._write(engine, objects, self.filename, "checkpoint")
        if path is not None:
            engine.state.last_checkpoint = str(path)
            engine.state.last_checkpoint_iteration = int(engine.state.iteration)
            self.logger.info(
                f"Saved checkpoint {path} (epoch {engine.state.epoch}, iteration {engine.state.iteration})."
            )
        return path

    def completed(self, engine: Engine) -> None:
        """At the end: the resumable checkpoint (unless this iteration's is already saved), then the final weights."""
        already = getattr(engine.state, "last_checkpoint_iteration", None) == engine.state.iteration
        if not (already and self.last_saved is not None) and self.save_checkpoint(engine) is None:
            self.logger.warning(f"Final weights {self.final_filename} not written (see the message above).")
            return
        final = {k: self.save_dict[k] for k in self.final_keys}
        path = self._write(engine, final, self.final_filename, "final")
        if path is not None:
            self.logger.info(f"Training completed, saved final weights {path}.")


class BestModelSaver(_SaverBase):
    """Write ``model_best.pt`` whenever the evaluator's key metric beats every earlier value; attach to the evaluator.

    The record of the best value is part of the training state: put this object in the trainer checkpoint's
    ``save_dict`` (e.g. as ``"best_saver"``) so a resumed run does not overwrite a better ``model_best.pt`` with the
    first model it validates. A NaN/Inf metric never counts as better, and weights holding NaN/Inf are never written.

    Args:
        save_dir: folder of the weights file.
        save_dict: objects to write, normally ``{"network": net}``.
        key_metric_name: metric in ``engine.state.metrics``; default: the evaluator's ``key_metric`` name.
        filename: name of the weights file.
        mode: ``"max"`` (Dice-like) or ``"min"`` (distance-like).
        name: logger name; default: the engine's logger.

    Example::

        best = BestModelSaver("runs/s1", {"network": net})
        best.attach(evaluator)  # runs/s1/model_best.pt, meta records {"key_metric": ..., "key_metric_value": ...}
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        key_metric_name: str | None = None,
        filename: str = "model_best.pt",
        mode: str = "max",
        name: str | None = None,
    ) -> None:
        super().__init__(save_dir, save_dict, name)
        if not self.save_dict:
            raise ValueError("BestModelSaver: save_dict is empty.")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        self.key_metric_name = key_metric_name
        self.filename = filename
        self.mode = mode
        self.best_metric: float | None = None
        self.best_epoch = -1
        self._registered: set[int] = set()

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch, "mode": self.mode}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if state_dict.get("mode", self.mode) != self.mode:
            raise ValueError(
                f"best-model record was kept with mode={state_dict['mode']!r}, this saver has {self.mode!r}."
            )
        best = state_dict.get("best_metric")
        self.best_metric = None if best is None else float(best)
        self.best_epoch = int(state_dict.get("best_epoch", -1))

    def attach(self, engine: Engine) -> None:
        self._attach_logger(engine)
        engine.add_event_handler(Events.STARTED, self._register)

    def _register(self, engine: Engine) -> None:
        # registered at STARTED so the metrics (attached at construction) are computed before this runs
        if id(engine) not in self._registered:
            self._registered.add(id(engine))
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _is_better(self, value: float) -> bool:
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.mode == "max" else value < self.best_metric

    def __call__(self, engine: Engine) -> Path | None:
        name = self.key_metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise KeyError(
                f"BestModelSaver: key metric {name!r} not in the engine's metrics {sorted(engine.state.metrics)}."
            )
        value = engine.state.metrics[name]
        if torch.is_tensor(value):
            if value.numel() != 1:
                self.logger.warning(f"Key metric {name} is not a scalar (shape {tuple(value.shape)}); not compared.")
                return None
            value = value.item()
        value = float(value)
        if not math.isfinite(value):
            self.logger.warning(f"Key metric {name} = {value} at epoch {engine.state.epoch}; not a candidate.")
            return None
        if not self._is_better(value):
            return None
        path = self._write(engine, self.save_dict, self.filename, "best", key_metric=name, key_metric_value=value)
        if path is not None:
            self.best_metric, self.best_epoch = value, int(engine.state.epoch)
            self.logger.info(f"New best {name} = {value:.4f} at epoch {engine.state.epoch}: saved {path}.")
        return path


class ResumeFromCheckpoint:
    """Ignite handler: when ``resume`` and ``load_path`` exists, restore the whole training state at ``STARTED``.

    Restores every item of ``load_dict`` (``ignite.handlers.Checkpoint.load_objects``) plus the engine's iteration and
    epoch (``engine_key``) and its AMP scaler, so ``trainer.run()`` continues with the next iteration. The file is read
    with :func:`custom.weights.load_checkpoint` (``weights_only=True``). The configured ``max_epochs`` wins over the
    checkpoint's (to extend a finished run); a changed epoch length (another data list or batch size) is an error,
    because epochs and iterations would no longer line up. Without a file it logs that training starts from scratch.

    Resuming from an epoch-level checkpoint with deterministic data reproduces the uninterrupted run exactly; from a
    mid-epoch (iteration-level) checkpoint ignite continues the count but restarts the data loader, so that epoch
    sees its first batches again (harmless with random patch sampling).

    Example::

        ResumeFromCheckpoint("runs/s1/checkpoint_last.pt", {"network": net, "optimizer": opt}).attach(trainer)
        trainer.run()  # "Resumed from runs/s1/checkpoint_last.pt at epoch 1, iteration 3: ..."
    """

    def __init__(
        self,
        load_path: str,
        load_dict: Mapping[str, Any],
        resume: bool = True,
        map_location: Any = "cpu",
        strict: bool = True,
        engine_key: str | None = "trainer",
        scaler_key: str | None = "scaler",
        name: str | None = None,
    ) -> None:
        self.load_path = Path(load_path)
        self.load_dict = _clean(load_dict, "ResumeFromCheckpoint")
        self.resume = as_bool(resume, "resume")
        self.map_location = map_location
        self.strict = strict
        self.engine_key = engine_key
        self.scaler_key = scaler_key
        self._name = name
        self.logger = logging.getLogger(name)
        self.restored: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.resume:
            self.logger.info("Resume is off: training starts from iteration 0.")
            return
        if not self.load_path.is_file():
            self.logger.info(f"No checkpoint at {self.load_path}: training starts from iteration 0.")
            return
        ckpt = load_checkpoint(self.load_path, self.map_location)
        if not isinstance(ckpt, Mapping):
            raise ValueError(f"{self.load_path} is not a checkpoint dict.")
        objects = _engine_objects(engine, self.load_dict, self.engine_key, self.scaler_key)
        optional = {self.scaler_key} if self.scaler_key else set()
        fatal = [k for k in objects if k not in ckpt and k not in optional]
        if fatal and self.strict:
            raise KeyError(
                f"{self.load_path} lacks {fatal} needed to resume; it holds {sorted(k for k in ckpt if k != META_KEY)}."
            )
        restored = []
        for k, obj in objects.items():
            if k not in ckpt:
                self.logger.warning(f"{self.load_path} has no {k!r}; it keeps its fresh state.")
            elif obj is engine:
                self._restore_engine(engine, ckpt[k])
                restored.append(k)
            elif isinstance(ckpt[k], Mapping) and len(ckpt[k]) == 0:
                # e.g. a GradScaler saved while disabled (CPU run) resumed with AMP on
                self.logger.warning(f"{self.load_path}: {k!r} was saved empty; it keeps its fresh state.")
            else:
                Checkpoint.load_objects({k: obj}, {k: ckpt[k]}, strict=self.strict)
                restored.append(k)
        ignored = sorted(k for k in ckpt if k not in objects and k != META_KEY)
        if ignored:
            self.logger.warning(f"{self.load_path}: entries not restored (not in load_dict): {ignored}.")
        self.restored = {
            "path": str(self.load_path),
            "iteration": int(engine.state.iteration),
            "epoch": int(engine.state.epoch),
            "keys": restored,
        }
        self.logger.info(
            f"Resumed from {self.load_path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}: "
            f"restored {', '.join(restored)}."
        )

    def _restore_engine(self, engine: Engine, state: Mapping[str, Any]) -> None:
        prior_max_epochs = engine.state.max_epochs
        prior_len = engine.state.epoch_length
        saved_len = state.get("epoch_length")
        if prior_len is not None and saved_len is not None and int(saved_len) != int(prior_len):
            raise ValueError(
                f"{self.load_path} was saved with {saved_len} iterations per epoch, this run has {prior_len} (data "
                "list, batch size or num_samples changed). Start a new run folder instead of resuming."
            )
        engine.load_state_dict(state)
        if prior_max_epochs is not None:
            if engine.state.epoch > prior_max_epochs:
                raise ValueError(
                    f"{self.load_path} is at epoch {engine.state.epoch}, beyond this run's max_epochs "
                    f"{prior_max_epochs}; raise max_epochs to train further."
                )
            engine.state.max_epochs = prior_max_epochs
