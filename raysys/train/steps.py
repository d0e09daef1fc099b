"""Step strategies: how one micro-batch becomes gradients in the engine.

The loop calls ``step(engine, task, batch, device)`` once per micro-batch;
the strategy runs the forward and backward passes and ``engine.step()`` (a
DeepSpeed engine steps the optimizer at gradient-accumulation boundaries
only). Strategies see the task through its public methods, so any task can
use any strategy that its methods support.

:class:`GradCacheStep` (Gao et al. 2021) trains a contrastive batch of any
size at the memory of one chunk:

1. every chunk is encoded without a graph, saving the RNG state first;
2. the loss over all the chunks' representations (negatives gathered from
   every worker) is back-propagated to those representations only;
3. each chunk is encoded again with a graph, from its saved RNG state (the
   same dropout), and ``engine.backward`` pushes the cached gradients through
   it: ``backward(sum(reps * grads))``.

Under DeepSpeed each chunk's backward is one gradient-accumulation pass of
the micro-batch: the engine's boundary flag is held off for every chunk but
the last, which takes the boundary the engine would have had. ZeRO-0/1 then
reduce once per micro-batch (at the boundary). ZeRO-2/3 would reduce-scatter
each chunk's gradients into the partitions, as they do for accumulation
steps; where DeepSpeed has ``engine.coalesce_grad_reduction()`` (0.19.2+)
the chunks' backward passes run inside it, so the micro-batch is reduced
once, on leaving it (see :func:`coalesce_reduction`). No ``no_sync`` and no
raw ``.backward()`` through the engine's module.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from raysys.train.tasks.base import Reps, Task

log = logging.getLogger(__name__)

# Coalescing holds each rank's full local gradient of the trainable
# parameters until the micro-batch's single reduction (ZeRO-2/3 otherwise
# keep only their partition): worth it up to this size (LoRA adapters of a
# 7B: ~0.2 GB in bf16; a full 7B: 14 GB, left to per-chunk reductions).
COALESCE_MAX_GRAD_BYTES = 2 * 1024**3


class StepStrategy(ABC):
    @abstractmethod
    def __call__(self, engine: Any, task: Task, batch: Any, device: torch.device) -> float:
        """Train on one micro-batch; returns the loss value to log."""


class StandardStep(StepStrategy):
    """One forward pass over the whole micro-batch, ``engine.backward``, ``engine.step``."""

    def __call__(self, engine: Any, task: Task, batch: Any, device: torch.device) -> float:
        out = task.loss(engine, batch, device)
        engine.backward(out.loss)
        engine.step()
        return out.value


@dataclass
class RngState:
    """The CPU generator's state and, on a GPU, the device generator's."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, device)


def _leaves(reps: Reps) -> Reps:
    """Detached copies that collect the loss's gradient (floating tensors only)."""
    return {
        k: v.detach().requires_grad_(True) if v.is_floating_point() else v.detach()
        for k, v in reps.items()
    }


class GradCacheStep(StepStrategy):
    """GradCache: chunks of ``chunk_size`` queries, a cached-gradient backward each.

    ``replay_rng=False`` skips restoring the RNG before the second pass (a
    test shows that the gradients are then no longer exact under dropout).
    ``coalesce_max_bytes``: the largest local gradient (trainable parameters
    x their element size) for which ZeRO-2/3 reduce once per micro-batch
    instead of once per chunk (0: never); see :func:`coalesce_reduction`.
    """

    def __init__(
        self,
        chunk_size: int,
        replay_rng: bool = True,
        coalesce_max_bytes: int = COALESCE_MAX_GRAD_BYTES,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.chunk_size = chunk_size
        self.replay_rng = replay_rng
        self.coalesce_max_bytes = coalesce_max_bytes

    def __call__(self, engine: Any, task: Task, batch: Any, device: torch.device) -> float:
        chunks = task.split(batch, self.chunk_size)
        # Pass 1: representations without a graph, RNG state before each chunk.
        states: list[RngState] = []
        cached: list[Reps] = []
        with torch.no_grad():
            for chunk in chunks:
                states.append(RngState.capture(device))
                cached.append(_leaves(task.represent(engine, chunk, device)))
        after = RngState.capture(device)
        # Pass 2: the loss over every chunk; its gradient w.r.t. the reps only.
        out = task.loss_from_reps(cached, batch, device)
        out.loss.backward()
        grads = [{k: v.grad for k, v in r.items() if v.grad is not None} for r in cached]
        value = out.value
        del out, cached
        # Pass 3: each chunk again with a graph; its cached gradients through it.
        boundary = _natural_boundary(engine)
        coalesce = coalesce_reduction(engine, len(chunks), self.coalesce_max_bytes)
        try:
            with coalesce:
                for i, (chunk, state, g) in enumerate(zip(chunks, states, grads, strict=True)):
                    _set_boundary(engine, boundary if i == len(chunks) - 1 else False)
                    if self.replay_rng:
                        state.restore(device)
                    reps = task.represent(engine, chunk, device)
                    surrogate = sum((reps[k].float() * grad).sum() for k, grad in g.items())
                    if not isinstance(surrogate, torch.Tensor):  # no gradient reached it
                        surrogate = sum(v.float().sum() * 0.0 for v in reps.values())
                    engine.backward(surrogate)
            engine.step()
        finally:
            _set_boundary(engine, None)
        after.restore(device)
        return value


def _trainable_grad_bytes(engine: Any) -> int:
    """Bytes of one full local gradient of the engine's trainable parameters."""
    return sum(
        int(getattr(p, "ds_numel", p.numel())) * p.element_size()
        for p in engine.module.parameters()
        if p.requires_grad
    )


def coalesce_reduction(
    engine: Any, chunks: int, max_bytes: int = COALESCE_MAX_GRAD_BYTES
) -> contextlib.AbstractContextManager[Any]:
    """``engine.coalesce_grad_reduction()`` where it turns a GradCache
    micro-batch's per-chunk ZeRO-2/3 reductions into one, else a no-op context.

    DeepSpeed's context (0.19.2+) keeps each ``engine.backward`` inside it
    from reducing and reduces everything once on exit. One ``with`` block
    must cover one whole optimizer step (its flush overwrites the averaged
    gradients), so it is used only with ``gradient_accumulation_steps == 1``;
    also not under ZeRO-0/1 (which reduce once per micro-batch anyway), for
    optimizer wrappers it does not support (BF16/FP16_Optimizer), for one
    chunk, or when the full local gradient would exceed ``max_bytes``.
    """
    nothing = contextlib.nullcontext()
    if chunks < 2 or not hasattr(engine, "coalesce_grad_reduction"):
        return nothing
    if engine.zero_optimization_stage() not in (2, 3):
        return nothing
    if engine.gradient_accumulation_steps() != 1:
        return nothing
    if not hasattr(engine.optimizer, "_coalesce_grad_reduction"):
        return nothing
    if _trainable_grad_bytes(engine) > max_bytes:
        return nothing
    return engine.coalesce_grad_reduction()


def _natural_boundary(engine: Any) -> bool:
    """The boundary DeepSpeed's own counter gives this micro-batch."""
    gas = engine.gradient_accumulation_steps()
    return (engine.micro_steps + 1) % gas == 0


def _set_boundary(engine: Any, value: bool | None) -> None:
    """Override (True/False) or give back (None) DeepSpeed's accumulation boundary."""
    if value is None:
        engine._is_gradient_accumulation_boundary = None
        return
    engine.set_gradient_accumulation_boundary(value)


def make_step(train: Any) -> StepStrategy:
    """The step strategy ``train`` (a :class:`raysys.config.TrainConfig`) asks for."""
    chunk = train.grad_cache.chunk_size
    if chunk > 0:
        if chunk >= train.per_device_queries:
            log.warning(
                "train.grad_cache.chunk_size=%d >= train.per_device_queries=%d: one chunk "
                "per micro-batch, so GradCache only adds a forward pass",
                chunk,
                train.per_device_queries,
            )
        return GradCacheStep(chunk)
    return StandardStep()


def check_step(cfg: Any, task_cls: type[Task]) -> None:
    """Refuse a step strategy the task cannot run (raises ConfigError)."""
    from raysys.config import ConfigError

    chunk = cfg.train.grad_cache.chunk_size
    if chunk < 0:
        raise ConfigError("train.grad_cache.chunk_size must be >= 0 (0: off)")
    if chunk > 0:
        why = task_cls(cfg).chunking()
        if why is not None:
            raise ConfigError(f"train.grad_cache: {why}")
