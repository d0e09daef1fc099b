"""The Ray Train per-worker training function, shared by every training task.

The task (:mod:`raysys.train.tasks`, chosen by ``train.task``) builds the
module, collates, computes the loss, probes and exports; the step strategy
(:mod:`raysys.train.steps`) turns a micro-batch into gradients. This file
holds what is common: distributed set-up, the DeepSpeed engine, resume, the
step loop, logging and checkpoints. It never branches on the task.

Every rank sees the same deterministic order: epoch ``e`` shuffles the
examples with ``(seed, e)``, each optimizer step takes ``grad_accum`` global
micro-batches, and rank ``r`` takes its slice of each. Tasks draw their
samples from ``(seed, epoch, example)`` and dropout from ``(seed,
micro-step, rank)``, so a run resumed from a checkpoint continues exactly
where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raysys.config import Config, config_from_dict
from raysys.models.backbone import load_tokenizer
from raysys.runtime import check_worker_device
from raysys.train.engine import build_engine, init_deepspeed_comm
from raysys.train.steps import make_step
from raysys.train.tasks import get_task
from raysys.train.tasks.base import Task

log = logging.getLogger(__name__)

# Fault-injection knob for tests: sleep this long before each optimizer step.
THROTTLE_S = float(os.environ.get("RAYSYS_TRAIN_THROTTLE_S", "0") or 0)
HISTORY_FILE = "history.json"
EXPORT_DIR = "export"
PROBE_FILE = "train_probe.json"


def plan_steps(n_examples: int, train: Any, world: int) -> tuple[int, int]:
    """Return (micro-batches per epoch, total optimizer steps)."""
    global_batch = train.per_device_queries * world
    micro_per_epoch = n_examples // global_batch
    if micro_per_epoch < 1:
        raise ValueError(
            f"{n_examples} training examples cannot fill one global batch of {global_batch} "
            f"({train.per_device_queries} per worker x {world} workers)"
        )
    if train.max_steps > 0:
        return micro_per_epoch, train.max_steps
    steps = int(train.epochs * micro_per_epoch) // train.grad_accum
    return micro_per_epoch, max(1, steps)


def micro_batch_indices(
    n_examples: int, train: Any, micro: int, micro_per_epoch: int, rank: int, world: int
) -> tuple[int, list[int]]:
    """(epoch, example indices) of rank ``rank`` in global micro-batch ``micro``."""
    epoch, pos = divmod(micro, micro_per_epoch)
    perm = np.random.default_rng([train.seed, epoch]).permutation(n_examples)
    b = train.per_device_queries
    start = (pos * world + rank) * b
    return epoch, [int(i) for i in perm[start : start + b]]


def gather_full_state_dict(
    module: nn.Module, stage: int, trainable_only: bool = False
) -> dict[str, torch.Tensor] | None:
    """The full (gathered) weights of ``module`` on rank 0, else None.

    Under ZeRO-3 the parameters are gathered one at a time, so no rank ever
    holds more than one full parameter beyond its shard, and rank 0 keeps a
    host copy in the parameter's own dtype (bf16 stays bf16). With
    ``trainable_only`` (LoRA on a pretrained base: the export rebuilds the
    frozen weights from the checkpoint) only trainable parameters are
    gathered.
    """
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    params = list(module.named_parameters(remove_duplicate=False))
    trainable = {n for n, p in params if p.requires_grad}
    keys = [k for k in module.state_dict() if not trainable_only or k in trainable]
    if stage != 3:
        if rank != 0:
            return None
        full = module.state_dict()
        return {k: full[k].detach().cpu().clone() for k in keys}
    sd: dict[str, torch.Tensor] = {}
    by_name = dict(params)
    buffers = dict(module.named_buffers())
    for name in keys:
        if name in by_name:
            with deepspeed.zero.GatheredParameters([by_name[name]], modifier_rank=None):
                if rank == 0:
                    sd[name] = by_name[name].detach().cpu().clone()
        elif rank == 0 and name in buffers:  # buffers are not partitioned
            sd[name] = buffers[name].detach().cpu().clone()
    return sd if rank == 0 else None


def optimizer_step(
    engine: Any,
    task: Task,
    step_fn: Any,
    collate: Any,
    n_examples: int,
    train: Any,
    step: int,
    micro_per_epoch: int,
    rank: int,
    world: int,
    device: torch.device,
) -> tuple[float, int, int]:
    """Optimizer step ``step`` (0-based) on this rank: ``grad_accum``
    micro-batches through ``step_fn``. Returns (mean loss, examples, tokens).

    Dropout draws from ``(seed, micro-step, rank)``, so a resumed run (and
    any two runs of the same config) replays the same masks.
    """
    loss, examples, tokens = 0.0, 0, 0
    task.step = step
    for k in range(train.grad_accum):
        micro = step * train.grad_accum + k
        epoch, idx = micro_batch_indices(n_examples, train, micro, micro_per_epoch, rank, world)
        torch.manual_seed(train.seed * 1_000_003 + micro * 101 + rank)
        batch = collate(idx, epoch)
        loss += step_fn(engine, task, batch, device) / train.grad_accum
        examples += len(idx)
        tokens += batch.num_tokens()
    return loss, examples, tokens


def sum_across_workers(values: list[float], device: torch.device, world: int) -> list[float]:
    """Element-wise sum of ``values`` over every worker.

    The tensor lives on the engine's device: on GPUs Ray Train's process
    group is NCCL-only, and an all-reduce of a CPU tensor fails there.
    """
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return [float(x) for x in t.tolist()]


def train_func(config: dict[str, Any]) -> dict[str, Any]:
    """Per-worker entry point for ``TorchTrainer``.

    ``config``: ``cfg`` (the run's config as a dict), ``data`` (the task's
    training data, or an ObjectRef to it) and optionally ``task`` (a Task
    class, for tasks not importable by name on the workers).
    """
    import ray.train

    cfg: Config = config_from_dict(config["cfg"])
    t = cfg.train
    # Reuse the process group Ray Train set up (gloo on CPU, nccl on GPU).
    init_deepspeed_comm(t.scaling.use_gpu)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(t.scaling.cpus_per_worker)))
    device = (
        torch.device(f"cuda:{ctx.get_local_rank()}")
        if t.scaling.use_gpu and torch.cuda.is_available()
        else torch.device("cpu")
    )
    check_worker_device(t.scaling.use_gpu, "training worker")
    if device.type == "cuda":
        # NCCL collectives of objects (all_gather_object) use the current device.
        torch.cuda.set_device(device)

    data = config["data"]
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    task: Task = (config.get("task") or get_task(t.task))(cfg)
    model_path = task.model_path()
    tokenizer = load_tokenizer(model_path)
    micro_per_epoch, total_steps = plan_steps(len(data), t, world)
    engine, scheduler = build_engine(task, tokenizer, t, world, total_steps)
    exported = task.export_module(engine.module)
    step_fn = make_step(t)

    # -- resume ---------------------------------------------------------------------
    ck = t.checkpoint
    start_step, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and ck.resume_from:
        from raysys.storage import resolve

        # A local folder or a storage URI (a checkpoint of a run on a cluster).
        where = resolve(ck.resume_from)
        ckpt = ray.train.Checkpoint(path=where.path, filesystem=where.fs)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, load_module_strict=False)
            start_step = int(client["step"])
            hist_path = Path(d) / HISTORY_FILE
            history = json.loads(hist_path.read_text()) if hist_path.is_file() else []
        history = [h for h in history if h["step"] <= start_step]
        if rank == 0:
            log.info("resumed at step %d of %d", start_step, total_steps)

    collate = task.collator(data, tokenizer)
    stop_at = min(total_steps, ck.stop_after) if ck.stop_after > 0 else total_steps

    def save(step: int, metrics: dict[str, Any], final: bool) -> None:
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=f"step-{step}", client_state={"step": step})
            sd = (
                gather_full_state_dict(exported, t.zero_stage, task.frozen_from_checkpoint())
                if final
                else None
            )
            probe = task.probe(engine.module, tokenizer, data) if final else None
            if rank == 0:
                (Path(d) / HISTORY_FILE).write_text(json.dumps(history))
                if final and sd is not None:
                    task.export(sd, tokenizer, Path(d) / EXPORT_DIR)
                    if probe is not None:
                        (Path(d) / EXPORT_DIR / PROBE_FILE).write_text(json.dumps(probe))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    progress = config.get("progress") if rank == 0 else None
    if progress is not None:
        progress.put.remote(
            {"event": "start", "start_step": start_step, "total_steps": total_steps}
        )
    engine.train()
    metrics: dict[str, Any] = {"step": start_step}
    for step in range(start_step, stop_at):
        if THROTTLE_S:
            time.sleep(THROTTLE_S)
        t0 = time.perf_counter()
        step_loss, n_examples, n_tokens = optimizer_step(
            engine, task, step_fn, collate, len(data), t, step, micro_per_epoch, rank, world, device
        )
        done = step + 1
        # Every step is recorded (history, TensorBoard, the driver's bar);
        # log_steps only paces the log lines and Ray Train's reports.
        counts = sum_across_workers([n_examples, n_tokens, step_loss], device, world)
        elapsed = time.perf_counter() - t0
        metrics = {
            "step": done,
            "total_steps": total_steps,
            "epoch": (done * t.grad_accum) / micro_per_epoch,
            "loss": counts[2] / world,
            "lr": scheduler.get_last_lr()[0],
            "examples_per_s": counts[0] / elapsed,
            "tokens_per_s": counts[1] / elapsed,
            # This step's totals over every worker (a run's cost: their sum).
            "examples": int(counts[0]),
            "tokens": int(counts[1]),
            "seconds": elapsed,
        }
        history.append(metrics)
        if progress is not None:
            progress.put.remote(metrics)
        logged = done % t.log_steps == 0 or done == stop_at
        if rank == 0 and logged:
            # Worker stdout: forwarded by Ray to the driver's log file.
            print(
                f"[raysys] step {done}/{total_steps} loss {metrics['loss']:.4f} "
                f"lr {metrics['lr']:.2e} {metrics['examples_per_s']:.1f} ex/s "
                f"{metrics['tokens_per_s']:.0f} tok/s",
                flush=True,
            )
        is_last = done == stop_at
        if is_last or (ck.save_steps and done % ck.save_steps == 0):
            save(done, metrics, final=done == total_steps)
        elif logged:
            ray.train.report(metrics)
    return {
        "history": history,
        "total_steps": total_steps,
        "started_at": start_step,
        "stopped_at": stop_at,
    }
