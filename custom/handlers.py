"""Run safety for training and inference workflows: stop on a NaN loss, never clobber a run folder.

- :class:`StopOnNaN` stops the run at the first NaN/Inf loss with a message naming the iteration and the checkpoint
  kept, and flags the engine so :class:`custom.checkpoint.AtomicCheckpointSaver` writes nothing afterwards.
- :func:`guard_output_dir` refuses a run folder that already holds checkpoints or predictions unless overwriting or
  resuming was asked for.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.utils import apply_to_type

from custom.checkpoint import NONFINITE_STATE_ATTR

__all__ = ["RESULT_SUFFIXES", "StopOnNaN", "guard_output_dir"]

#: File endings that count as results of a run (weights, checkpoints, predicted images) for :func:`guard_output_dir`.
RESULT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".ckpt", ".ts", ".onnx", ".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def _loss_from_output(output: Any) -> Any:
    """The loss of a MONAI trainer's output: ``output["loss"]``, also after decollation (a list of dicts)."""
    if isinstance(output, dict):
        return output.get("loss", output)
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], dict) and "loss" in output[0]:
        return output[0]["loss"]
    return output


def _all_finite(value: Any) -> bool:
    found = []

    def _check(x: numbers.Number | torch.Tensor) -> None:
        t = x if torch.is_tensor(x) else torch.tensor(float(x))
        found.append(bool(torch.isfinite(t).all()))

    apply_to_type(value, (numbers.Number, torch.Tensor), _check)
    return all(found)


class StopOnNaN:
    """Stop training at the first NaN/Inf loss, saying at which iteration and which checkpoint was kept.

    Same check as ignite's ``TerminateOnNan`` (numbers and tensors in the output, also nested), but it raises a
    ``FloatingPointError`` by default so a scripted run exits non-zero instead of "completing" normally, and it
    flags ``engine.state`` so :class:`custom.checkpoint.AtomicCheckpointSaver` never writes the NaN weights over
    the last good checkpoint (the saver also refuses weights that hold NaN/Inf, whatever the handler order).
    With ``raise_error=False`` it calls ``engine.terminate()`` instead (the run ends, nothing more is saved).

    Args:
        output_transform: picks the value to check from ``engine.state.output``; default: the ``"loss"`` entry.
        checkpoint_path: the checkpoint to name in the message when no saver on this engine reported one.
        raise_error: raise ``FloatingPointError`` (default) or terminate quietly.
        name: logger name; default: the engine's logger.

    Example (config)::

        "train#handlers": [..., {"_target_": "custom.handlers.StopOnNaN"}]
        # FloatingPointError: Loss is NaN/Inf at iteration 412 (epoch 3): nan. Training stopped; the weights of
        # this iteration were not saved. Last good checkpoint kept: runs/s1/checkpoint_last.pt (iteration 400).
    """

    def __init__(
        self,
        output_transform: Callable[[Any], Any] = _loss_from_output,
        checkpoint_path: str | None = None,
        raise_error: bool = True,
        name: str | None = None,
    ) -> None:
        self.output_transform = output_transform
        self.checkpoint_path = checkpoint_path
        self.raise_error = raise_error
        self._name = name
        self.logger = logging.getLogger(name)
        self.message: str | None = None

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _kept(self, engine: Engine) -> str:
        path = getattr(engine.state, "last_checkpoint", None)
        if path is not None:
            return f"Last good checkpoint kept: {path} (iteration {engine.state.last_checkpoint_iteration})."
        if self.checkpoint_path and Path(self.checkpoint_path).is_file():
            return f"Last good checkpoint kept: {self.checkpoint_path} (saved before this run or iteration)."
        return "No checkpoint was saved before the failure."

    def __call__(self, engine: Engine) -> None:
        value = self.output_transform(engine.state.output)
        if _all_finite(value):
            return
        shown = value.item() if torch.is_tensor(value) and value.numel() == 1 else value
        setattr(engine.state, NONFINITE_STATE_ATTR, int(engine.state.iteration))
        self.message = (
            f"Loss is NaN/Inf at iteration {engine.state.iteration} (epoch {engine.state.epoch}): {shown}. "
            f"Training stopped; the weights of this iteration were not saved. {self._kept(engine)} "
            "Check the input data and the learning rate before resuming."
        )
        self.logger.error(self.message)
        if self.raise_error:
            raise FloatingPointError(self.message)
        engine.terminate()


def _result_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(tuple(suffixes)))


def guard_output_dir(
    path: str | os.PathLike,
    overwrite: bool = False,
    resume: bool = False,
    suffixes: Sequence[str] = RESULT_SUFFIXES,
) -> str:
    """Create ``path`` and return it, refusing a folder that already holds results of an earlier run.

    Results are files below ``path`` ending in one of ``suffixes`` (checkpoints, weights, predicted images). With
    ``resume=True`` they are expected (the checkpoint to resume from); with ``overwrite=True`` they may be replaced;
    otherwise a ``FileExistsError`` names them, so a second run cannot silently mix its files with the first's.

    Example (config)::

        "ckpt_dir": "$custom.handlers.guard_output_dir(@bundle_root + '/runs/stage1', resume=@resume)"
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"Output path exists and is not a folder: {folder}")
    if folder.is_dir():
        found = _result_files(folder, suffixes)
        if found and not (overwrite or resume):
            shown = ", ".join(str(p.relative_to(folder)) for p in found[:5]) + (", ..." if len(found) > 5 else "")
            raise FileExistsError(
                f"{folder} already holds {len(found)} result file(s) ({shown}). Choose a new folder, or pass "
                "resume=True to continue that run, or overwrite=True to replace its files."
            )
        if found:
            logging.getLogger(__name__).warning(
                f"{folder} holds {len(found)} result file(s); they will be "
                f"{'resumed from' if resume else 'overwritten'}."
            )
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)
