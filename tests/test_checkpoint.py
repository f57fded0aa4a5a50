"""Atomic checkpoints, exact resume, best/final weights, safe weight loading and checksums (tiny nets, CPU)."""

from __future__ import annotations

import copy
import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler
from parameterized import parameterized

from custom.checkpoint import AtomicCheckpointSaver, AtomicDiskSaver, BestModelSaver, ResumeFromCheckpoint, atomic_save
from custom.weights import load_checkpoint

# ---------------------------------------------------------------------------------------------------------------------
# a tiny, deterministic training run: 6 samples, batch 2 -> 3 iterations per epoch


def tiny_net(out_channels: int = 2) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, out_channels, 1)
    )


def tiny_data(n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(1234)
    return [{"image": torch.randn(1, 8, 8, generator=g), "label": torch.rand(2, 8, 8, generator=g)} for _ in range(n)]


class KillAt:
    """Raise at the end of a given iteration, like a run killed in the middle of an epoch."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.iteration), self._kill)

    def _kill(self, engine: Engine) -> None:
        raise RuntimeError(f"simulated kill at iteration {engine.state.iteration}")


class TinyRun:
    """Network, optimizer (with momentum state), scheduler and a MONAI SupervisedTrainer wired with the handlers."""

    def __init__(
        self,
        ckpt_dir,
        seed=0,
        n=6,
        max_epochs=2,
        handlers=(),
        loss=None,
        save_interval=1,
        epoch_level=True,
        device="cpu",
        amp=False,
    ):
        torch.manual_seed(seed)
        self.net = tiny_net().to(device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.5)
        objects = {"network": self.net, "optimizer": self.opt, "lr_scheduler": self.sched}
        self.resume = ResumeFromCheckpoint(str(Path(ckpt_dir) / "checkpoint_last.pt"), objects)
        self.saver = AtomicCheckpointSaver(str(ckpt_dir), objects, save_interval=save_interval, epoch_level=epoch_level)
        loader = torch.utils.data.DataLoader(tiny_data(n), batch_size=2, shuffle=False)
        # the saver is listed before the scheduler on purpose: it must still save the stepped scheduler
        train_handlers = [self.resume, self.saver, LrScheduleHandler(self.sched, print_lr=False), *handlers]
        self.trainer = SupervisedTrainer(
            device=torch.device(device),
            amp=amp,
            max_epochs=max_epochs,
            train_data_loader=loader,
            network=self.net,
            optimizer=self.opt,
            loss_function=loss or torch.nn.MSELoss(),
            train_handlers=train_handlers,
        )

    def run(self):
        self.trainer.run()
        return self


def assert_states_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_states_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_states_equal(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b


# ---------------------------------------------------------------------------------------------------------------------
# atomic writing


def test_atomic_save_roundtrip_and_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_save({"w": torch.arange(3.0)}, tmp_path / "sub" / "x.pt")
    finally:
        os.umask(old)
    assert path == tmp_path / "sub" / "x.pt"
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3.0))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]


KILL_CASES = [("runtime_error", RuntimeError), ("keyboard_interrupt", KeyboardInterrupt), ("disk_full", OSError)]


@parameterized.expand(KILL_CASES)
def test_failed_write_keeps_previous_file(_, exc_type):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "checkpoint_last.pt"
        atomic_save({"w": torch.ones(100)}, path)
        before = path.read_bytes()
        real_save = torch.save

        def dying_save(obj, f, *a, **k):
            real_save({"w": torch.full((100,), float("nan"))}, f)
            f.truncate(50)  # a half-written file ...
            raise exc_type("killed while writing")  # ... and the process dies

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "save", dying_save)
            with pytest.raises(exc_type):
                atomic_save({"w": torch.zeros(100)}, path)
        assert path.read_bytes() == before
        assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(100))
        assert sorted(p.name for p in Path(d).iterdir()) == ["checkpoint_last.pt"]  # no temporary left


def test_saver_removes_stale_temporaries(tmp_path):
    stale = tmp_path / ".checkpoint_last.pt.abc123.tmp"
    stale.write_bytes(b"half")
    TinyRun(tmp_path, max_epochs=1).run()
    assert not stale.exists()


# ---------------------------------------------------------------------------------------------------------------------
# resume


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    ref = TinyRun(tmp_path / "ref").run()
    assert ref.trainer.state.iteration == 6 and ref.sched.last_epoch == 2

    with pytest.raises(RuntimeError, match="simulated kill at iteration 5"):
        TinyRun(tmp_path / "run", handlers=[KillAt(5)]).run()
    saved = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    assert saved["meta"]["iteration"] == 3 and saved["trainer"]["iteration"] == 3
    assert saved["lr_scheduler"]["last_epoch"] == 1  # the epoch's scheduler step is inside the checkpoint

    resumed = TinyRun(tmp_path / "run", seed=99).run()  # another init: everything must come from the checkpoint
    assert resumed.resume.restored == {
        "path": str(tmp_path / "run" / "checkpoint_last.pt"),
        "iteration": 3,
        "epoch": 1,
        "keys": ["network", "optimizer", "lr_scheduler", "trainer"],
    }
    assert resumed.trainer.state.iteration == 6 and resumed.trainer.state.epoch == 2
    assert_states_equal(resumed.net.state_dict(), ref.net.state_dict())
    assert_states_equal(resumed.opt.state_dict(), ref.opt.state_dict())
    assert_states_equal(resumed.sched.state_dict(), ref.sched.state_dict())


@pytest.mark.gpu
def test_resume_amp_run_on_cuda_restores_scaler(tmp_path):
    ref = TinyRun(tmp_path / "ref", device="cuda", amp=True).run()
    with pytest.raises(RuntimeError, match="simulated kill"):
        TinyRun(tmp_path / "run", device="cuda", amp=True, handlers=[KillAt(5)]).run()
    saved = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")  # map_location="cpu"
    assert saved["scaler"]["scale"] > 0 and all(v.device.type == "cpu" for v in saved["network"].values())
    saved_scaler = {"scale": saved["scaler"]["scale"], "tracker": saved["scaler"]["_growth_tracker"]}
    assert saved_scaler != {"scale": 65536.0, "tracker": 0}  # after 3 steps (taken or skipped) it is not a fresh one
    at_start = {}
    run = TinyRun(tmp_path / "run", seed=99, device="cuda", amp=True)
    run.trainer.add_event_handler(
        Events.EPOCH_STARTED(once=2),
        lambda e: at_start.update(scale=e.scaler.get_scale(), tracker=e.scaler._get_growth_tracker()),
    )
    run.run()
    assert "scaler" in run.resume.restored["keys"]
    assert at_start == saved_scaler
    assert run.trainer.state.iteration == 6 and run.net[0].weight.device.type == "cuda"
    for a, b in zip(run.net.parameters(), ref.net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # cuDNN may pick other kernels: close, not equal


def test_resume_from_iteration_checkpoint_restores_counters_and_optimizer(tmp_path):
    with pytest.raises(RuntimeError):
        TinyRun(tmp_path, handlers=[KillAt(5)], save_interval=2, epoch_level=False).run()
    saved = load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert saved["meta"]["iteration"] == 4

    run = TinyRun(tmp_path, seed=7, save_interval=2, epoch_level=False)
    restored = {}
    run.trainer.add_event_handler(
        Events.EPOCH_STARTED(once=2),  # fires right after the resume at STARTED, before any new step
        lambda e: restored.update(
            opt=copy.deepcopy(run.opt.state_dict()), sched=run.sched.state_dict(), it=e.state.iteration
        ),
    )
    run.run()
    assert run.resume.restored["iteration"] == 4 and run.resume.restored["epoch"] == 1
    assert restored["it"] == 4
    assert_states_equal(restored["opt"], saved["optimizer"])
    assert_states_equal(restored["sched"], saved["lr_scheduler"])
    assert run.trainer.state.iteration == 6 and run.trainer.state.epoch == 2


def test_resume_off_or_missing_file_starts_fresh(tmp_path):
    fresh = TinyRun(tmp_path, max_epochs=1).run()
    assert fresh.resume.restored is None and fresh.trainer.state.iteration == 3

    off = TinyRun(tmp_path, max_epochs=1)
    off.resume.resume = False
    off.run()
    assert off.resume.restored is None and off.trainer.state.iteration == 3


def test_resume_extends_max_epochs(tmp_path):
    TinyRun(tmp_path, max_epochs=1).run()
    longer = TinyRun(tmp_path, max_epochs=2).run()
    assert longer.resume.restored["iteration"] == 3
    assert longer.trainer.state.iteration == 6 and longer.trainer.state.max_epochs == 2


@parameterized.expand([("epoch_length_changed", 8, 2, "iterations per epoch"), ("beyond_max_epochs", 6, 1, "epoch 2")])
def test_resume_refuses_inconsistent_run(_, n, max_epochs, message):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        TinyRun(d, max_epochs=2).run()
        with pytest.raises(ValueError, match=message):
            TinyRun(d, n=n, max_epochs=max_epochs).run()


def test_resume_missing_entry_is_an_error(tmp_path):
    atomic_save({"network": tiny_net().state_dict()}, tmp_path / "checkpoint_last.pt")
    with pytest.raises(KeyError, match="lacks .*optimizer"):
        TinyRun(tmp_path).run()


def test_final_and_last_files(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run = TinyRun(tmp_path).run()
    last = load_checkpoint(tmp_path / "checkpoint_last.pt")
    final = load_checkpoint(tmp_path / "model_final.pt")
    assert set(last) == {"network", "optimizer", "lr_scheduler", "trainer", "meta"}
    assert set(final) == {"network", "meta"}
    assert final["meta"]["kind"] == "final" and final["meta"]["iteration"] == 6 and final["meta"]["epoch"] == 2
    assert_states_equal(final["network"], run.net.state_dict())
    # the end-of-epoch save and the end-of-run save are the same iteration: written once
    assert "Saved checkpoint" in caplog.text and caplog.text.count("(epoch 2, iteration 6)") == 1
    assert run.trainer.state.last_checkpoint == str(tmp_path / "checkpoint_last.pt")


def test_saver_refuses_nonfinite_weights_and_keeps_previous(tmp_path):
    net = tiny_net()
    engine = Engine(lambda e, b: None)
    saver = AtomicCheckpointSaver(str(tmp_path), {"network": net}, save_interval=0)
    saver.attach(engine)
    assert saver.save_checkpoint(engine) == tmp_path / "checkpoint_last.pt"
    before = (tmp_path / "checkpoint_last.pt").read_bytes()
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = float("inf")
    assert saver.save_checkpoint(engine) is None
    assert (tmp_path / "checkpoint_last.pt").read_bytes() == before


@parameterized.expand(KILL_CASES)
def test_saver_keeps_the_previous_checkpoint_when_the_next_write_dies(_, exc_type):
    """Through ignite's ``Checkpoint``: it asks the save handler to remove the previous file of the same name before
    writing the new one; :class:`AtomicDiskSaver` deletes nothing, so a write that dies keeps the previous file."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        net, engine = tiny_net(), Engine(lambda e, b: None)
        saver = AtomicCheckpointSaver(d, {"network": net}, save_interval=0)
        saver.attach(engine)
        path = saver.save_checkpoint(engine)
        before = path.read_bytes()
        real_save = torch.save

        def dying_save(obj, f, *a, **k):
            real_save(obj, f)
            f.truncate(50)
            raise exc_type("killed while writing")

        with torch.no_grad():
            net[0].weight.add_(1.0)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "save", dying_save)
            with pytest.raises(exc_type):
                saver.save_checkpoint(engine)
        assert path.read_bytes() == before
        assert sorted(p.name for p in Path(d).iterdir()) == ["checkpoint_last.pt"]
        assert saver.save_checkpoint(engine) == path  # the next save works and holds the new weights
        assert torch.equal(load_checkpoint(path)["network"]["0.weight"], net[0].weight)


def test_disk_saver_refuses_what_weights_only_cannot_read_and_removes_nothing(tmp_path):
    saver = AtomicDiskSaver(tmp_path)
    saver({"w": torch.ones(2)}, "x.pt")
    saver.remove("x.pt")
    assert (tmp_path / "x.pt").is_file()
    with pytest.raises(TypeError, match=r"x\.pt\['extra'\] is a .*Path, which torch.load\(weights_only=True\) cannot"):
        saver({"w": torch.zeros(2), "extra": Path("a")}, "x.pt")
    assert torch.equal(load_checkpoint(tmp_path / "x.pt")["w"], torch.ones(2))


@parameterized.expand(
    [
        ("empty", {}, {}, "nothing to save"),
        ("reserved_meta", {"meta": 1}, {}, "reserved"),
        ("final_key_absent", {"model": 1}, {}, "final_keys"),
        ("negative_interval", {"network": 1}, {"save_interval": -1}, "save_interval"),
    ]
)
def test_saver_argument_errors(_, save_dict, kwargs, message):
    with pytest.raises(ValueError, match=message):
        AtomicCheckpointSaver("x", save_dict, engine_key=None, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# best model


def run_validations(saver, metrics, net=None):
    """Drive a bare evaluator-like engine: epoch i reports metrics[i-1] as its key metric."""
    engine = Engine(lambda e, b: None)
    engine.state.key_metric_name = "dice"
    values = iter(metrics)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(dice=next(values)))
    saver.attach(engine)
    engine.run([0], max_epochs=len(metrics))
    return engine


BEST_CASES = [
    ("max", [0.5, 0.7, 0.6], 0.7, 2),
    ("min", [0.5, 0.7, 0.3], 0.3, 3),
    ("nan_never_best", [0.5, float("nan"), 0.4], 0.5, 1),
    ("tensor_metric", [torch.tensor(0.2), torch.tensor(0.9)], 0.9, 2),
]


@parameterized.expand(BEST_CASES)
def test_best_model_saver(mode, metrics, best, epoch):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        net = tiny_net()
        saver = BestModelSaver(d, {"network": net}, mode="min" if mode == "min" else "max")
        run_validations(saver, metrics)
        saved = load_checkpoint(Path(d) / "model_best.pt")
        assert saved["meta"]["key_metric"] == "dice"
        assert saved["meta"]["key_metric_value"] == pytest.approx(best)
        assert saved["meta"]["epoch"] == epoch
        assert saver.state_dict()["best_metric"] == pytest.approx(best) and saver.best_epoch == epoch


def test_best_record_survives_resume(tmp_path):
    first = BestModelSaver(str(tmp_path), {"network": tiny_net()})
    run_validations(first, [0.8])
    before = (tmp_path / "model_best.pt").read_bytes()
    again = BestModelSaver(str(tmp_path), {"network": tiny_net()})
    again.load_state_dict(first.state_dict())
    run_validations(again, [0.6])
    assert (tmp_path / "model_best.pt").read_bytes() == before
    with pytest.raises(ValueError, match="mode"):
        BestModelSaver(str(tmp_path), {"network": tiny_net()}, mode="min").load_state_dict(first.state_dict())


def test_best_saver_unknown_metric(tmp_path):
    engine = Engine(lambda e, b: None)
    BestModelSaver(str(tmp_path), {"network": tiny_net()}, key_metric_name="hausdorff").attach(engine)
    with pytest.raises(KeyError, match="hausdorff"):
        engine.run([0], max_epochs=1)


def bundle_config(ckpt_dir: str, resume: bool) -> dict:
    """A config in the bundle's style: the trainer and scaler come from the engine, so no circular reference."""
    return {
        "ckpt_dir": ckpt_dir,
        "resume": resume,
        "data": "$[{'image': torch.randn(1, 8, 8), 'label': torch.rand(2, 8, 8)} for _ in range(6)]",
        "network": {"_target_": "torch.nn.Conv2d", "in_channels": 1, "out_channels": 2, "kernel_size": 3, "padding": 1},
        "optimizer": {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": 0.01, "momentum": 0.9},
        "ckpt_best": {
            "_target_": "custom.checkpoint.BestModelSaver",
            "save_dir": "@ckpt_dir",
            "save_dict": {"network": "@network"},
        },
        "ckpt_objects": {"network": "@network", "optimizer": "@optimizer", "best_saver": "@ckpt_best"},
        "trainer": {
            "_target_": "SupervisedTrainer",
            "device": "$torch.device('cpu')",
            "max_epochs": 1,
            "train_data_loader": "$torch.utils.data.DataLoader(@data, batch_size=2)",
            "network": "@network",
            "optimizer": "@optimizer",
            "loss_function": "$torch.nn.MSELoss()",
            "amp": False,
            "train_handlers": [
                {
                    "_target_": "custom.checkpoint.ResumeFromCheckpoint",
                    "load_path": "$@ckpt_dir + '/checkpoint_last.pt'",
                    "load_dict": "@ckpt_objects",
                    "resume": "@resume",
                },
                {
                    "_target_": "custom.checkpoint.AtomicCheckpointSaver",
                    "save_dir": "@ckpt_dir",
                    "save_dict": "@ckpt_objects",
                },
                {"_target_": "custom.handlers.StopOnNaN"},
            ],
        },
    }


def test_handlers_from_bundle_config(tmp_path):
    from monai.bundle import ConfigParser

    first = ConfigParser(bundle_config(str(tmp_path), resume=False)).get_parsed_content("trainer")
    first.run()
    saved = load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert set(saved) == {"network", "optimizer", "best_saver", "trainer", "meta"}
    parser = ConfigParser(bundle_config(str(tmp_path), resume=True))
    parser["trainer"]["max_epochs"] = 2
    second = parser.get_parsed_content("trainer")
    second.run()
    resume = parser.get_parsed_content("trainer#train_handlers#0")
    assert resume.restored["iteration"] == 3 and resume.restored["keys"] == [
        "network",
        "optimizer",
        "best_saver",
        "trainer",
    ]
    assert second.state.iteration == 6 and load_checkpoint(tmp_path / "model_final.pt")["meta"]["iteration"] == 6
