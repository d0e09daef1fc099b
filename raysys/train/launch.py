"""Driver side of training: prepare data, run ``TorchTrainer``, collect the export."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysys.config import Config, to_dict
from raysys.data.groups import load_training_set
from raysys.models.hub import cache_dir

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    model_dir: Path | None
    history: list[dict[str, Any]]
    total_steps: int
    started_at: int  # > 0 when this run resumed from a checkpoint
    stopped_at: int
    skipped: dict[str, Any]
    checkpoint_path: str | None

    @property
    def finished(self) -> bool:
        return self.stopped_at == self.total_steps


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment for training workers (also set for `ray job submit`)."""
    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions")
        ),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in (
        "RAYSYS_CACHE",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "RAYSYS_TRAIN_THROTTLE_S",
    ):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def ensure_ray() -> None:
    """Connect to Ray (a cluster via RAY_ADDRESS / `ray job submit`), or start one locally."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)


def run_training(cfg: Config, out_dir: str | Path) -> TrainOutcome:
    """Train a retriever as ``cfg`` says; the exported model lands in ``out_dir/model``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_training_set(cfg.data, seed=t.seed)
    log.info(
        "training set: %d groups over %d passages; %s",
        len(data),
        data.corpus.num_rows,
        data.report.summary(),
    )
    ensure_ray()
    storage = t.storage_path or str((out / "ray_storage").resolve())
    trainer = TorchTrainer(
        _train_entry,
        train_loop_config={"cfg": to_dict(cfg), "data": ray.put(data)},
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=t.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env(t.use_gpu)},
        ),
    )
    result = trainer.fit()
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
        "data": {"groups": len(data), "passages": data.corpus.num_rows, **data.report.to_dict()},
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "model_dir": str(model_dir) if model_dir else None,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return TrainOutcome(
        model_dir=model_dir,
        history=history,
        total_steps=int(ret.get("total_steps") or 0),
        started_at=int(ret.get("started_at") or 0),
        stopped_at=int(ret.get("stopped_at") or 0),
        skipped=data.report.to_dict(),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
    )


def _train_entry(config: dict[str, Any]) -> dict[str, Any]:
    from raysys.train.loop import train_func

    return train_func(config)
