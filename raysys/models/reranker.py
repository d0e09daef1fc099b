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

from pathlib import Path
from typing import Any

import torch
from torch import nn

from raysys.contract import RerankContract
from raysys.models.backbone import hidden_size, load_tokenizer, merged
from raysys.models.embedder import weights_fingerprint
from raysys.models.hub import resolve_model
from raysys.models.pooling import pool
from raysys.models.quantize import maybe_quantize

HEAD_FILE = "score_head.safetensors"
__all__ = ["HEAD_FILE", "RerankContract", "Reranker", "Scorer", "export_reranker", "load_reranker"]


class Reranker(nn.Module):
    """Backbone + linear score head on the pooled state; returns one logit per pair."""

    def __init__(self, backbone: nn.Module, contract: RerankContract) -> None:
        super().__init__()
        self.backbone = backbone
        self.contract = contract
        self.head = nn.Linear(hidden_size(backbone), 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # No KV cache: scoring is one forward pass, a cache is wasted memory.
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        pooled = pool(out.last_hidden_state, attention_mask, self.contract.pooling)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)


def export_reranker(
    model: Reranker, head_state: dict[str, torch.Tensor], tokenizer: Any, out_dir: str | Path
) -> Path:
    """Write the merged backbone, the head, the tokenizer and the contract.

    ``model.backbone`` must hold full weights; ``head_state`` is the head's
    (gathered) state dict.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged(model.backbone).save_pretrained(out)
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
        self, path: str | Path, device: str = "cpu", opts: dict[str, Any] | None = None
    ) -> None:
        """``opts``: a pool section as a dict (``micro_batch``, ``int8``, ...)."""
        opts = opts or {}
        model, self.tokenizer = load_reranker(path, device)
        self.contract = model.contract
        self.model = maybe_quantize(model, opts, device)
        self.device = device
        self.micro = int(opts.get("micro_batch", 32))

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
