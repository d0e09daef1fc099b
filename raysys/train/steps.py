"""Step strategies: how one micro-batch becomes gradients in the engine.

The loop calls ``step(engine, task, batch, device)`` once per micro-batch;
the strategy runs the forward and backward passes and ``engine.step()`` (a
DeepSpeed engine steps the optimizer at gradient-accumulation boundaries
only). Strategies see the task through its public methods, so any task can
use any strategy that its methods support.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from raysys.train.tasks.base import Task


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


def make_step(train: Any) -> StepStrategy:
    """The step strategy ``train`` (a :class:`raysys.config.TrainConfig`) asks for."""
    return StandardStep()
