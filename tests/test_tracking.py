"""Experiment tracking of a training run: TensorBoard by default (train.json's handlers) and MLflow through MONAI's own
``python -m monai.bundle run ... --tracking mlflow``, to a local SQLite store beside the run (offline; MLflow 3 no
longer accepts the ``file://`` store and MONAI 1.6 refuses it)."""

from __future__ import annotations

import math
import os
import subprocess

import pytest
from bundle_utils import ROOT, SUBPROCESS_TIMEOUT, TINY, bundle_cli, write_tiny_dataset

#: No telemetry calls from MLflow (this machine is offline); MLFLOW_TRACKING_URI, when set, would override the store.
OFFLINE_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("phantoms"), n_train=3, n_test=0)


def _train_cli(dataset, out, *extra: str) -> subprocess.CompletedProcess:
    cmd = bundle_cli(
        ["common.json", "train.json"], {**TINY, "dataset_dir": str(dataset.parent), "output_dir": str(out)}
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OFFLINE_ENV)
    return subprocess.run([*cmd, *extra], cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env)


def test_mlflow_and_tensorboard_record_loss_and_metrics(dataset, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("alembic")
    out = tmp_path / "run"
    res = _train_cli(dataset, out, "--tracking", "mlflow", "--experiment_name", "cascade_test")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    # TensorBoard, on by default: the per-iteration loss and the validation metric
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for events in out.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags.update({t: acc.Scalars(t) for t in acc.Tags()["scalars"]})
    assert [e.step for e in tags["train_loss"]] == [1, 2]
    assert "val_mean_dice" in tags

    # MLflow: one finished run in the SQLite store beside the run folder, with the same loss and metric
    db = out / "mlruns.db"
    assert db.is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("cascade_test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in loss] == [1, 2] and all(math.isfinite(m.value) for m in loss)
    assert [m.value for m in loss] == pytest.approx([e.value for e in sorted(tags["train_loss"], key=lambda e: e.step)])
    assert 0.0 <= run.data.metrics["val_mean_dice"] <= 1.0
    assert {"liver", "pancreas"} <= set(run.data.metrics), "per-organ Dice, logged by name"
    assert run.data.metrics["lr_group_0"] == pytest.approx(0.01)
    assert run.data.params["epoch_length"] == str(TINY["epoch_length"])
