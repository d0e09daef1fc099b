"""Driver side of training: prepare data, run ``TorchTrainer``, collect the export."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysys.config import Config, to_dict
from raysys.console import duration
from raysys.runtime import ensure_ray, progress_channel, worker_env
from raysys.train.monitor import TrainMonitor
from raysys.train.tasks import get_task

log = logging.getLogger(__name__)

LOSS_PNG = "loss.png"


@dataclass
class TrainOutcome:
    model_dir: Path | None
    history: list[dict[str, Any]]
    total_steps: int
    started_at: int  # > 0 when this run resumed from a checkpoint
    stopped_at: int
    skipped: dict[str, int]
    checkpoint_path: str | None

    @property
    def finished(self) -> bool:
        return self.stopped_at == self.total_steps


def run_training(cfg: Config, out_dir: str | Path) -> TrainOutcome:
    """Train ``cfg.train.task`` as ``cfg`` says; the export lands in ``out_dir/model``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t, sc, ck = cfg.train, cfg.train.scaling, cfg.train.checkpoint
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task_cls = get_task(t.task)
    task = task_cls(cfg)
    data = task.load_data()
    data_summary = task.data_summary(data)
    log.info("training data (%s): %s", t.task, data_summary)
    ensure_ray()
    storage = ck.storage_path or str((out / "ray_storage").resolve())
    channel = progress_channel()
    trainer = TorchTrainer(
        _train_entry,
        train_loop_config={
            "cfg": to_dict(cfg),
            "data": ray.put(data),
            "task": task_cls,
            "progress": channel,
        },
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker={
                "CPU": sc.cpus_per_worker,
                **({"GPU": 1} if sc.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=ck.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=ck.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env(sc.use_gpu)},
        ),
    )
    monitor = TrainMonitor(channel, out, desc=f"train ({t.task})", mlflow=t.mlflow)
    try:
        result = trainer.fit()
    except BaseException:
        monitor.close()
        raise
    ret = result.return_value or {}
    history = ret.get("history", [])
    model_dir = None
    if result.checkpoint is not None and ret.get("stopped_at") == ret.get("total_steps"):
        with result.checkpoint.as_directory() as d:
            src = Path(d) / "export"
            if src.is_dir():
                model_dir = out / "model"
                shutil.rmtree(model_dir, ignore_errors=True)
                shutil.copytree(src, model_dir)
    summary = {
        "history": history,
        "total_steps": ret.get("total_steps"),
        "started_at": ret.get("started_at"),
        "stopped_at": ret.get("stopped_at"),
        "data": data_summary,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "model_dir": str(model_dir) if model_dir else None,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    if history:
        from raysys.report import plot_loss

        plot_loss(history, out / LOSS_PNG, title=f"{t.task}: training loss")
    monitor.close(_summary_line(t.task, history, ret, monitor.bar.elapsed, model_dir))
    return TrainOutcome(
        model_dir=model_dir,
        history=history,
        total_steps=int(ret.get("total_steps") or 0),
        started_at=int(ret.get("started_at") or 0),
        stopped_at=int(ret.get("stopped_at") or 0),
        skipped=data_summary.get("skipped", {}),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
    )


def _summary_line(
    task: str, history: list[dict[str, Any]], ret: dict[str, Any], seconds: float, model: Any
) -> str:
    if not history:
        return f"train ({task}): no steps run"
    first, last = history[0], history[-1]
    mean_tok = sum(h["tokens_per_s"] for h in history) / len(history)
    where = f" -> {model}" if model else " (stopped early: no export)"
    return (
        f"train ({task}): {ret.get('stopped_at')}/{ret.get('total_steps')} steps in "
        f"{duration(seconds)}, loss {first['loss']:.3f} -> {last['loss']:.3f}, "
        f"{mean_tok:,.0f} tok/s{where}"
    )


def _train_entry(config: dict[str, Any]) -> dict[str, Any]:
    from raysys.train.loop import train_func

    return train_func(config)
