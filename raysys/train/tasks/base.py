"""The training-task seam: everything that differs between training objectives.

A :class:`Task` builds the trainable module around the backbone, collates a
batch, computes the loss, probes the trained model (the tests reproduce the
probe from the export) and exports. The shared loop in
:mod:`raysys.train.loop` does the rest (distributed set-up, the DeepSpeed
engine, resume, the step loop, logging, checkpoints) and never looks at which
task it runs. A new objective is one new file with a subclass, registered in
:mod:`raysys.train.tasks` or named as ``package.module:Class`` in
``train.task``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn


class Batch(Protocol):
    """What the loop needs of a collated batch: its size for throughput logs."""

    def num_tokens(self) -> int: ...


@dataclass
class LossOutput:
    """The tensor to back-propagate and the number to log for it.

    They differ when the loss is scaled for exact gradients (the gathered
    InfoNCE is multiplied by the world size).
    """

    loss: torch.Tensor
    value: float
    # Named parts of the loss, unweighted and detached (e.g. each M3 head's
    # InfoNCE), for tests and diagnostics; empty when the task names none.
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


Reps = dict[str, torch.Tensor]
"""A chunk's representations by name (e.g. ``q`` and ``p``; dim 0 indexes rows)."""


class Task(ABC):
    """One training objective. ``cfg`` is the whole :class:`raysys.config.Config`."""

    name: ClassVar[str] = ""
    # Parameter-name prefixes of freshly initialised heads: with
    # train.optim.head_lr > 0 they get their own learning rate.
    head_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        # The 0-based optimizer step being computed, set by the loop before
        # each one (for losses with a schedule, such as M3's self-distillation).
        self.step = 0

    @classmethod  # noqa: B027 (an optional hook: most tasks accept any settings)
    def validate(cls, cfg: Any) -> None:
        """Refuse settings this task cannot train with (raise ConfigError)."""

    # -- driver side ----------------------------------------------------------------
    @abstractmethod
    def load_data(self) -> Any:
        """The training data (shipped to the workers): anything with ``len()``."""

    def data_summary(self, data: Any) -> dict[str, Any]:
        """What the run reports about its data (counts, skipped records)."""
        return {"examples": len(data)}

    # -- worker side ----------------------------------------------------------------
    @abstractmethod
    def model_path(self) -> str:
        """The local folder of the model this task trains (its tokenizer too)."""

    @abstractmethod
    def build(self, tokenizer: Any) -> nn.Module:
        """The trainable module, backbone included (called under ZeRO-3's
        partitioned construction when it is on)."""

    def export_module(self, module: nn.Module) -> nn.Module:
        """The part of the trained module whose full weights the export needs."""
        return module

    def training_backbone(self, model_cfg: Any, **extra: Any) -> nn.Module:
        """:func:`raysys.models.backbone.build_backbone` of :meth:`model_path`
        under ``model_cfg`` (``model`` or ``reranker``) with the training
        settings: fp32 master weights whatever the checkpoint's dtype
        (DeepSpeed casts the module for bf16/fp16 and keeps fp32 in the
        optimizer), ``train.attn_implementation``, gradient checkpointing."""
        from raysys.models.backbone import build_backbone

        t = self.cfg.train
        return build_backbone(
            self.model_path(),
            random_init=model_cfg.random_init,
            lora=model_cfg.lora,
            gradient_checkpointing=t.gradient_checkpointing,
            dtype=torch.float32,
            attn_implementation=t.attn_implementation,
            **extra,
        )

    def uses_lora(self) -> bool:
        """True when the task trains LoRA adapters (DeepSpeed keeps them whole)."""
        return False

    def frozen_from_checkpoint(self) -> bool:
        """True when the frozen weights equal the checkpoint's (LoRA on a
        pretrained base): the loop then gathers only the trainable ones, and
        :meth:`export` rebuilds the rest from the checkpoint."""
        return False

    @abstractmethod
    def collator(self, data: Any, tokenizer: Any) -> Callable[[list[int], int], Batch]:
        """``collate(example_indices, epoch) -> batch`` (deterministic)."""

    def loss(self, module: nn.Module, batch: Any, device: torch.device) -> LossOutput:
        """Forward pass(es) through ``module`` and the loss of one micro-batch.

        By default: :meth:`represent` over the whole batch, then
        :meth:`loss_from_reps`. A task that implements neither overrides this.
        """
        return self.loss_from_reps([self.represent(module, batch, device)], batch, device)

    # -- representation seam: what chunked step strategies (GradCache) use ----------
    def chunking(self) -> str | None:
        """None when :meth:`split`, :meth:`represent` and :meth:`loss_from_reps`
        are implemented; otherwise why this task cannot be trained chunk by
        chunk (the message of the configuration error)."""
        return f"the {self.name or type(self).__name__} task does not split its batches"

    def split(self, batch: Any, queries: int) -> list[Any]:
        """``batch`` cut into chunks of at most ``queries`` queries, each with
        everything that belongs to them (their passages), in batch order."""
        raise NotImplementedError

    def represent(self, module: nn.Module, chunk: Any, device: torch.device) -> Reps:
        """One forward pass over ``chunk``: every representation the loss needs."""
        raise NotImplementedError

    def loss_from_reps(self, reps: list[Reps], batch: Any, device: torch.device) -> LossOutput:
        """The micro-batch loss from the representations of its chunks (in
        :meth:`split` order; one chunk when the batch was not split). The
        loss may depend on the parameters only through ``reps``."""
        raise NotImplementedError

    def probe(self, module: nn.Module, tokenizer: Any, data: Any) -> dict[str, Any] | None:
        """Outputs of the trained module on a few fixed inputs (JSON), saved with
        the export so that tests can reload the export and compare."""
        return None

    @abstractmethod
    def export(self, state_dict: dict[str, torch.Tensor], tokenizer: Any, out: Path) -> None:
        """Write the export from the gathered full weights (rank 0 only)."""
