"""Shared by the tasks that adapt a causal LM on plain text (``llara``,
``mntp``): the data, the model, what they refuse."""

from __future__ import annotations

from typing import Any

from torch import nn

from raysys.data.texts import TextSet, load_texts
from raysys.models.hub import resolve_model
from raysys.train.tasks.base import Task


class TextTask(Task):
    """A task over :class:`TextSet` training a causal LM (``model.*``) whose
    module keeps it as ``backbone``; its export is the merged model."""

    @classmethod
    def validate(cls, cfg: Any) -> None:
        from raysys.config import ConfigError

        if cfg.model.export_adapter:
            raise ConfigError(
                f"model.export_adapter: the {cls.name} task trains the causal LM (with its "
                "head), so its export is the merged model"
            )
        if cfg.train.attn_implementation == "flash_attention_2":
            raise ConfigError(
                f"train.attn_implementation: the {cls.name} task needs a custom attention "
                "mask (sdpa or eager), not flash_attention_2"
            )

    def load_data(self) -> TextSet:
        return load_texts(self.cfg.data)

    def data_summary(self, data: TextSet) -> dict[str, Any]:
        return {"texts": len(data), **data.report.to_dict()}

    def model_path(self) -> str:
        return resolve_model(self.cfg.model.path)

    def export_module(self, module: nn.Module) -> nn.Module:
        return module.backbone

    def uses_lora(self) -> bool:
        return self.cfg.model.lora.enabled
