"""Training steps in this process, one worker, without Ray.

The same pieces as a Ray Train worker (:mod:`raysys.train.loop`): the task,
the DeepSpeed engine and config, the step strategy, the device-aware metric
reduction and the ZeRO-aware export gather. It serves the GPU suite and the
GPU benchmarks (the GPU machines have no Ray) and debugging a task in a
plain Python session. Checkpoints, resume and reporting stay in the loop.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raysys.config import Config
from raysys.models.backbone import load_tokenizer
from raysys.train.engine import build_engine, setup_accelerator_env
from raysys.train.loop import (
    gather_full_state_dict,
    micro_batch_indices,
    plan_steps,
    sum_across_workers,
)
from raysys.train.steps import make_step
from raysys.train.tasks import get_task


@dataclass
class StepTimes:
    """What :func:`train_steps` measured, per optimizer step."""

    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    peak_bytes: int = 0


def init_single_process(device: torch.device) -> None:
    """A one-rank process group (NCCL on a GPU, gloo on the CPU), as Ray
    Train would set up for a worker."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def train_steps(
    cfg: Config, steps: int, device: torch.device, export_to: Path | None = None
) -> StepTimes:
    """Run ``steps`` optimizer steps of ``cfg.train.task`` here; optionally
    gather and export the result like the loop's final checkpoint does."""
    t = cfg.train
    setup_accelerator_env(device.type == "cuda")
    import deepspeed

    init_single_process(device)
    deepspeed.init_distributed()
    task = get_task(t.task)(cfg)
    data = task.load_data()
    tokenizer = load_tokenizer(task.model_path())
    micro_per_epoch, total = plan_steps(len(data), t, 1)
    total = max(total, steps)
    engine, _ = build_engine(task, tokenizer, t, 1, total)
    step_fn = make_step(t)
    collate = task.collator(data, tokenizer)
    engine.train()
    out = StepTimes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps):
        t0, loss, n_tokens = time.perf_counter(), 0.0, 0
        for k in range(t.grad_accum):
            micro = step * t.grad_accum + k
            epoch, idx = micro_batch_indices(len(data), t, micro, micro_per_epoch, 0, 1)
            batch = collate(idx, epoch)
            loss += step_fn(engine, task, batch, device) / t.grad_accum
            n_tokens += batch.num_tokens()
        # The loop's reduction, forced through the collective (world=2 with
        # one rank sums over that rank): on a GPU this is an NCCL all-reduce.
        loss = sum_across_workers([loss], device, world=2)[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.losses.append(loss)
        out.seconds.append(time.perf_counter() - t0)
        out.tokens.append(n_tokens)
    if device.type == "cuda":
        out.peak_bytes = int(torch.cuda.max_memory_allocated(device))
    if export_to is not None:
        sd = gather_full_state_dict(
            task.export_module(engine.module), t.zero_stage, task.frozen_from_checkpoint()
        )
        if sd is not None:
            task.export(sd, tokenizer, export_to)
    if hasattr(engine, "destroy"):
        engine.destroy()
    return out


def describe(cfg: Config) -> dict[str, Any]:
    """The settings a result of :func:`train_steps` depends on."""
    t = cfg.train
    return {
        "task": t.task,
        "zero_stage": t.zero_stage,
        "precision": t.precision,
        "lora": cfg.model.lora.enabled,
        "gradient_checkpointing": t.gradient_checkpointing,
        "per_device_queries": t.per_device_queries,
        "group_size": t.group_size,
    }
