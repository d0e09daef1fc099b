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
reduce once per micro-batch (at the boundary); ZeRO-2/3 reduce-scatter each
chunk's gradients into the partitions, as they do for accumulation steps.
No ``no_sync`` and no raw ``.backward()`` through the engine's module.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from raysys.train.tasks.base import Reps, Task

log = logging.getLogger(__name__)


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
    """

    def __init__(self, chunk_size: int, replay_rng: bool = True) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.chunk_size = chunk_size
        self.replay_rng = replay_rng

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
        try:
            for i, (chunk, state, g) in enumerate(zip(chunks, states, grads, strict=True)):
                _set_boundary(engine, boundary if i == len(chunks) - 1 else False)
                if self.replay_rng:
                    state.restore(device)
                reps = task.represent(engine, chunk, device)
                surrogate = sum((reps[k].float() * grad).sum() for k, grad in g.items())
                if not isinstance(surrogate, torch.Tensor):  # no gradient reached this chunk
                    surrogate = sum(v.float().sum() * 0.0 for v in reps.values())
                engine.backward(surrogate)
            engine.step()
        finally:
            _set_boundary(engine, None)
        after.restore(device)
        return value


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
