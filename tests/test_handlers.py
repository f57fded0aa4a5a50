"""StopOnNaN keeps the last good checkpoint, seeding reproduces, and run folders are not clobbered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from parameterized import parameterized
from test_checkpoint import TinyRun, tiny_net

from custom.checkpoint import AtomicCheckpointSaver, load_checkpoint
from custom.handlers import StopOnNaN, _all_finite, _loss_from_output, guard_output_dir


class NaNLossAt:
    """MSE loss that turns NaN on its n-th call, so that step writes NaN into the weights."""

    def __init__(self, call: int):
        self.call, self.calls = call, 0

    def __call__(self, pred, target):
        self.calls += 1
        loss = torch.nn.functional.mse_loss(pred, target)
        return loss * float("nan") if self.calls == self.call else loss


# handler: StopOnNaN raising, StopOnNaN terminating, or no NaN handler at all (only the saver's own weight check)
NAN_CASES = [("raise", True), ("terminate", False), ("saver_only", None)]


@parameterized.expand(NAN_CASES)
def test_nan_loss_keeps_last_good_checkpoint(_, raise_error):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        handlers = [] if raise_error is None else [StopOnNaN(raise_error=raise_error)]
        run = TinyRun(d, handlers=handlers, loss=NaNLossAt(4), save_interval=1, epoch_level=False)
        if raise_error:
            with pytest.raises(FloatingPointError) as err:
                run.run()
            message = str(err.value)
            assert "iteration 4 (epoch 2)" in message
            assert f"{Path(d) / 'checkpoint_last.pt'} (iteration 3)" in message
        else:
            run.run()
        # terminate stops at iteration 4; without a NaN handler the run goes on with NaN weights to the end
        assert run.trainer.state.iteration == (6 if raise_error is None else 4)
        assert not bool(torch.isfinite(run.net[0].weight).all())
        saved = load_checkpoint(Path(d) / "checkpoint_last.pt")
        assert saved["meta"]["iteration"] == 3 and saved["trainer"]["iteration"] == 3
        assert all(bool(torch.isfinite(v).all()) for v in saved["network"].values())
        assert not (Path(d) / "model_final.pt").exists()


def test_stop_on_nan_message_without_saver(tmp_path):
    engine = Engine(lambda e, b: {"loss": torch.tensor(float("inf"))})
    StopOnNaN(checkpoint_path=str(tmp_path / "checkpoint_last.pt")).attach(engine)
    with pytest.raises(FloatingPointError, match="iteration 1 .*No checkpoint was saved"):
        engine.run([0, 1], max_epochs=1)
    (tmp_path / "checkpoint_last.pt").write_bytes(b"x")
    handler = StopOnNaN(checkpoint_path=str(tmp_path / "checkpoint_last.pt"), raise_error=False)
    engine = Engine(lambda e, b: {"loss": torch.tensor(float("nan"))})
    handler.attach(engine)
    engine.run([0, 1], max_epochs=1)
    assert engine.state.iteration == 1 and engine.state.nonfinite_loss_iteration == 1
    assert "Last good checkpoint kept: " + str(tmp_path / "checkpoint_last.pt") in handler.message


def test_flag_blocks_saver_even_with_finite_weights(tmp_path):
    engine = Engine(lambda e, b: None)
    saver = AtomicCheckpointSaver(str(tmp_path), {"network": tiny_net()})
    saver.attach(engine)
    engine.state.nonfinite_loss_iteration = 7
    assert saver.save_checkpoint(engine) is None
    assert not (tmp_path / "checkpoint_last.pt").exists()


@parameterized.expand(
    [
        ("dict", {"loss": torch.tensor(1.0), "pred": torch.zeros(1)}, torch.tensor(1.0)),
        ("decollated", [{"loss": 2.0, "pred": 0}, {"loss": 2.0, "pred": 1}], 2.0),
        ("plain", 3.0, 3.0),
    ]
)
def test_loss_from_output(_, output, expected):
    assert _loss_from_output(output) == expected


@parameterized.expand(
    [
        ("finite", [1.0, torch.ones(3), {"a": 2}], True),
        ("nan_nested", [1.0, {"a": torch.tensor([1.0, float("nan")])}], False),
        ("inf_number", (float("-inf"),), False),
    ]
)
def test_all_finite(_, value, expected):
    assert _all_finite(value) is expected


GUARD_CASES = [
    ("new_folder", [], {}, None),
    ("only_logs", ["train.log", "metrics.csv"], {}, None),
    ("checkpoint", ["checkpoint_last.pt"], {}, "checkpoint_last.pt"),
    ("nested_prediction", ["preds/case_001_seg.nii.gz"], {}, "case_001_seg.nii.gz"),
    ("resume", ["checkpoint_last.pt"], {"resume": True}, None),
    ("overwrite", ["preds/a.nii.gz"], {"overwrite": True}, None),
]


@parameterized.expand(GUARD_CASES)
def test_guard_output_dir(_, files, kwargs, error):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "run"
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"x")
        if error:
            with pytest.raises(FileExistsError, match=error):
                guard_output_dir(folder, **kwargs)
        else:
            assert guard_output_dir(folder, **kwargs) == str(folder)
            assert folder.is_dir()
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted(files)


def test_guard_output_dir_rejects_a_file(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(NotADirectoryError):
        guard_output_dir(tmp_path / "x")
