"""Turn sampled training groups into tokenized tensors under the encoding contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raysys.contract import EncodingContract
from raysys.data.groups import TrainingSet


@dataclass
class RetrievalBatch:
    queries: dict[str, torch.Tensor]
    passages: dict[str, torch.Tensor]
    passage_ids: list[str]
    query_positive_ids: list[set[str]]

    def num_tokens(self) -> int:
        return int(self.queries["attention_mask"].sum() + self.passages["attention_mask"].sum())


class RetrievalCollator:
    """Queries and their groups (positive first, then negatives), tokenized."""

    def __init__(
        self, data: TrainingSet, tokenizer: Any, contract: EncodingContract, group_size: int
    ) -> None:
        self.data = data
        self.tokenizer = tokenizer
        self.contract = contract
        self.group_size = group_size

    def __call__(self, group_indices: list[int], epoch: int, seed: int) -> RetrievalBatch:
        rows: list[int] = []
        for i in group_indices:
            pos, negs = self.data.sample(i, epoch, seed, self.group_size - 1)
            rows.append(pos)
            rows.extend(negs)
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
        )


@dataclass
class RerankBatch:
    pairs: dict[str, torch.Tensor]  # (B * group_size) pairs, positive first per group

    def num_tokens(self) -> int:
        return int(self.pairs["attention_mask"].sum())


class RerankCollator:
    """(query, passage) pairs of each group, positive first, tokenized as one sequence."""

    def __init__(self, data: TrainingSet, tokenizer: Any, contract: Any, group_size: int) -> None:
        self.data = data
        self.tokenizer = tokenizer
        self.contract = contract  # a raysys.models.reranker.RerankContract
        self.group_size = group_size

    def __call__(self, group_indices: list[int], epoch: int, seed: int) -> RerankBatch:
        texts: list[str] = []
        for i in group_indices:
            pos, negs = self.data.sample(i, epoch, seed, self.group_size - 1)
            _, titles, bodies = self.data.texts([pos, *negs])
            q = self.data.queries[i]
            texts += [
                self.contract.format_pair(q, ti, tx) for ti, tx in zip(titles, bodies, strict=True)
            ]
        ids = self.contract.token_ids(self.tokenizer, texts)
        enc = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return RerankBatch(pairs=dict(enc))
