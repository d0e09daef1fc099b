"""LLM2Vec's MNTP (BehnamGhader et al. 2024): masked next-token prediction
teaches a decoder to use the bidirectional attention raysys gives it.

About ``train.mntp.mask_prob`` of each text's tokens are chosen (never the
first, nor special tokens); of those 80% become the mask token, 10% a
random token and 10% stay. With every token seeing every other, the LM head
at position ``i - 1`` must predict the original token ``i`` (a decoder's
head predicts the next token, so MNTP keeps it doing that). The export is
the decoder with the encoding contract's bidirectional attention (required:
``contract.bidirectional=true``), ready for the ``retrieve`` task or for
encoding zero-shot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysys.contract import truncated_ids
from raysys.data.texts import TextSet
from raysys.models.backbone import base_model, build_backbone, make_bidirectional
from raysys.models.embedder import export_embedder
from raysys.models.pooling import bidirectional_mask, pool
from raysys.train.tasks.base import LossOutput
from raysys.train.tasks.text import TextTask

IGNORE = -100


def mask_tokens(
    ids: list[int],
    rng: np.random.Generator,
    mask_prob: float,
    mask_id: int,
    vocab_size: int,
    skip: set[int],
) -> tuple[list[int], list[int]]:
    """MNTP's corruption of one text: ``(inputs, labels)`` where labels hold
    the original token at chosen positions and -100 elsewhere."""
    inputs, labels = list(ids), [IGNORE] * len(ids)
    for i in range(1, len(ids)):  # position 0 has no previous position to predict it
        if ids[i] in skip or rng.random() >= mask_prob:
            continue
        labels[i] = ids[i]
        roll = rng.random()
        if roll < 0.8:
            inputs[i] = mask_id
        elif roll < 0.9:
            inputs[i] = int(rng.integers(vocab_size))
    return inputs, labels


def mntp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits at ``i - 1`` against the label at ``i``."""
    shifted = logits[:, :-1]
    target = labels[:, 1:]
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE
    )


@dataclass
class MntpBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


class MntpCollator:
    """Texts → masked inputs; the masks are drawn from ``(seed, epoch, row)``."""

    def __init__(self, data: TextSet, tokenizer: Any, cfg: Any, mask_id: int) -> None:
        self.data = data
        self.tokenizer = tokenizer
        self.mp = cfg.train.mntp
        self.seed = cfg.train.seed
        self.mask_id = mask_id
        self.skip = set(tokenizer.all_special_ids)

    def __call__(self, rows: list[int], epoch: int) -> MntpBatch:
        ids = truncated_ids(self.tokenizer, self.data.texts(rows), self.mp.max_len, False, "mntp")
        pairs = [
            mask_tokens(
                x,
                np.random.default_rng([self.seed, epoch, row]),
                self.mp.mask_prob,
                self.mask_id,
                len(self.tokenizer),
                self.skip,
            )
            for x, row in zip(ids, rows, strict=True)
        ]
        width = max(len(x) for x in ids)
        bsz = len(rows)
        input_ids = torch.full((bsz, width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(bsz, width, dtype=torch.long)
        labels = torch.full((bsz, width), IGNORE, dtype=torch.long)
        for r, (inp, lab) in enumerate(pairs):
            n = len(inp)
            input_ids[r, :n] = torch.tensor(inp)
            mask[r, :n] = 1
            labels[r, :n] = torch.tensor(lab)
        return MntpBatch(input_ids, mask, labels)


def mask_token_id(tokenizer: Any, name: str) -> int:
    """The id MNTP masks with: ``name``, else the tokenizer's mask token, else "_"."""
    from raysys.config import ConfigError

    token = name or tokenizer.mask_token or "_"
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ConfigError(
            f"train.mntp.mask_token: {token!r} is not one token of this tokenizer; name one that is"
        )
    return int(ids[0])


class MntpModel(nn.Module):
    """A causal LM with bidirectional attention; returns the MNTP loss."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        make_bidirectional(base_model(backbone).get_decoder())

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lm = base_model(self.backbone)
        dtype = next(p for p in lm.parameters() if p.is_floating_point()).dtype
        return lm.get_decoder()(
            input_ids=input_ids,
            attention_mask=bidirectional_mask(attention_mask, dtype),
            use_cache=False,
        ).last_hidden_state

    def forward(self, input_ids, attention_mask, labels):  # noqa: ANN001, ANN201
        hidden = self._hidden(input_ids, attention_mask)
        # The head only where a label follows (position i - 1 of a masked i).
        where = labels[:, 1:] != IGNORE
        if not where.any():
            return hidden.sum() * 0.0
        head = base_model(self.backbone).get_output_embeddings()
        logits = head(hidden[:, :-1][where]).float()
        return F.cross_entropy(logits, labels[:, 1:][where])

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, how: str
    ) -> torch.Tensor:
        hidden = self._hidden(input_ids, attention_mask)
        return F.normalize(pool(hidden, attention_mask, how).float(), dim=-1)


class MntpTask(TextTask):
    name: ClassVar[str] = "mntp"

    @classmethod
    def validate(cls, cfg: Any) -> None:
        from raysys.config import ConfigError

        super().validate(cfg)
        mp = cfg.train.mntp
        if not 0 < mp.mask_prob < 1:
            raise ConfigError("train.mntp.mask_prob must be in (0, 1)")
        if not cfg.contract.bidirectional:
            raise ConfigError(
                "the mntp task trains bidirectional attention: set contract.bidirectional=true"
            )

    def load_data(self) -> TextSet:
        from raysys.models.backbone import load_tokenizer

        # On the driver: a mask token the tokenizer lacks fails here, in one line.
        mask_token_id(load_tokenizer(self.model_path()), self.cfg.train.mntp.mask_token)
        return super().load_data()

    def build(self, tokenizer: Any) -> nn.Module:
        return MntpModel(self.training_backbone(self.cfg.model, causal_lm=True))

    def frozen_from_checkpoint(self) -> bool:
        return self.uses_lora() and not self.cfg.model.random_init

    def collator(self, data: TextSet, tokenizer: Any) -> MntpCollator:
        return MntpCollator(
            data, tokenizer, self.cfg, mask_token_id(tokenizer, self.cfg.train.mntp.mask_token)
        )

    def loss(self, module: nn.Module, batch: MntpBatch, device: torch.device) -> LossOutput:
        loss = module(
            batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels.to(device)
        )
        return LossOutput(loss, loss.item())

    def probe(self, module: nn.Module, tokenizer: Any, data: TextSet) -> dict[str, Any]:
        """Training-time embeddings of a few texts under the export's contract."""
        c = self.cfg.encoding_contract()
        texts = data.texts(list(range(min(4, len(data)))))
        passages = [c.format_passage(t) for t in texts]
        device = next(module.parameters()).device
        module.eval()
        with torch.no_grad():
            p = c.tokenize(tokenizer, passages, "passage")
            pe = module.embed(p["input_ids"].to(device), p["attention_mask"].to(device), c.pooling)
        module.train()
        return {"queries": [], "passages": passages, "passage_embeddings": pe.cpu().tolist()}

    def export(self, state_dict: dict[str, torch.Tensor], tokenizer: Any, out: Path) -> None:
        """Rebuild the causal LM, load the trained weights, export it merged."""
        m = self.cfg.model
        partial = self.frozen_from_checkpoint()
        backbone = build_backbone(
            self.model_path(), random_init=not partial, lora=m.lora, causal_lm=True
        )
        missing, unexpected = backbone.load_state_dict(state_dict, strict=False)
        if unexpected or [k for k in missing if not partial or "lora_" in k]:
            raise RuntimeError(
                f"export: state dict mismatch (missing {missing}, unexpected {unexpected})"
            )
        os.makedirs(out, exist_ok=True)
        contract = self.cfg.encoding_contract()
        export_embedder(backbone, tokenizer, contract, out, merge=True)
