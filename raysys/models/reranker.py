"""Pointwise cross-encoder reranker (RankLLaMA-style for decoders, [CLS] for encoders).

A (query, passage) pair is formatted with the contract's template (default
``query: {query} document: {document}``, where ``{document}`` is
``"{title} {text}"``), tokenized to at most ``max_len`` tokens (the passage end
is what truncation cuts; with ``append_eos`` the last token is always EOS), and
scored by a linear head on the pooled state: ``last`` (EOS) for decoders,
``cls`` for encoders.

The export is a plain Hugging Face model folder (LoRA merged) plus
``score_head.safetensors`` and the contract ``raysys_reranker.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from raysys.contract import ContractError, JsonContract
from raysys.models.embedder import (
    _base_model,
    load_tokenizer,
    pool,
    quantize_int8,
    weights_fingerprint,
)
from raysys.models.hub import resolve_model

RERANK_CONTRACT_FILE = "raysys_reranker.json"
HEAD_FILE = "score_head.safetensors"


@dataclass
class RerankContract(JsonContract):
    """How a (query, passage) pair becomes a score."""

    FILE: ClassVar[str] = RERANK_CONTRACT_FILE
    LABEL: ClassVar[str] = "reranker contract"

    model: str = ""
    template: str = "query: {query} document: {document}"
    pooling: str = "cls"
    append_eos: bool = False
    max_len: int = 256
    query_max_chars: int = 2000
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean", "last"):
            raise ContractError(f"reranker pooling must be cls, mean or last, not {self.pooling!r}")
        if not isinstance(self.max_len, int) or self.max_len < 8:
            raise ContractError(f"reranker max_len must be an integer >= 8, not {self.max_len!r}")
        if "{query}" not in self.template:
            raise ContractError("reranker template needs a {query} slot")
        if not any(s in self.template for s in ("{document}", "{text}")):
            raise ContractError("reranker template needs a {document} or {text} slot")

    def format_pair(self, query: str, title: str | None, text: str) -> str:
        title = title or ""
        document = f"{title} {text}" if title and text else (title or text)
        return (
            self.template.replace("{query}", query[: self.query_max_chars])
            .replace("{document}", document)
            .replace("{title}", title)
            .replace("{text}", text)
        )

    def token_ids(self, tokenizer: Any, pairs: list[str]) -> list[list[int]]:
        """Unpadded ids; the end of the passage is cut, EOS kept last when asked."""
        pairs = [p[: self.max_len * 64] for p in pairs]
        if self.append_eos:
            if tokenizer.eos_token_id is None:
                raise ContractError("reranker append_eos is set but the tokenizer has no EOS token")
            enc = tokenizer(pairs, truncation=True, max_length=self.max_len - 1)
            return [list(x) + [tokenizer.eos_token_id] for x in enc["input_ids"]]
        enc = tokenizer(pairs, truncation=True, max_length=self.max_len)
        return [list(x) for x in enc["input_ids"]]

    @classmethod
    def missing_message(cls, path: Path) -> str:
        return (
            f"{path.parent} is not a raysys reranker export (no {cls.FILE}); "
            "train one with `raysys train CONFIG train.task=rerank`"
        )


class Reranker(nn.Module):
    """Backbone + linear score head on the pooled state; returns one logit per pair."""

    def __init__(self, backbone: nn.Module, contract: RerankContract) -> None:
        super().__init__()
        self.backbone = backbone
        self.contract = contract
        hidden = int(_base_model(backbone).config.hidden_size)
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        pooled = pool(out.last_hidden_state, attention_mask, self.contract.pooling)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)


def export_reranker(
    model: Reranker, head_state: dict[str, torch.Tensor], tokenizer: Any, out_dir: str | Path
) -> Path:
    """Write the merged backbone, the head, the tokenizer and the contract.

    ``model.backbone`` must hold full weights; ``head_state`` is the head's
    (gathered) state dict.
    """
    import copy

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    if _base_model(backbone) is not backbone:
        backbone = copy.deepcopy(backbone).merge_and_unload()
    backbone.save_pretrained(out)
    save_file({k: v.detach().float().contiguous() for k, v in head_state.items()}, out / HEAD_FILE)
    tokenizer.save_pretrained(out)
    contract = RerankContract.from_dict({**model.contract.to_dict(), "fingerprint": None})
    contract.save(out)
    return out


def load_reranker(path: str | Path, device: str = "cpu") -> tuple[Reranker, Any]:
    """Load an exported reranker for scoring (eval mode)."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    path = Path(resolve_model(str(path)))
    contract = RerankContract.load(path)
    contract.fingerprint = weights_fingerprint(path)
    backbone = AutoModel.from_pretrained(path)
    model = Reranker(backbone, contract)
    model.head.load_state_dict(load_file(path / HEAD_FILE))
    model.to(device).eval()
    return model, load_tokenizer(str(path))


class Scorer:
    """Scores (query, (title, text)) pairs in micro-batches, longest first."""

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        micro_batch: int = 32,
        int8: bool = False,
        int8_per_channel: bool = True,
        int8_ffn_down_fp32: bool = False,
    ) -> None:
        self.model, self.tokenizer = load_reranker(path, device)
        if int8 and device == "cpu":
            self.model = quantize_int8(self.model, int8_per_channel, int8_ffn_down_fp32)
        self.contract = self.model.contract
        self.device = device
        self.micro = micro_batch

    def score_ids(self, ids: list[list[int]]) -> list[float]:
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        scores = [0.0] * len(ids)
        with torch.inference_mode():
            for s in range(0, len(order), self.micro):
                chunk = order[s : s + self.micro]
                enc = self.tokenizer.pad(
                    {"input_ids": [ids[i] for i in chunk]}, padding=True, return_tensors="pt"
                )
                out = self.model(
                    enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
                )
                for i, v in zip(chunk, out.float().cpu().tolist(), strict=True):
                    scores[i] = v
        return scores

    def score(self, queries: list[str], docs: list[tuple[str, str]]) -> list[float]:
        pairs = [
            self.contract.format_pair(q, ti, tx) for q, (ti, tx) in zip(queries, docs, strict=True)
        ]
        return self.score_ids(self.contract.token_ids(self.tokenizer, pairs))
