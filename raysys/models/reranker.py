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
from raysys.models.backbone import hidden_size, load_pretrained, load_tokenizer, merged
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


def load_reranker(
    path: str | Path, device: str = "cpu", **load_kwargs: Any
) -> tuple[Reranker, Any]:
    """Load an exported reranker for scoring (eval mode); ``load_kwargs`` go
    to ``from_pretrained`` (see :mod:`raysys.models.inference`)."""
    from safetensors.torch import load_file

    load_kwargs.setdefault("dtype", torch.float32)  # not the checkpoint's (see inference.py)
    path = Path(resolve_model(str(path)))
    contract = RerankContract.load(path)
    contract.fingerprint = weights_fingerprint(path)
    backbone = load_pretrained(path, **load_kwargs)
    model = Reranker(backbone, contract)
    model.head.load_state_dict(load_file(path / HEAD_FILE))
    model.to(device).eval()
    return model, load_tokenizer(str(path))


class Scorer:
    """Scores (query, (title, text)) pairs in micro-batches, longest first."""

    def __init__(
        self, path: str | Path, device: str = "cpu", opts: dict[str, Any] | None = None
    ) -> None:
        """``opts``: a pool section as a dict (``micro_batch``, ``micro_tokens``,
        ``precision``, ``int8``, ...; see :mod:`raysys.models.inference`)."""
        from raysys.models.inference import InferenceSettings

        opts = opts or {}
        self.settings = InferenceSettings.for_device(str(device), opts)
        self.settings.prepare()
        model, self.tokenizer = load_reranker(path, device, **self.settings.load_kwargs())
        self.contract = model.contract
        self.model = maybe_quantize(model, opts, device)
        self.device = str(device)

    def _micro_batches(self, ids: list[list[int]], order: list[int]) -> Any:
        from raysys.models.inference import pin

        for b in self.settings.batches([len(ids[i]) for i in order]):
            chunk = [order[j] for j in b]
            enc = self.tokenizer.pad(
                {"input_ids": [ids[i] for i in chunk]}, padding=True, return_tensors="pt"
            )
            yield (
                chunk,
                pin(
                    {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                    self.device,
                ),
            )

    def score_ids(self, ids: list[list[int]]) -> list[float]:
        """Scores of tokenized pairs, longest first in token-budget micro-batches
        (padding runs a batch ahead in a thread; scores stay on the device
        until the end)."""
        from raysys.models.inference import prefetch, to_device

        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        chunks, outs = [], []
        with torch.inference_mode(), self.settings.autocast():
            for chunk, enc in prefetch(self._micro_batches(ids, order)):
                enc = to_device(enc, self.device)
                outs.append(self.model(enc["input_ids"], enc["attention_mask"]).float())
                chunks.append(chunk)
        scores = [0.0] * len(ids)
        if outs:
            flat = torch.cat(outs).cpu().tolist()
            for i, v in zip((i for c in chunks for i in c), flat, strict=True):
                scores[i] = v
        return scores

    def score(self, queries: list[str], docs: list[tuple[str, str]]) -> list[float]:
        pairs = [
            self.contract.format_pair(q, ti, tx) for q, (ti, tx) in zip(queries, docs, strict=True)
        ]
        return self.score_ids(self.contract.token_ids(self.tokenizer, pairs))
