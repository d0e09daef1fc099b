"""Training steps in this process, without Ray Train's loop.

The same pieces as a Ray Train worker (:mod:`raysys.train.loop`): the task,
the DeepSpeed engine and config, the step strategy, the optimizer step, the
device-aware metric reduction and the ZeRO-aware export gather. It serves
the GPU suite and the GPU benchmarks (the GPU machines have no Ray), memory
and step-time benchmarks, side-by-side comparisons of step strategies inside
one Ray Train worker (it joins the process group already set up), and
debugging a task in a plain Python session. Checkpoints, resume and
reporting stay in the loop.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raysys.config import Config
from raysys.models.backbone import load_tokenizer
from raysys.train.engine import build_engine, init_deepspeed_comm, setup_accelerator_env
from raysys.train.loop import (
    PROBE_FILE,
    gather_full_state_dict,
    optimizer_step,
    plan_steps,
    sum_across_workers,
)
from raysys.train.steps import StepStrategy, make_step
from raysys.train.tasks import get_task


@dataclass
class StepTimes:
    """What :func:`train_steps` measured, per optimizer step."""

    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    peak_bytes: int = 0
    # With keep_state: the full trained weights (rank 0; None elsewhere).
    state: dict[str, torch.Tensor] | None = None
    # With export_to: the task's probe of the trained module, taken before
    # the export (what the loop saves as train_probe.json; None if the task
    # has none).
    probe: dict[str, Any] | None = None


def indexed_device(device: torch.device | str) -> torch.device:
    """``device`` with an index where CUDA needs one: ``cuda`` becomes
    ``cuda:<current device>`` (``torch.cuda.set_device`` and NCCL reject a
    CUDA device without an index); other devices pass through."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def init_single_process(device: torch.device) -> torch.device:
    """A one-rank process group (NCCL on a GPU, gloo on the CPU), as Ray
    Train would set up for a worker; returns ``device`` indexed (see
    :func:`indexed_device`)."""
    import torch.distributed as dist

    device = indexed_device(device)
    if dist.is_initialized():
        return device
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
    return device


def train_steps(
    cfg: Config,
    steps: int,
    device: torch.device,
    export_to: Path | None = None,
    step_fn: StepStrategy | None = None,
    keep_state: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> StepTimes:
    """Run ``steps`` optimizer steps of ``cfg.train.task`` here; optionally
    gather and export the result like the loop's final checkpoint does.

    In a process group already set up (a Ray Train worker) every rank runs
    its share, as in the loop. ``step_fn`` replaces the configured step
    strategy; ``keep_state`` gathers the trained weights into the result;
    with ``export_to`` the result carries the task's probe of the trained
    module (also written next to the export, as the loop does);
    ``on_ready`` is called once the engine is built (a memory benchmark's
    baseline).
    """
    import torch.distributed as dist

    t = cfg.train
    setup_accelerator_env(device.type == "cuda")
    device = init_single_process(device)  # "cuda" -> "cuda:<current>"
    init_deepspeed_comm(device.type == "cuda")
    rank, world = dist.get_rank(), dist.get_world_size()
    task = get_task(t.task)(cfg)
    data = task.load_data()
    tokenizer = load_tokenizer(task.model_path())
    micro_per_epoch, total = plan_steps(len(data), t, world)
    total = max(total, steps)
    engine, _ = build_engine(task, tokenizer, t, world, total)
    step_fn = step_fn or make_step(t)
    collate = task.collator(data, tokenizer)
    engine.train()
    out = StepTimes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if on_ready is not None:
        on_ready()
    for step in range(steps):
        t0 = time.perf_counter()
        loss, _, n_tokens = optimizer_step(
            engine, task, step_fn, collate, len(data), t, step, micro_per_epoch, rank, world, device
        )
        # The loop's reduction, forced through the collective (world=2 with
        # one rank sums over that rank): on a GPU this is an NCCL all-reduce.
        loss = sum_across_workers([loss], device, world=max(world, 2))[0] / world
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
        # Every rank probes (a ZeRO-3 forward gathers parameters collectively).
        out.probe = task.probe(engine.module, tokenizer, data)
        if sd is not None:
            task.export(sd, tokenizer, export_to)
            if out.probe is not None:
                (Path(export_to) / PROBE_FILE).write_text(json.dumps(out.probe))
    if keep_state:
        out.state = gather_full_state_dict(engine.module, t.zero_stage)
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
