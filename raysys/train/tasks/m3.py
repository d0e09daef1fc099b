"""The M3 task (BGE-M3): dense, sparse and multi-vector heads trained together
on query groups, with self-knowledge distillation (``train.m3``).

Scores of every query against every passage in the global batch, one matrix
per head: dense inner products, sparse term overlap (over vocabulary-sized
weight vectors, so the max over a term's occurrences is differentiable) and
MaxSim (a block of passages at a time, forward and backward: see
:func:`raysys.representations.multivector.maxsim`). **All three heads gather
their representations across workers** (``train.loss.gather_negatives``), so
the ensemble and its distillation see one candidate set; each rank's loss
covers the global batch, and only its own rows carry gradient (times the
world size: exact after averaging; each head's loss term and gradients on 2
workers equal one process over the whole batch, tests/test_m3_gather.py).
``LossOutput.terms`` holds each term.

Loss (BGE-M3, Chen et al. 2024; FlagEmbedding's m3 recipe):

- ``L = (l_d L_d + l_s L_s + l_m L_m + L_ens) / 4``, each an InfoNCE over the
  head's scores (``loss_weights`` l: 1, 0.1, 1), ``L_ens`` over
  ``s_ens = w_d s_d + w_s s_s + w_m s_m`` (``weights`` w: 1, 0.3, 1);
- self-distillation from step ``self_distill_start``: the ensemble's softmax
  (no gradient) is the target of each head's,
  ``L' = (l_d L'_d + l_s L'_s + l_m L'_m) / 3`` and the loss is ``(L + L') / 2``;
- with ``train.loss.distill_weight`` > 0, a reranker's scores over each group
  are distilled into every head the same way.

Representations reach the loss as plain tensors (token vectors padded to the
contract's lengths), so GradCache chunks and concatenates them like the
retriever's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from raysys.contract import EncodingContract
from raysys.data.groups import TrainingSet
from raysys.losses import (
    contrastive_logits,
    gather_batch,
    group_scores,
    soft_cross_entropy,
)
from raysys.models.backbone import base_model, build_backbone
from raysys.models.m3 import REPRESENTATIONS, M3Embedder, export_m3
from raysys.representations.multivector import TokenVectors, maxsim
from raysys.train.tasks.base import LossOutput
from raysys.train.tasks.retrieve import RetrievalBatch, RetrieveTask, _world_size

HEADS = ("dense", "sparse", "multivector")


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Dim 1 right-padded with zeros (or cut) to ``length``."""
    if x.shape[1] >= length:
        return x[:, :length]
    pad = [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]]
    return F.pad(x, pad)


class M3Dual(nn.Module):
    """One module call: every representation of queries and passages."""

    def __init__(self, embedder: M3Embedder) -> None:
        super().__init__()
        self.embedder = embedder

    def side(self, ids: torch.Tensor, mask: torch.Tensor, length: int) -> list[torch.Tensor]:
        out = self.embedder.represent(ids, mask)
        vocab = int(base_model(self.embedder.backbone).config.vocab_size)
        mv = out["multivector"]
        return [
            out["dense"],
            out["sparse"].vocab_vectors(vocab),
            _pad_tokens(mv.vectors, length),
            _pad_tokens(mv.mask.to(torch.int8), length),
        ]

    def forward(self, q_ids, q_mask, p_ids, p_mask):  # noqa: ANN001, ANN201
        c = self.embedder.contract
        return (
            *self.side(q_ids, q_mask, c.query_max_len),
            *self.side(p_ids, p_mask, c.passage_max_len),
        )


_KEYS = ("q_dense", "q_sparse", "q_mv", "q_mv_mask", "p_dense", "p_sparse", "p_mv", "p_mv_mask")


class M3Task(RetrieveTask):
    name: ClassVar[str] = "m3"
    head_prefixes: ClassVar[tuple[str, ...]] = (
        "embedder.sparse_head.",
        "embedder.multivector_head.",
    )

    @classmethod
    def validate(cls, cfg: Any) -> None:
        from raysys.config import ConfigError

        m = cfg.train.m3
        for name in ("weights", "loss_weights"):
            unknown = set(getattr(m, name)) - set(HEADS)
            if unknown:
                raise ConfigError(
                    f"train.m3.{name} takes the keys dense, sparse and multivector, "
                    f"not {', '.join(sorted(unknown))}"
                )
        if m.multivector_dim < 0 or m.self_distill_start < 0:
            raise ConfigError("train.m3.multivector_dim and self_distill_start must be >= 0")

    def encoding_contract(self) -> EncodingContract:
        d = self.cfg.encoding_contract().to_dict()
        dim = self.cfg.train.m3.multivector_dim
        if not dim:
            from transformers import AutoConfig

            dim = int(AutoConfig.from_pretrained(self.model_path()).hidden_size)
        return EncodingContract.from_dict(
            {**d, "representations": list(REPRESENTATIONS), "multivector_dim": dim}
        )

    def build(self, tokenizer: Any) -> nn.Module:
        backbone = self.training_backbone(self.cfg.model)
        return M3Dual(M3Embedder(backbone, self.encoding_contract(), tokenizer.all_special_ids))

    def export_module(self, module: nn.Module) -> nn.Module:
        return module.embedder

    def represent(
        self, module: nn.Module, chunk: RetrievalBatch, device: torch.device
    ) -> dict[str, torch.Tensor]:
        out = module(
            chunk.queries["input_ids"].to(device),
            chunk.queries["attention_mask"].to(device),
            chunk.passages["input_ids"].to(device),
            chunk.passages["attention_mask"].to(device),
        )
        return dict(zip(_KEYS, out, strict=True))

    def head_scores(self, r: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each head's ``(B, N)`` scores of every query against every passage."""
        return {
            "dense": r["q_dense"].float() @ r["p_dense"].float().T,
            "sparse": r["q_sparse"].float() @ r["p_sparse"].float().T,
            "multivector": maxsim(
                TokenVectors(r["q_mv"], r["q_mv_mask"]), TokenVectors(r["p_mv"], r["p_mv_mask"])
            ),
        }

    def loss_from_reps(
        self, reps: list[dict[str, torch.Tensor]], batch: RetrievalBatch, device: torch.device
    ) -> LossOutput:
        t, lc, m = self.cfg.train, self.cfg.train.loss, self.cfg.train.m3
        r = {k: torch.cat([x[k] for x in reps]) for k in _KEYS}
        fn = lc.mask_false_negatives
        pids = batch.passage_ids if fn else None
        qpos = batch.query_positive_ids if fn else None
        teacher = batch.teacher
        scale = 1.0
        if lc.in_batch_negatives and lc.gather_negatives and _world_size() > 1:
            extra = [] if teacher is None else [teacher.to(device)]
            gathered, pids, qpos, scale = gather_batch([r[k] for k in _KEYS] + extra, pids, qpos)
            r = dict(zip(_KEYS, gathered[: len(_KEYS)], strict=True))
            teacher = gathered[len(_KEYS)] if extra else None
        scores = self.head_scores(r)
        w = {h: m.weights.get(h, 0.0) for h in HEADS}
        lw = {h: m.loss_weights.get(h, 0.0) for h in HEADS}
        ens = sum(w[h] * scores[h] for h in HEADS)

        def logits(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return contrastive_logits(
                s / lc.temperature,
                group_size=t.group_size,
                in_batch=lc.in_batch_negatives,
                passage_ids=pids,
                query_positive_ids=qpos,
            )

        head_logits = {h: logits(scores[h]) for h in HEADS}
        ens_logits, target = logits(ens)
        ce = {h: F.cross_entropy(x, y) for h, (x, y) in head_logits.items()}
        ce["ensemble"] = F.cross_entropy(ens_logits, target)
        terms = dict(ce)
        loss = (sum(lw[h] * ce[h] for h in HEADS) + ce["ensemble"]) / 4
        if m.self_distill and self.step >= m.self_distill_start:
            kd_ens = {h: soft_cross_entropy(head_logits[h][0], ens_logits) for h in HEADS}
            terms |= {f"self_distill.{h}": v for h, v in kd_ens.items()}
            sd = sum(lw[h] * kd_ens[h] for h in HEADS)
            loss = (loss + sd / 3) / 2
        if lc.distill_weight > 0:
            if teacher is None:
                raise ValueError("distillation needs the batch's teacher scores")
            target_logits = teacher.to(device).float() / lc.teacher_temperature
            kd_teacher = {
                h: soft_cross_entropy(
                    group_scores(scores[h], t.group_size) / lc.temperature, target_logits
                )
                for h in HEADS
            }
            terms |= {f"teacher.{h}": v for h, v in kd_teacher.items()}
            kd = sum(lw[h] * kd_teacher[h] for h in HEADS)
            loss = loss + lc.distill_weight * kd / 3
        return LossOutput(loss * scale, loss.item(), {k: v.detach() for k, v in terms.items()})

    def probe(self, module: nn.Module, tokenizer: Any, data: TrainingSet) -> dict[str, Any]:
        """Every head's training-time output on a few fixed texts."""
        embedder = module.embedder
        c = embedder.contract
        rows = [data.positives[i][0] for i in range(min(4, len(data)))]
        _, titles, texts = data.texts(rows)
        passages = [c.format_passage(x, ti) for x, ti in zip(texts, titles, strict=True)]
        was = embedder.training
        embedder.eval()
        out = embedder.represent_texts(tokenizer, passages, "passage", formatted=True)
        embedder.train(was)
        return {
            "passages": passages,
            "dense": out["dense"].tolist(),
            "sparse": [[i.tolist(), w.tolist()] for i, w in out["sparse"]],
            "multivector": [v.astype("float32").tolist() for v in out["multivector"]],
        }

    def export(self, state_dict: dict[str, torch.Tensor], tokenizer: Any, out: Path) -> None:
        """The backbone as the retriever exports it, plus the heads."""
        m = self.cfg.model
        backbone = build_backbone(
            self.model_path(), random_init=not self.frozen_from_checkpoint(), lora=m.lora
        )
        heads = {
            k: v
            for k, v in state_dict.items()
            if k.startswith(("sparse_head.", "multivector_head."))
        }
        body = {
            k.removeprefix("backbone."): v
            for k, v in state_dict.items()
            if k.startswith("backbone.")
        }
        if len(heads) != 4:
            raise RuntimeError(f"export: expected the 4 head tensors, got {sorted(heads)}")
        missing, unexpected = backbone.load_state_dict(body, strict=False)
        if unexpected or [k for k in missing if "lora_" in k]:
            raise RuntimeError(
                f"export: state dict mismatch (missing {missing}, unexpected {unexpected})"
            )
        os.makedirs(out, exist_ok=True)
        export_m3(
            backbone, heads, tokenizer, self.encoding_contract(), out, merge=not m.export_adapter
        )
