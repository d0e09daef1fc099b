"""The reranker task: a pointwise cross-encoder (``reranker.*``) trained on
groups of 1 positive + ``group_size - 1`` hard negatives, no in-batch
negatives, with grouped softmax cross-entropy (RankLLaMA) or pointwise BCE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from raysys.contract import RerankContract
from raysys.data.groups import TrainingSet
from raysys.losses import grouped_ce, pointwise_bce
from raysys.models.backbone import build_backbone
from raysys.models.hub import resolve_model
from raysys.models.reranker import Reranker, export_reranker
from raysys.train.tasks.base import LossOutput
from raysys.train.tasks.retrieve import GroupCollator, GroupsTask


@dataclass
class RerankBatch:
    pairs: dict[str, torch.Tensor]  # (B * group_size) pairs, positive first per group

    def num_tokens(self) -> int:
        return int(self.pairs["attention_mask"].sum())


class RerankCollator(GroupCollator):
    """(query, passage) pairs of each group, positive first, tokenized as one sequence."""

    contract: RerankContract

    def __call__(self, group_indices: list[int], epoch: int) -> RerankBatch:
        texts: list[str] = []
        for i in group_indices:
            _, titles, bodies = self.data.texts(self.rows(i, epoch))
            q = self.data.queries[i]
            texts += [
                self.contract.format_pair(q, ti, tx) for ti, tx in zip(titles, bodies, strict=True)
            ]
        ids = self.contract.token_ids(self.tokenizer, texts)
        enc = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return RerankBatch(pairs=dict(enc))


class RerankTask(GroupsTask):
    name: ClassVar[str] = "rerank"
    head_prefixes: ClassVar[tuple[str, ...]] = ("head.",)

    @classmethod
    def validate(cls, cfg: Any) -> None:
        from raysys.config import ConfigError

        if cfg.train.group_size < 2:
            raise ConfigError(
                "train.group_size must be >= 2 for train.task=rerank (1 positive + negatives)"
            )
        if not cfg.reranker.path:
            raise ConfigError("reranker.path: set the base model to train (train.task=rerank)")
        cfg.rerank_contract()

    def model_path(self) -> str:
        return resolve_model(self.cfg.reranker.path)

    def build(self, tokenizer: Any) -> nn.Module:
        backbone = self.training_backbone(self.cfg.reranker)
        return Reranker(backbone, self.cfg.rerank_contract())

    def uses_lora(self) -> bool:
        return self.cfg.reranker.lora.enabled

    def frozen_from_checkpoint(self) -> bool:
        return self.uses_lora() and not self.cfg.reranker.random_init

    def collator(self, data: TrainingSet, tokenizer: Any) -> RerankCollator:
        t = self.cfg.train
        return RerankCollator(data, tokenizer, self.cfg.rerank_contract(), t.group_size, t.seed)

    def chunking(self) -> str | None:
        return (
            "the rerank task's loss is computed per query group (no negatives shared "
            "across queries), so GradCache would only add a forward pass: lower "
            "train.per_device_queries and raise train.grad_accum for the same gradients"
        )

    def loss(self, module: nn.Module, batch: RerankBatch, device: torch.device) -> LossOutput:
        t = self.cfg.train
        scores = module(
            batch.pairs["input_ids"].to(device), batch.pairs["attention_mask"].to(device)
        )
        fn = grouped_ce if t.loss.rerank_loss == "grouped_ce" else pointwise_bce
        loss = fn(scores, t.group_size)
        return LossOutput(loss, loss.item())

    def probe(self, module: nn.Module, tokenizer: Any, data: TrainingSet) -> dict[str, Any]:
        """Training-time scores of a few fixed pairs, to check the export against."""
        c = module.contract
        rows = [data.positives[i][0] for i in range(min(4, len(data)))]
        _, titles, texts = data.texts(rows)
        pairs = [
            c.format_pair(q, ti, tx)
            for q, ti, tx in zip(data.queries[:4], titles, texts, strict=True)
        ]
        enc = tokenizer.pad({"input_ids": c.token_ids(tokenizer, pairs)}, return_tensors="pt")
        device = next(module.parameters()).device
        module.eval()
        with torch.no_grad():
            scores = module(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        module.train()
        return {"pairs": pairs, "scores": scores.float().cpu().tolist()}

    def export(self, state_dict: dict[str, torch.Tensor], tokenizer: Any, out: Path) -> None:
        """Rebuild the reranker un-partitioned, load the gathered weights, export."""
        r = self.cfg.reranker
        partial = self.frozen_from_checkpoint()  # frozen weights from the checkpoint
        model = Reranker(
            build_backbone(self.model_path(), random_init=not partial, lora=r.lora),
            self.cfg.rerank_contract(),
        )
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if unexpected or (set(missing) & trainable if partial else missing):
            raise RuntimeError(
                f"export: state dict mismatch (missing {missing}, unexpected {unexpected})"
            )
        head = {k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")}
        export_reranker(model, head, tokenizer, out)
