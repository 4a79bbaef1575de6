"""Experiment tracking: a run of the command with --logger mlflow --logger wandb --logger tensorboard sends every
iteration's return, cost and duals to MLflow's local file store, to Weights & Biases (offline mode: its local run
files) and to TensorBoard's event files; a sweep file's `loggers:` key too."""

import json
import os
import struct
from pathlib import Path

import pytest

from helpers import SMALL_SETTINGS, gcs_address, run_cli, trial_results


def tensorboard_scalars(trial: Path) -> dict:
    """{tag: [values]} from the TensorBoard event files of a trial (TFRecord framing, tensorboardX's protos)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict = {}
    for path in sorted(trial.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


@pytest.mark.slow
def test_train_logs_to_mlflow_and_tensorboard(ray_local, tmp_path):
    import mlflow

    config = tmp_path / "small.yaml"
    config.write_text(SMALL_SETTINGS)
    store = (tmp_path / "mlruns").as_uri()
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, WANDB_MODE="offline", WANDB_DIR=str(tmp_path),
               WANDB_SILENT="true")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process to read the file store back
    proc = run_cli("train", "--env", "SpeedLimit-v0", "--total-env-steps", 2000, "--env-runners", 0, "--config", config,
                   "--output", tmp_path, "--name", "tracked", "--logger", "mlflow", "--logger", "wandb", "--logger",
                   "tensorboard",
                   "--address", gcs_address(ray_local), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trial, rows = trial_results(tmp_path / "tracked")
    costs = [r["cvpo"]["episode_cost"] for r in rows]

    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "cvpo/episode_cost")
    assert [m.step for m in history] == [1, 2] and [m.value for m in history] == costs
    for key in ("cvpo/episode_return", "cvpo/eval_cost", "learners/default_policy/lambda",
                "learners/default_policy/eta"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    assert run.data.params["cost_limit"] == "25.0"

    # W&B (offline mode): one run, whose record file holds each iteration's cost (its exact JSON, as W&B logs
    # values) under the metric's name, and the duals. (wandb 0.31 has no Python reader for these files.)
    (record_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = record_file.read_bytes()
    assert all(json.dumps(cost).encode() in records for cost in costs)
    for key in (b"cvpo/episode_cost", b"cvpo/eval_return", b"learners/default_policy/lambda"):
        assert records.count(key) >= 2, key

    scalars = tensorboard_scalars(trial)
    assert scalars["ray/tune/cvpo/episode_cost"] == pytest.approx(costs, rel=1e-6)  # stored as float32
    assert len(scalars["ray/tune/learners/default_policy/lambda"]) == 2
