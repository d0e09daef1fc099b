"""The driver's side of training progress: records sent through a real
ProgressChannel actor reach TensorBoard (and MLflow, when asked) step by
step; a resumed run purges the events a killed run logged past its
checkpoint."""

from __future__ import annotations

import pytest

from raysys.runtime import progress_channel
from raysys.train.monitor import TB_DIR, TrainMonitor
from tests.helpers import import_or_skip

pytestmark = pytest.mark.slow  # a real ProgressChannel actor: a Ray cluster


def _record(step: int, loss: float) -> dict:
    return {
        "step": step,
        "total_steps": 6,
        "epoch": step / 6,
        "loss": loss,
        "lr": 1e-4,
        "examples_per_s": 4.0,
        "tokens_per_s": 900.0,
    }


def _scalars(path, tag="train/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return [(e.step, round(e.value, 4)) for e in acc.Scalars(tag)]


def _feed(channel, start: int, steps: range) -> None:
    import ray

    ray.get(channel.put.remote({"event": "start", "start_step": start, "total_steps": 6}))
    for s in steps:
        ray.get(channel.put.remote(_record(s, 1.0 / s)))


def test_every_step_reaches_tensorboard_and_resume_purges(ray_local, tmp_path):
    channel = progress_channel()
    mon = TrainMonitor(channel, tmp_path, poll_s=0.05)
    _feed(channel, 0, range(1, 5))  # a run killed after step 4, checkpoint at step 2
    mon.close()
    assert [s for s, _ in _scalars(tmp_path / TB_DIR)] == [1, 2, 3, 4]
    assert len(mon.records) == 4 and mon.bar.n == 4

    channel = progress_channel()
    mon = TrainMonitor(channel, tmp_path, poll_s=0.05)
    _feed(channel, 2, range(3, 7))  # resumed from step 2
    mon.close("train: done")
    got = _scalars(tmp_path / TB_DIR)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]  # steps 3-4 once, not twice
    assert got[-1] == (6, round(1 / 6, 4))
    assert mon.bar.n == 6  # the bar starts at the checkpoint's step


def test_mlflow_gets_every_step(ray_local, tmp_path, monkeypatch):
    mlflow = import_or_skip("mlflow", "pip install 'mlflow-skinny>=2.10' (in raysys[dev])")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # no SQL backend in mlflow-skinny
    channel = progress_channel()
    mon = TrainMonitor(channel, tmp_path / "train", mlflow=True, poll_s=0.05)
    _feed(channel, 0, range(1, 4))
    mon.close()
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs(experiment_ids=["0"])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted((m.step, round(m.value, 4)) for m in history) == [
        (1, 1.0),
        (2, 0.5),
        (3, round(1 / 3, 4)),
    ]
