"""Checkpoints that survive a killed run, resume that continues where it stopped, and weights that can be trusted.

Why not MONAI's ``CheckpointSaver`` as is: it passes ``atomic=False`` to ignite's ``DiskSaver`` (for file permissions),
and with a fixed ``final_filename`` it deletes the previous file *before* writing the new one, so a kill at the wrong
moment leaves no checkpoint at all. It also saves at ``EXCEPTION_RAISED``, which after a NaN loss writes NaN weights,
and after a crash inside an iteration writes weights whose iteration count is one ahead of the optimizer steps taken.
Here every file is written to a temporary file in the same folder, flushed, fsynced and moved into place with
``os.replace`` (readable by group and others as the umask allows), a save is refused while any weight is NaN/Inf or
after :class:`custom.handlers.StopOnNaN` flagged the loss, and nothing is saved on exceptions: the last periodic
checkpoint is the state to resume from.

Files in ``<ckpt_dir>``:

- ``checkpoint_last.pt``: everything needed to resume (network, optimizer, lr_scheduler, the trainer's iteration and
  epoch, the AMP scaler, the best-model saver's record), every N epochs or iterations and at the end;
- ``model_final.pt``: ``{"network": state_dict, "meta": {...}}`` at the end of training;
- ``model_best.pt``: the same for the best validation key metric (:class:`BestModelSaver` on the evaluator).

Loading is always ``torch.load(..., weights_only=True)``: a file carrying a pickled object that would run code is
refused before anything executes (:class:`UnsafeCheckpointError`), a missing file is an error naming the path (never a
silent run on random weights), and an expected SHA-256 is checked before loading. ``"auto"`` takes it from the
``checksums.json`` beside the file (the bundle ships one for its weights in ``models/``) and skips the check with a
warning where there is none or where it does not list the file, so that a user's own weights load without a listing
while shipped weights that were changed or truncated are refused; pass the hex digest itself to insist on a check.

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

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from ignite.engine import Engine, Events

from custom.options import as_bool

__all__ = [
    "NONFINITE_STATE_ATTR",
    "WEIGHT_KEYS",
    "AtomicCheckpointSaver",
    "BestModelSaver",
    "ResumeFromCheckpoint",
    "UnsafeCheckpointError",
    "atomic_save",
    "load_checkpoint",
    "load_weights",
    "sha256_file",
    "verify_checksums",
    "write_checksums",
]

#: Attribute that :class:`custom.handlers.StopOnNaN` sets on ``engine.state`` (the iteration of the non-finite loss);
#: savers refuse to write while it is set.
NONFINITE_STATE_ATTR = "nonfinite_loss_iteration"
#: Keys under which a checkpoint dict may hold the network's state dict, tried in this order.
WEIGHT_KEYS: tuple[str, ...] = ("network", "model", "state_dict")
#: Key of the small metadata record written beside the state dicts.
META_KEY = "meta"
#: File name of the checksum list written by :func:`write_checksums`.
CHECKSUMS_FILE = "checksums.json"
#: Weight files listed by :func:`write_checksums` by default.
WEIGHT_PATTERNS: tuple[str, ...] = ("*.pt", "*.pth", "*.ts", "*.onnx", "*.safetensors")

_module_logger = logging.getLogger(__name__)


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects other than tensors and plain containers; it was not unpickled."""


# ---------------------------------------------------------------------------------------------------------------------
# atomic writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Persist a rename: fsync the folder entry (a no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then ``os.replace`` it into place.

    A failure or kill at any point before the rename leaves the previous ``path`` untouched (the temporary file is
    removed on exceptions; after a hard kill a hidden ``.<name>.*.tmp`` file may remain, which
    :class:`AtomicCheckpointSaver` cleans at its next start). Through :func:`custom.io.atomic_write`.
    """
    from custom.io import atomic_write  # the bundle's one atomic-write helper

    path = Path(path)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a half-written ``path``: temp file + fsync + ``os.replace``.

    Example::

        atomic_save({"network": net.state_dict()}, "runs/stage1/model_final.pt")
    """
    return _atomic_write(path, lambda f: torch.save(obj, f))


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _nonfinite_tensors(objects: Mapping[str, Any]) -> list[str]:
    """Names of floating-point parameters/buffers that hold NaN or Inf, over the modules in ``objects``."""
    bad = []
    for key, obj in objects.items():
        if not isinstance(obj, torch.nn.Module):
            continue
        for name, t in obj.state_dict().items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{key}.{name}")
    return bad


_SAFE_LEAVES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


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


def _meta(engine: Engine, kind: str, **extra: Any) -> dict[str, Any]:
    import monai

    meta = {
        "kind": kind,
        "iteration": int(engine.state.iteration or 0),
        "epoch": int(engine.state.epoch or 0),
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),  # TorchVersion is not a plain str: weights_only would refuse it
        "monai_version": str(monai.__version__),
    }
    meta.update(extra)
    return meta


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
    """Shared by the savers: logger resolution and the guarded, atomic write of selected state dicts."""

    def __init__(self, save_dir: str, save_dict: Mapping[str, Any], name: str | None) -> None:
        if not save_dir:
            raise ValueError("save_dir must name the checkpoint folder.")
        self.save_dir = Path(save_dir)
        self.save_dict = _clean(save_dict, type(self).__name__)
        self._name = name
        self.logger = logging.getLogger(name)
        self.last_saved: Path | None = None

    def _attach_logger(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger

    def _write(self, engine: Engine, objects: Mapping[str, Any], filename: str, meta: dict[str, Any]) -> Path | None:
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
        payload = {k: obj.state_dict() for k, obj in objects.items()}
        payload[META_KEY] = meta
        _check_loadable(payload, filename)
        path = atomic_save(payload, self.save_dir / filename)
        self.last_saved = path
        return path


class AtomicCheckpointSaver(_SaverBase):
    """Save the training state every N epochs/iterations and at the end, atomically, never after a NaN.

    ``checkpoint_last.pt`` holds every item of ``save_dict`` plus the engine it is attached to (under ``engine_key``,
    so :class:`ResumeFromCheckpoint` restores the iteration and epoch) and the engine's AMP ``scaler`` when it has one.
    At ``COMPLETED`` it also writes ``final_filename`` with only ``final_keys`` (the weights to ship).

    The handler registers its events when the engine starts, so it runs after every handler attached when the trainer
    was built (``LrScheduleHandler``, ``ValidationHandler``): the saved scheduler step and best-model record belong to
    the same epoch as the weights, whatever the order of the handler list.

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
        self._remove_stale_temporaries()
        if self.save_interval > 0:
            event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
            engine.add_event_handler(event(every=self.save_interval), self.save_checkpoint)
        if self.save_final:
            engine.add_event_handler(Events.COMPLETED, self.completed)

    def _remove_stale_temporaries(self) -> None:
        if not self.save_dir.is_dir():
            return
        for name in (self.filename, self.final_filename):
            for stale in self.save_dir.glob(f".{name}.*.tmp"):
                self.logger.warning(f"Removing an unfinished checkpoint left by a killed run: {stale}")
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()

    def _objects(self, engine: Engine) -> dict[str, Any]:
        return _engine_objects(engine, self.save_dict, self.engine_key, self.scaler_key)

    def save_checkpoint(self, engine: Engine) -> Path | None:
        """Write ``filename`` with the full training state now; returns its path, or ``None`` if refused."""
        path = self._write(engine, self._objects(engine), self.filename, _meta(engine, "checkpoint"))
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
        path = self._write(engine, final, self.final_filename, _meta(engine, "final"))
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
        meta = _meta(engine, "best", key_metric=name, key_metric_value=value)
        path = self._write(engine, self.save_dict, self.filename, meta)
        if path is not None:
            self.best_metric, self.best_epoch = value, int(engine.state.epoch)
            self.logger.info(f"New best {name} = {value:.4f} at epoch {engine.state.epoch}: saved {path}.")
        return path


# ---------------------------------------------------------------------------------------------------------------------
# safe loading


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", expected_sha256: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    ``expected_sha256`` is checked before unpickling (``"auto"``: the hash listed for this file in the
    ``checksums.json`` beside it; without a listing, or when the listing does not name the file, the file is loaded
    unverified with a warning). Raises ``FileNotFoundError`` (missing), ``ValueError`` (hash mismatch, unreadable
    file) or :class:`UnsafeCheckpointError` (pickled objects that ``weights_only`` refuses; nothing was executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path} (refusing to continue with untrained weights).")
    if expected_sha256:
        _check_sha256(path, expected_sha256)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it contains pickled objects other than tensors and plain containers, which "
            f"could run code when unpickled. Re-save only state dicts (torch.save(model.state_dict(), ...)). "
            f"Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"Cannot read checkpoint {path} (truncated or not a torch file?): {e}") from e


def _expected_from_checksums(path: Path) -> str | None:
    """The SHA-256 listed for ``path`` in the ``checksums.json`` beside it, or None (logged) when not listed."""
    listing = path.parent / CHECKSUMS_FILE
    if not listing.is_file():
        _module_logger.warning(f"{path}: not verified (no {CHECKSUMS_FILE} beside it; sha256 'auto').")
        return None
    try:
        files = json.loads(listing.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{listing} is not a checksum list written by write_checksums ({e!r}).") from e
    if path.name not in files:
        _module_logger.warning(f"{path}: not verified ({listing} does not list it; listed: {sorted(files)}).")
        return None
    return files[path.name]["sha256"]


def _check_sha256(path: Path, expected: str) -> None:
    source = "expected"
    if expected == "auto":
        expected = _expected_from_checksums(path)
        if expected is None:
            return
        source = f"listed in {path.parent / CHECKSUMS_FILE}"
    actual = sha256_file(path)
    if actual.lower() != expected.strip().lower():
        raise ValueError(
            f"SHA-256 mismatch for {path}: {source} {expected.strip().lower()}, got {actual}. The file is truncated, "
            "corrupt or was replaced; to load weights of your own, pass sha256 null (or their digest) or give "
            "another path."
        )


def _extract_state_dict(ckpt: Any, key: str | None, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state dict or a checkpoint dict.")
    if key is not None:
        if key not in ckpt:
            raise KeyError(f"{path} has no key {key!r}; its top-level keys are {sorted(map(str, ckpt))}.")
        sd = ckpt[key]
    elif ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        sd = ckpt
    else:
        found = [k for k in WEIGHT_KEYS if isinstance(ckpt.get(k), Mapping)]
        if not found:
            raise KeyError(
                f"{path} is neither a raw state dict nor a checkpoint with one of the keys {list(WEIGHT_KEYS)}; "
                f"its top-level keys are {sorted(map(str, ckpt))}."
            )
        sd = ckpt[found[0]]
    if not isinstance(sd, Mapping) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: the selected entry is not a state dict of tensors.")
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DistributedDataParallel/DataParallel wrapper
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_into(
    network: torch.nn.Module, sd: dict[str, torch.Tensor], strict: bool, skip_mismatched: bool, path: Path
) -> dict[str, torch.Tensor]:
    """Check the whole match first and only then copy, so a refused file leaves the network untouched."""
    own = network.state_dict()
    mismatched = {
        k: (tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape
    }
    if mismatched and not skip_mismatched:
        detail = ", ".join(f"{k}: file {a} vs network {b}" for k, (a, b) in list(mismatched.items())[:5])
        raise RuntimeError(
            f"{path}: {len(mismatched)} tensor(s) differ in shape from the network ({detail}). "
            "For fine-tuning to another label set pass skip_mismatched=True to keep those at their initialisation."
        )
    sd = {k: v for k, v in sd.items() if k not in mismatched}
    missing = sorted(set(own) - set(sd) - set(mismatched))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"{path}: weights do not match the network: missing {missing[:10]}, unexpected {unexpected[:10]} "
            "(strict=True)."
        )
    network.load_state_dict(sd, strict=False)
    if mismatched:
        _module_logger.warning(
            f"{path}: kept {len(mismatched)} tensor(s) at their initialisation because their shapes differ "
            f"(fine-tuning): {sorted(mismatched)}"
        )
    if missing or unexpected:
        _module_logger.warning(f"{path}: loaded non-strictly; missing {missing}, unexpected {unexpected}.")
    return sd


def load_weights(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    expected_sha256: str | None = None,
    strict: bool = True,
    network: torch.nn.Module | None = None,
    key: str | None = None,
    skip_mismatched: bool = False,
) -> dict[str, torch.Tensor]:
    """Load network weights safely and return the state dict (loaded into ``network`` when given).

    Accepts a raw state dict or a checkpoint dict with a ``network`` / ``model`` / ``state_dict`` entry (``key``
    picks another entry); a ``module.`` prefix from a DDP wrapper is removed. With ``network``, the match is checked
    before anything is copied: shape differences are an error unless ``skip_mismatched=True`` (fine-tuning to another
    label set: those tensors, typically the head, keep their initialisation and are logged), missing or unexpected
    names are an error when ``strict``.

    Example::

        load_weights("models/model.pt", expected_sha256="auto", network=net)  # hash from models/checksums.json
    """
    path = Path(path)
    sd = _extract_state_dict(load_checkpoint(path, map_location, expected_sha256), key, path)
    if network is not None:
        sd = _load_into(network, sd, strict, skip_mismatched, path)
        _module_logger.info(f"Loaded {len(sd)} tensors from {path} into {type(network).__name__}.")
    return sd


class ResumeFromCheckpoint:
    """Ignite handler: when ``resume`` and ``load_path`` exists, restore the whole training state at ``STARTED``.

    Restores every item of ``load_dict`` plus the engine's iteration and epoch (``engine_key``) and its AMP scaler,
    so ``trainer.run()`` continues with the next iteration. The configured ``max_epochs`` wins over the checkpoint's
    (to extend a finished run); a changed epoch length (another data list or batch size) is an error, because
    epochs and iterations would no longer line up. Without a file it logs that training starts from scratch.

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
        missing = [k for k in objects if k not in ckpt]
        optional = {self.scaler_key} if self.scaler_key else set()
        fatal = [k for k in missing if k not in optional]
        if fatal and self.strict:
            raise KeyError(
                f"{self.load_path} lacks {fatal} needed to resume; it holds {sorted(k for k in ckpt if k != META_KEY)}."
            )
        ignored = sorted(k for k in ckpt if k not in objects and k != META_KEY)
        restored = []
        for k, obj in objects.items():
            if k not in ckpt:
                self.logger.warning(f"{self.load_path} has no {k!r}; it keeps its fresh state.")
                continue
            state = ckpt[k]
            if obj is engine:
                self._restore_engine(engine, state)
            elif isinstance(state, Mapping) and len(state) == 0:
                # e.g. a GradScaler saved while disabled (CPU run) resumed with AMP on
                self.logger.warning(f"{self.load_path}: {k!r} was saved empty; it keeps its fresh state.")
                continue
            elif isinstance(obj, torch.nn.Module):
                obj.load_state_dict(state, strict=self.strict)
            else:
                obj.load_state_dict(state)
            restored.append(k)
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


# ---------------------------------------------------------------------------------------------------------------------
# checksums


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks.

    Example::

        sha256_file("models/model.pt")  # 'e3b0c442...'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def _weight_files(folder: Path, patterns: Iterable[str]) -> list[Path]:
    found = {p for pat in patterns for p in folder.rglob(pat) if p.is_file() and not p.name.startswith(".")}
    return sorted(found)


def write_checksums(
    folder: str | os.PathLike, patterns: Sequence[str] = WEIGHT_PATTERNS, filename: str = CHECKSUMS_FILE
) -> dict[str, str]:
    """Write ``<folder>/checksums.json`` listing the SHA-256 and size of every weight file below ``folder``.

    Example::

        write_checksums("models")  # {"model.pt": "9f2c...", "stage1/model.pt": "04ab..."}
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No such folder: {folder}")
    files = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in _weight_files(folder, patterns)
    }
    if not files:
        raise FileNotFoundError(f"No weight files matching {list(patterns)} below {folder}.")
    text = json.dumps({"algorithm": "sha256", "files": files}, indent=2, sort_keys=True) + "\n"
    _atomic_write(folder / filename, lambda f: f.write(text.encode()))
    return {k: v["sha256"] for k, v in files.items()}


def verify_checksums(
    folder: str | os.PathLike, filename: str = CHECKSUMS_FILE, patterns: Sequence[str] = WEIGHT_PATTERNS
) -> dict[str, str]:
    """Check every file listed in ``<folder>/checksums.json``; raise ``ValueError`` naming each missing or changed one.

    Weight files present but not listed are reported in the log, not an error. Returns the verified hashes.

    Example::

        verify_checksums("models")  # raises: "models/model.pt: expected 9f2c..., got 11aa..."
    """
    folder = Path(folder)
    listing = folder / filename
    if not listing.is_file():
        raise FileNotFoundError(f"No checksum list at {listing} (write it with write_checksums).")
    files = json.loads(listing.read_text())["files"]
    problems, verified = [], {}
    for rel, entry in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            problems.append(f"{path}: expected {entry['sha256']}, got {actual}")
        else:
            verified[rel] = actual
    if problems:
        raise ValueError(f"Checksum verification failed for {len(problems)} file(s): " + "; ".join(problems))
    unlisted = [p.relative_to(folder).as_posix() for p in _weight_files(folder, patterns)]
    unlisted = [r for r in unlisted if r not in files]
    if unlisted:
        _module_logger.warning(f"Weight files not listed in {listing}: {unlisted}")
    return verified


def load_network(
    network: torch.nn.Module,
    path: str | os.PathLike,
    device: Any = "cpu",
    sha256: str | None = None,
    strict: bool = True,
    skip_mismatched: bool = False,
    eval_mode: bool = True,
) -> torch.nn.Module:
    """Load weights into ``network`` (read on the CPU, safely) and return it on ``device``, for configs.

    A missing file is an error naming it: inference never runs on random weights.

    Example (config)::

        {"_target_": "custom.checkpoint.load_network", "network": "@network_def", "path": "@stage1_weights",
         "device": "@device"}
    """
    load_weights(
        path,
        map_location="cpu",
        expected_sha256=sha256,
        strict=strict,
        network=network,
        skip_mismatched=skip_mismatched,
    )
    network = network.to(device)
    return network.eval() if eval_mode else network
