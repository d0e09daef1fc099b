"""Driver side of training: prepare data, run ``TorchTrainer``, collect the export."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysys.config import Config, to_dict
from raysys.console import duration
from raysys.errors import UserError
from raysys.runtime import (
    TRAIN_GPUS_PER_WORKER,
    ensure_ray,
    progress_channel,
    require_gpus,
    train_gpu_need,
    worker_env,
)
from raysys.storage import Location, resolve
from raysys.train.monitor import TrainMonitor
from raysys.train.tasks import get_task

log = logging.getLogger(__name__)

LOSS_PNG = "loss.png"


@dataclass
class TrainOutcome:
    model_dir: Path | str | None  # a local folder, or a URI under a remote --out
    history: list[dict[str, Any]]
    total_steps: int
    started_at: int  # > 0 when this run resumed from a checkpoint
    stopped_at: int
    skipped: dict[str, int]
    checkpoint_path: str | None

    @property
    def finished(self) -> bool:
        return self.stopped_at == self.total_steps


def run_training(cfg: Config, out_dir: str | Path | Location) -> TrainOutcome:
    """Train ``cfg.train.task`` as ``cfg`` says; the export lands in
    ``out_dir/model``. ``out_dir`` may be a storage URI: Ray Train then keeps
    its checkpoints there too (unless ``train.checkpoint.storage_path`` says
    otherwise), and the curves are written locally and copied there."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t, sc, ck = cfg.train, cfg.train.scaling, cfg.train.checkpoint
    out = resolve(out_dir)
    out.mkdir()
    task_cls = get_task(t.task)
    task = task_cls(cfg)
    ensure_ray()
    if sc.use_gpu:  # before the data load: fail in seconds, not after it
        need, how = train_gpu_need(sc)
        require_gpus(ray, "training (train.scaling.use_gpu)", need=need, how=how)
    data = task.load_data()
    data_summary = task.data_summary(data)
    log.info("training data (%s): %s", t.task, data_summary)
    storage = resolve(ck.storage_path or out.join("ray_storage"))
    # A remote --out: TensorBoard files are written here, then copied there.
    staging = Path(tempfile.mkdtemp(prefix="raysys-train-")) if out.is_remote else None
    local_out = staging or Path(out.path)
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
                **({"GPU": TRAIN_GPUS_PER_WORKER} if sc.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=ck.run_name,
            storage_path=storage.path,
            storage_filesystem=storage.fs if storage.is_remote else None,
            failure_config=FailureConfig(max_failures=ck.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env(sc.use_gpu)},
        ),
    )
    monitor = TrainMonitor(channel, local_out, desc=f"train ({t.task})", mlflow=t.mlflow)
    try:
        result = trainer.fit()
    except BaseException as e:
        monitor.close()
        _publish(staging, out)
        if isinstance(e, Exception) and out_of_memory(e):
            raise TrainingOutOfMemory(
                f"training ran out of memory ({t.per_device_queries} queries a worker, group "
                f"{t.group_size}): lower train.per_device_queries (raise train.grad_accum to "
                "keep the step), set train.grad_cache.chunk_size or "
                "train.gradient_checkpointing=true, or shorten the max lengths; "
                "--debug shows Ray's traceback"
            ) from e
        raise
    ret = result.return_value or {}
    history = ret.get("history", [])
    model_dir: Path | str | None = None
    if result.checkpoint is not None and ret.get("stopped_at") == ret.get("total_steps"):
        with result.checkpoint.as_directory() as d:
            src = Path(d) / "export"
            if src.is_dir():
                dest = out.join("model")
                dest.delete()
                if out.is_remote:
                    dest.upload(src)
                    model_dir = dest.uri
                else:
                    model_dir = Path(dest.path)
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
    out.join("train_summary.json").write_text(json.dumps(summary, indent=2))
    if history:
        from raysys.report import plot_loss

        plot_loss(history, out.join(LOSS_PNG), title=f"{t.task}: training loss")
    monitor.close(_summary_line(t.task, history, ret, monitor.bar.elapsed, model_dir))
    _publish(staging, out)
    return TrainOutcome(
        model_dir=model_dir,
        history=history,
        total_steps=int(ret.get("total_steps") or 0),
        started_at=int(ret.get("started_at") or 0),
        stopped_at=int(ret.get("stopped_at") or 0),
        skipped=data_summary.get("skipped", {}),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
    )


class TrainingOutOfMemory(UserError):
    """A worker ran out of host or GPU memory: a setting to lower, not a bug."""


_OOM_MARKERS = (
    "outofmemoryerror",
    "out of memory",
    "running low on memory",  # Ray's memory monitor
    "can't allocate memory",  # torch's CPU allocator
)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` or an error it chains to (a worker's, as Ray Train
    wraps it) says a process ran out of memory: torch's CPU/GPU
    ``OutOfMemoryError``, Python's ``MemoryError`` or Ray's memory monitor."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        text = f"{type(cur).__name__} {cur}".lower()
        if isinstance(cur, MemoryError) or any(m in text for m in _OOM_MARKERS):
            return True
        todo += [x for x in (cur.__cause__, cur.__context__) if x is not None]
        todo += list((getattr(cur, "worker_failures", None) or {}).values())
    return False


def _publish(staging: Path | None, out: Location) -> None:
    """Copy what was written locally for a remote ``out`` (TensorBoard) there."""
    if staging is None:
        return
    out.upload(staging)
    shutil.rmtree(staging, ignore_errors=True)


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
