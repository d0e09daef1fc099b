"""The retriever task: a bi-encoder trained with InfoNCE over each query's
group (positive first, then hard negatives) plus, optionally, every other
passage in the global batch, gathered from all workers with exact gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from raysys.contract import EncodingContract
from raysys.data.groups import TrainingSet, load_training_set
from raysys.losses import info_nce, soft_cross_entropy
from raysys.models.backbone import build_backbone
from raysys.models.embedder import Embedder, export_embedder
from raysys.models.hub import resolve_model
from raysys.train.tasks.base import LossOutput, Task


@dataclass
class RetrievalBatch:
    queries: dict[str, torch.Tensor]
    passages: dict[str, torch.Tensor]
    passage_ids: list[str]
    query_positive_ids: list[set[str]]
    # (B, G) teacher scores of each group's passages (distillation), or None.
    teacher: torch.Tensor | None = None

    def num_tokens(self) -> int:
        return int(self.queries["attention_mask"].sum() + self.passages["attention_mask"].sum())


class GroupCollator:
    """Base of the collators over query groups: each group sampled as 1 positive
    + ``group_size - 1`` negatives from ``(seed, epoch, group)``."""

    def __init__(
        self,
        data: TrainingSet,
        tokenizer: Any,
        contract: Any,
        group_size: int,
        seed: int = 42,
        teacher: bool = False,
    ) -> None:
        self.data = data
        self.tokenizer = tokenizer
        self.contract = contract
        self.group_size = group_size
        self.seed = seed
        self.teacher = teacher

    def rows(self, group: int, epoch: int) -> list[int]:
        """Corpus rows of one group this epoch: the positive first."""
        pos, negs = self.data.sample(group, epoch, self.seed, self.group_size - 1)
        return [pos, *negs]


class RetrievalCollator(GroupCollator):
    """Queries and their groups (positive first, then negatives), tokenized."""

    contract: EncodingContract

    def __call__(self, group_indices: list[int], epoch: int) -> RetrievalBatch:
        groups = [self.rows(i, epoch) for i in group_indices]
        rows = [r for g in groups for r in g]
        teacher = None
        if self.teacher:
            teacher = torch.tensor(
                [
                    self.data.teacher_scores(i, g)
                    for i, g in zip(group_indices, groups, strict=True)
                ],
                dtype=torch.float32,
            )
        ids, titles, texts = self.data.texts(rows)
        c = self.contract
        q = c.tokenize(
            self.tokenizer, [c.format_query(self.data.queries[i]) for i in group_indices], "query"
        )
        p = c.tokenize(
            self.tokenizer,
            [c.format_passage(t, ti) for t, ti in zip(texts, titles, strict=True)],
            "passage",
        )
        return RetrievalBatch(
            queries=dict(q),
            passages=dict(p),
            passage_ids=ids,
            query_positive_ids=[self.data.positive_ids(i) for i in group_indices],
            teacher=teacher,
        )


class DualEncoder(nn.Module):
    """One module call encodes queries and passages (one DeepSpeed forward)."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, q_ids, q_mask, p_ids, p_mask):  # noqa: ANN001, ANN201
        return self.embedder(q_ids, q_mask), self.embedder(p_ids, p_mask)


class GroupsTask(Task):
    """Shared by tasks that train on query groups (:class:`TrainingSet`)."""

    def load_data(self) -> TrainingSet:
        return load_training_set(self.cfg.data, seed=self.cfg.train.seed)

    def data_summary(self, data: TrainingSet) -> dict[str, Any]:
        return {"groups": len(data), "passages": data.corpus.num_rows, **data.report.to_dict()}


class RetrieveTask(GroupsTask):
    name: ClassVar[str] = "retrieve"

    def model_path(self) -> str:
        return resolve_model(self.cfg.model.path)

    def build(self, tokenizer: Any) -> nn.Module:
        backbone = self.training_backbone(self.cfg.model)
        return DualEncoder(Embedder(backbone, self.encoding_contract()))

    def export_module(self, module: nn.Module) -> nn.Module:
        return module.embedder.backbone

    def uses_lora(self) -> bool:
        return self.cfg.model.lora.enabled

    def frozen_from_checkpoint(self) -> bool:
        return self.uses_lora() and not self.cfg.model.random_init

    def collator(self, data: TrainingSet, tokenizer: Any) -> RetrievalCollator:
        t = self.cfg.train
        return RetrievalCollator(
            data,
            tokenizer,
            self.encoding_contract(),
            t.group_size,
            t.seed,
            teacher=t.loss.distill_weight > 0,
        )

    def encoding_contract(self) -> EncodingContract:
        """The contract the model trains and exports under."""
        return self.cfg.encoding_contract()

    def chunking(self) -> str | None:
        return None

    def split(self, batch: RetrievalBatch, queries: int) -> list[RetrievalBatch]:
        """Chunks of ``queries`` queries, each followed by its group's passages;
        each chunk is cut to its own longest text (less padding)."""
        g = self.cfg.train.group_size
        n = len(batch.query_positive_ids)
        return [
            RetrievalBatch(
                queries=_rows(batch.queries, i, min(i + queries, n)),
                passages=_rows(batch.passages, i * g, min(i + queries, n) * g),
                passage_ids=batch.passage_ids[i * g : (i + queries) * g],
                query_positive_ids=batch.query_positive_ids[i : i + queries],
                teacher=None if batch.teacher is None else batch.teacher[i : i + queries],
            )
            for i in range(0, n, queries)
        ]

    def represent(
        self, module: nn.Module, chunk: RetrievalBatch, device: torch.device
    ) -> dict[str, torch.Tensor]:
        q, p = module(
            chunk.queries["input_ids"].to(device),
            chunk.queries["attention_mask"].to(device),
            chunk.passages["input_ids"].to(device),
            chunk.passages["attention_mask"].to(device),
        )
        return {"q": q, "p": p}

    def loss_from_reps(
        self, reps: list[dict[str, torch.Tensor]], batch: RetrievalBatch, device: torch.device
    ) -> LossOutput:
        """InfoNCE over the whole micro-batch (every chunk), negatives gathered
        from every worker."""
        t = self.cfg.train
        lc = t.loss
        q = torch.cat([r["q"] for r in reps])
        p = torch.cat([r["p"] for r in reps])
        fn_mask = lc.mask_false_negatives
        loss = info_nce(
            q,
            p,
            group_size=t.group_size,
            temperature=lc.temperature,
            in_batch=lc.in_batch_negatives,
            gather=lc.gather_negatives,
            passage_ids=batch.passage_ids if fn_mask else None,
            query_positive_ids=batch.query_positive_ids if fn_mask else None,
        )
        # The gathered loss is scaled by the world size for exact gradients.
        world = _world_size()
        gathered = lc.gather_negatives and lc.in_batch_negatives and world > 1
        value = loss.item() / (world if gathered else 1)
        if lc.distill_weight > 0:
            # Local to this rank: the ranks' average is the global mean.
            student = (q.float()[:, None, :] * p.float().view(q.shape[0], t.group_size, -1)).sum(-1)
            kd = distillation(student / lc.temperature, batch.teacher, lc.teacher_temperature)
            loss = loss + lc.distill_weight * kd
            value += lc.distill_weight * kd.item()
        return LossOutput(loss, value)

    def probe(self, module: nn.Module, tokenizer: Any, data: TrainingSet) -> dict[str, Any]:
        """Training-time embeddings of a few fixed texts, to check the export against."""
        embedder = module.embedder
        c = embedder.contract
        rows = [data.positives[i][0] for i in range(min(4, len(data)))]
        _, titles, texts = data.texts(rows)
        queries = [c.format_query(t) for t in data.queries[:4]]
        passages = [c.format_passage(t, ti) for t, ti in zip(texts, titles, strict=True)]
        device = next(embedder.parameters()).device
        embedder.eval()
        with torch.no_grad():
            q = c.tokenize(tokenizer, queries, "query")
            p = c.tokenize(tokenizer, passages, "passage")
            qe = embedder(q["input_ids"].to(device), q["attention_mask"].to(device))
            pe = embedder(p["input_ids"].to(device), p["attention_mask"].to(device))
        embedder.train()
        return {
            "queries": queries,
            "passages": passages,
            "query_embeddings": qe.float().cpu().tolist(),
            "passage_embeddings": pe.float().cpu().tolist(),
        }

    def export(self, state_dict: dict[str, torch.Tensor], tokenizer: Any, out: Path) -> None:
        """Rebuild the backbone un-partitioned, load the gathered weights, export."""
        m = self.cfg.model
        # LoRA on a pretrained base: the frozen weights come from the
        # checkpoint and ``state_dict`` holds the trainable ones only.
        backbone = build_backbone(
            self.model_path(), random_init=not self.frozen_from_checkpoint(), lora=m.lora
        )
        missing, unexpected = backbone.load_state_dict(state_dict, strict=False)
        if unexpected or [k for k in missing if "lora_" in k]:
            raise RuntimeError(
                f"export: state dict mismatch (missing {missing}, unexpected {unexpected})"
            )
        os.makedirs(out, exist_ok=True)
        contract = self.encoding_contract()
        export_embedder(backbone, tokenizer, contract, out, merge=not m.export_adapter)


def distillation(
    student: torch.Tensor, teacher: torch.Tensor | None, teacher_temperature: float
) -> torch.Tensor:
    """Soft cross-entropy of the student's ``(B, G)`` group logits towards
    the teacher's scores over ``teacher_temperature``."""
    if teacher is None:
        raise ValueError("distillation needs the batch's teacher scores")
    return soft_cross_entropy(student, teacher.to(student.device) / teacher_temperature)


def _rows(enc: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows ``start:stop`` of a padded batch, without the columns that are
    padding in every one of them (either padding side)."""
    mask = enc["attention_mask"][start:stop]
    keep = mask.any(dim=0)
    return {k: v[start:stop][:, keep] for k, v in enc.items()}


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
