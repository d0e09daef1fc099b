"""The driver's view of a training run: rank 0 sends one record per optimizer
step through a :class:`raysys.runtime.ProgressChannel`; a thread here drains
it into the console's progress bar, TensorBoard event files (``tensorboard/``
in the training folder) and, when ``train.mlflow`` is on, MLflow.

The driver writes every file, so the curves land in the run folder even when
the workers run on other nodes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from raysys.console import Progress
from raysys.runtime import ProgressFollower

log = logging.getLogger(__name__)

TB_DIR = "tensorboard"
SCALARS = ("loss", "lr", "tokens_per_s", "examples_per_s", "epoch")


class TrainMonitor:
    """Poll ``channel`` every ``poll_s`` seconds until :meth:`close`."""

    def __init__(
        self,
        channel: Any,
        out: Path,
        desc: str = "train",
        mlflow: bool = False,
        poll_s: float = 0.5,
    ) -> None:
        self.out = Path(out)
        self.bar = Progress(desc, None, "steps")
        self.records: list[dict[str, Any]] = []
        self._writer: Any = None
        self._mlflow: Any = None
        self._want_mlflow = mlflow
        self._follower = ProgressFollower(channel, self._record, poll_s)

    def _record(self, r: dict[str, Any]) -> None:
        if r.get("event") == "start":
            self._start(int(r["start_step"]), int(r["total_steps"]))
            return
        self.records.append(r)
        self.bar.update(1, loss=r["loss"], **{"tok/s": int(r["tokens_per_s"])})
        if self._writer is not None:
            for k in SCALARS:
                self._writer.add_scalar(f"train/{k}", r[k], r["step"])
        if self._mlflow is not None:
            self._mlflow.log({k: float(r[k]) for k in SCALARS}, int(r["step"]))

    def _start(self, start_step: int, total_steps: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.bar.set_total(total_steps)
        if start_step:
            self.bar.update(start_step)
        if self._writer is None:
            # A run resumed from the checkpoint of step S logs S+1 onwards:
            # drop what a killed run had logged from S+1 on (TensorBoard's
            # purge_step removes events at or after it).
            self._writer = SummaryWriter(
                str(self.out / TB_DIR),
                purge_step=start_step + 1 if start_step else None,
                flush_secs=10,
            )
        if self._want_mlflow and self._mlflow is None:
            self._want_mlflow = False
            try:
                self._mlflow = _MlflowRun(self.out.name)
            except Exception as e:  # a tracking-server problem must not stop training
                log.warning("MLflow: cannot start a run (%s); training goes on without it", e)

    def close(self, summary: str | None = None) -> None:
        """Stop polling, take what is left, close the writers; print ``summary``."""
        self._follower.stop()
        if self._writer is not None:
            self._writer.close()
        if self._mlflow is not None:
            self._mlflow.end()
        self.bar.close(summary)


class _MlflowRun:
    """One MLflow run through the client API (MLflow's active run is
    per-thread; the monitor logs from two threads). ``MLFLOW_TRACKING_URI``
    and ``MLFLOW_EXPERIMENT_NAME`` decide where."""

    def __init__(self, name: str) -> None:
        import os

        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
        exp_id = "0"
        if exp_name:
            exp = self.client.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(exp_name)
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()]
        )

    def end(self) -> None:
        self.client.set_terminated(self.run_id)
