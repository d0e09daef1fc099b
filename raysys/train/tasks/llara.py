"""LLaRA's pretext (Li et al. 2023, "Making Large Language Models A Better
Foundation For Dense Retrieval"): a decoder learns to put the meaning of
its whole input into the states of a few prompt tokens, from plain text.

- **EBAE** (auto-encoding): the text is followed by a prompt meaning "the
  original passage:" ending in ``k`` new tokens; through the LM head, the
  logits at those positions (max-pooled over the ``k``) must predict the bag
  of the text's own tokens.
- **EBAR** (auto-regression): a prompt meaning "the next passage:" ending in
  ``k`` other new tokens must predict the bag of the tokens that follow.
- **One pass.** The text is followed by both prompts; the EBAR prompt sees
  the text but not the EBAE prompt, and takes the positions the EBAE prompt
  has (as if it came right after the text). Each prompt's states then equal
  those of a pass with that prompt alone (``tests/test_llara.py``).

The loss adds a next-token loss over the text (FlagEmbedding's pretraining
does). The export is a plain transformers decoder with the new tokens, and
its encoding contract puts the EBAR prompt after queries and the EBAE prompt
after passages, pooled as the mean of the last ``k`` states, so encode,
search and mining use it as trained. Fine-tuning afterwards is the
``retrieve`` task with that contract and ``train.loss.in_batch_negatives=false``
(hard negatives only, as LLaRA's fine-tune).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from raysys.contract import EncodingContract, truncated_ids
from raysys.data.texts import TextSet, split_halves
from raysys.models.backbone import base_model, build_backbone, merged
from raysys.models.embedder import export_embedder
from raysys.models.pooling import pool
from raysys.train.tasks.base import LossOutput
from raysys.train.tasks.text import TextTask

PARTS = ("ebae", "ebar")


def special_tokens(k: int) -> tuple[list[str], list[str]]:
    """The EBAE and EBAR prompt tokens: ``<s1>..<sk>`` and ``<sk+1>..<s2k>``
    (the names BAAI's LLaRA checkpoints use)."""
    return [f"<s{i}>" for i in range(1, k + 1)], [f"<s{i}>" for i in range(k + 1, 2 * k + 1)]


def llara_contract(cfg: Any) -> EncodingContract:
    """The encoding contract of a LLaRA-adapted model: EBAR prompt after
    queries, EBAE prompt after passages, mean of the last ``k`` states."""
    la = cfg.train.llara
    ebae, ebar = special_tokens(la.special)
    d = cfg.encoding_contract().to_dict()
    d.update(
        query_prefix=la.prefix,
        passage_prefix=la.prefix,
        query_suffix=la.ebar_prompt + "".join(ebar),
        passage_suffix=la.ebae_prompt + "".join(ebae),
        pooling="last",
        last_k=la.special,
        special_tokens=ebae + ebar,
        append_eos=False,
        bidirectional=False,
    )
    return EncodingContract.from_dict(d)


def add_special_tokens(tokenizer: Any, tokens: list[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` as special tokens (once); their ids."""
    have = tokenizer.get_vocab()
    new = [t for t in tokens if t not in have]
    if new:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": new}, replace_extra_special_tokens=False
        )
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


@dataclass
class LlaraBatch:
    """Texts with one or both prompts; ``parts`` says which, in order."""

    input_ids: torch.Tensor  # (B, L)
    allowed: torch.Tensor  # (B, L, L) bool: query position i may attend to key j
    position_ids: torch.Tensor  # (B, L)
    special_index: torch.Tensor  # (B, k * len(parts)): positions of the prompt tokens
    lm_labels: torch.Tensor  # (B, L): the next token at text positions, else -100
    targets: dict[str, torch.Tensor]  # part -> (B, T) token ids, -1 = none
    parts: tuple[str, ...]

    def num_tokens(self) -> int:
        return int(self.allowed.diagonal(dim1=1, dim2=2).sum())


def layout(body: list[int], prompts: list[list[int]]) -> tuple[list[int], Any, list[int]]:
    """One row: ``body`` followed by ``prompts``; each prompt sees the body
    and itself (causally), not the prompts before it, and starts at the
    position right after the body. Returns (ids, allowed (T, T), positions)."""
    n = len(body)
    ids = list(body)
    pos = list(range(n))
    spans = []
    for p in prompts:
        spans.append((len(ids), len(ids) + len(p)))
        ids += p
        pos += list(range(n, n + len(p)))
    t = len(ids)
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for i, (a, b) in enumerate(spans):
        for a2, b2 in spans[:i]:
            allowed[a:b, a2:b2] = False
    return ids, allowed, pos


class LlaraCollator:
    """Texts → :class:`LlaraBatch` (deterministic: the halves are fixed)."""

    def __init__(self, data: TextSet, tokenizer: Any, cfg: Any, parts=PARTS) -> None:  # noqa: ANN001
        la = cfg.train.llara
        self.data = data
        self.tokenizer = tokenizer
        self.la = la
        self.parts = tuple(parts)
        contract = llara_contract(cfg)
        self.prompts = {
            "ebae": contract.suffix_ids(tokenizer, "passage"),
            "ebar": contract.suffix_ids(tokenizer, "query"),
        }
        self.skip_ids = set(tokenizer.all_special_ids)

    def bag(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self.tokenizer(
            text, add_special_tokens=False, truncation=True, max_length=self.la.target_max_len
        )["input_ids"]
        return sorted({i for i in ids if i not in self.skip_ids})

    def __call__(self, rows: list[int], epoch: int) -> LlaraBatch:
        la = self.la
        halves = [split_halves(t) for t in self.data.texts(rows)]
        bodies = truncated_ids(
            self.tokenizer, [la.prefix + first for first, _ in halves], la.max_len, False, "llara"
        )
        laid = [layout(b, [self.prompts[p] for p in self.parts]) for b in bodies]
        width = max(len(ids) for ids, _, _ in laid)
        bsz = len(rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((bsz, width), pad, dtype=torch.long)
        allowed = torch.zeros(bsz, width, width, dtype=torch.bool)
        allowed[:, torch.arange(width), torch.arange(width)] = True  # padding sees itself
        positions = torch.zeros(bsz, width, dtype=torch.long)
        labels = torch.full((bsz, width), -100, dtype=torch.long)
        k = la.special
        special = torch.zeros(bsz, k * len(self.parts), dtype=torch.long)
        for r, ((ids, allow, pos), body) in enumerate(zip(laid, bodies, strict=True)):
            t = len(ids)
            input_ids[r, :t] = torch.tensor(ids)
            allowed[r, :t, :t] = allow
            positions[r, :t] = torch.tensor(pos)
            # Text position i predicts text token i + 1.
            labels[r, : len(body) - 1] = torch.tensor(body[1:], dtype=torch.long)
            ends = []
            start = len(body)
            for p in self.parts:
                start += len(self.prompts[p])
                ends += list(range(start - k, start))
            special[r] = torch.tensor(ends)
        sources = {"ebae": [first for first, _ in halves], "ebar": [nxt for _, nxt in halves]}
        targets = {}
        for p in self.parts:
            bags = [self.bag(t) for t in sources[p]]
            width_t = max([len(b) for b in bags] + [1])
            tt = torch.full((bsz, width_t), -1, dtype=torch.long)
            for r, b in enumerate(bags):
                tt[r, : len(b)] = torch.tensor(b, dtype=torch.long)
            targets[p] = tt
        return LlaraBatch(input_ids, allowed, positions, special, labels, targets, self.parts)


def bag_of_tokens_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LLaRA's loss of one prompt: ``logits`` ``(B, k, V)`` max-pooled over the
    ``k`` positions, log-softmax over the vocabulary, minus the mean
    log-probability of each row's target tokens (``targets`` ``(B, T)``, -1
    pads), averaged over the rows that have targets."""
    logp = torch.log_softmax(logits.float().max(dim=1).values, dim=-1)
    valid = targets >= 0
    picked = logp.gather(1, targets.clamp(min=0)) * valid
    per_row = -picked.sum(1) / valid.sum(1).clamp(min=1)
    has = valid.any(1)
    if not has.any():
        return logits.sum() * 0.0
    return per_row[has].mean()


class LlaraModel(nn.Module):
    """A causal LM run on a custom attention layout; returns the LM-head logits
    at the prompt tokens and the next-token loss over the texts."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids, allowed, position_ids, special_index, lm_labels):  # noqa: ANN001, ANN201
        lm = base_model(self.backbone)
        dtype = next(p for p in lm.parameters() if p.is_floating_point()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        hidden = lm.get_decoder()(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        head = lm.get_output_embeddings()
        picked = hidden.gather(1, special_index[..., None].expand(-1, -1, hidden.shape[-1]))
        special_logits = head(picked)
        if (lm_labels >= 0).any():
            logits = head(hidden).float()
            lm_loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), lm_labels.reshape(-1), ignore_index=-100
            )
        else:
            lm_loss = special_logits.sum() * 0.0
        return special_logits, lm_loss

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
        """Encoding as the export does it: causal pass, mean of the last ``k`` states, L2."""
        hidden = (
            base_model(self.backbone)
            .get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            .last_hidden_state
        )
        return F.normalize(pool(hidden, attention_mask, "last", k).float(), dim=-1)


class LlaraTask(TextTask):
    name: ClassVar[str] = "llara"

    @classmethod
    def validate(cls, cfg: Any) -> None:
        from raysys.config import ConfigError

        super().validate(cfg)
        la = cfg.train.llara
        if la.special < 1:
            raise ConfigError("train.llara.special must be >= 1")
        if la.lm_weight < 0 or la.bow_weight <= 0:
            raise ConfigError("train.llara: lm_weight must be >= 0 and bow_weight > 0")
        llara_contract(cfg)

    def _special_ids(self, tokenizer: Any) -> list[int]:
        ebae, ebar = special_tokens(self.cfg.train.llara.special)
        return add_special_tokens(tokenizer, ebae + ebar)

    def build(self, tokenizer: Any) -> nn.Module:
        self._special_ids(tokenizer)  # the collator's tokenizer gets them too
        backbone = self.training_backbone(
            self.cfg.model, causal_lm=True, vocab_size=len(tokenizer), train_embeddings=True
        )
        return LlaraModel(backbone)

    def collator(self, data: TextSet, tokenizer: Any) -> LlaraCollator:
        self._special_ids(tokenizer)
        return LlaraCollator(data, tokenizer, self.cfg)

    def losses(
        self, module: nn.Module, batch: LlaraBatch, device: torch.device
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The bag-of-tokens loss of each prompt in the batch and the LM loss."""
        special_logits, lm_loss = module(
            batch.input_ids.to(device),
            batch.allowed.to(device),
            batch.position_ids.to(device),
            batch.special_index.to(device),
            batch.lm_labels.to(device),
        )
        k = self.cfg.train.llara.special
        bow = {
            p: bag_of_tokens_loss(
                special_logits[:, i * k : (i + 1) * k], batch.targets[p].to(device)
            )
            for i, p in enumerate(batch.parts)
        }
        return bow, lm_loss

    def loss(self, module: nn.Module, batch: LlaraBatch, device: torch.device) -> LossOutput:
        la = self.cfg.train.llara
        bow, lm_loss = self.losses(module, batch, device)
        loss = la.bow_weight * sum(bow.values()) / len(bow) + la.lm_weight * lm_loss
        return LossOutput(loss, loss.item())

    def probe(self, module: nn.Module, tokenizer: Any, data: TextSet) -> dict[str, Any]:
        """Training-time embeddings of a few texts under the export's contract."""
        c = llara_contract(self.cfg)
        texts = data.texts(list(range(min(4, len(data)))))
        queries = [c.format_query(t[:80]) for t in texts]
        passages = [c.format_passage(t) for t in texts]
        device = next(module.parameters()).device
        module.eval()
        with torch.no_grad():
            q = c.tokenize(tokenizer, queries, "query")
            p = c.tokenize(tokenizer, passages, "passage")
            k = self.cfg.train.llara.special
            qe = module.embed(q["input_ids"].to(device), q["attention_mask"].to(device), k)
            pe = module.embed(p["input_ids"].to(device), p["attention_mask"].to(device), k)
        module.train()
        return {
            "queries": queries,
            "passages": passages,
            "query_embeddings": qe.cpu().tolist(),
            "passage_embeddings": pe.cpu().tolist(),
        }

    def export(self, state_dict: dict[str, torch.Tensor], tokenizer: Any, out: Path) -> None:
        """Rebuild the causal LM with the new tokens, load the trained weights,
        export it merged with the LLaRA contract."""
        m = self.cfg.model
        backbone = build_backbone(
            self.model_path(),
            random_init=True,
            lora=m.lora,
            causal_lm=True,
            vocab_size=len(tokenizer),
            train_embeddings=True,
        )
        missing, unexpected = backbone.load_state_dict(state_dict, strict=False)
        if unexpected or missing:
            raise RuntimeError(
                f"export: state dict mismatch (missing {missing}, unexpected {unexpected})"
            )
        os.makedirs(out, exist_ok=True)
        export_embedder(merged(backbone), tokenizer, llara_contract(self.cfg), out, merge=True)
