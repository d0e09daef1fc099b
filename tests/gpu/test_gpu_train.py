"""The train step under DeepSpeed on NCCL (one GPU, no Ray): ZeRO-2 and
ZeRO-3, half precision, LoRA, gradient checkpointing, on a small Llama; the
export reloads and embeds like the trained module."""

from __future__ import annotations

import math

import pytest
import torch

from raysys.config import load_config
from raysys.train.inprocess import train_steps


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tests.helpers import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("m") / "llama", hidden_size=64)


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    from tests.helpers import toy_groups

    return toy_groups(tmp_path_factory.mktemp("toy"))


def _cfg(llama, groups, *extra):
    return load_config(
        None,
        [
            f"model.path={llama}",
            f"data.groups={groups / 'groups.jsonl'}",
            f"data.corpus={groups / 'corpus.jsonl'}",
            "contract.pooling=last",
            "contract.append_eos=true",
            "contract.query_max_len=16",
            "contract.passage_max_len=24",
            "train.per_device_queries=8",
            "train.group_size=4",
            "train.optim.lr=3e-3",
            "train.optim.warmup_ratio=0",
            "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "stage,lora,checkpointing",
    [(2, True, True), (3, True, True), (3, False, False), (2, False, True)],
    ids=["zero2-lora-gc", "zero3-lora-gc", "zero3-full", "zero2-full-gc"],
)
def test_train_step_on_nccl(llama, groups, device, half, tmp_path, stage, lora, checkpointing):
    cfg = _cfg(
        llama,
        groups,
        f"train.zero_stage={stage}",
        f"train.precision={half if device.type == 'cuda' else 'fp32'}",
        f"model.lora.enabled={str(lora).lower()}",
        f"train.gradient_checkpointing={str(checkpointing).lower()}",
        "train.attn_implementation=sdpa",
    )
    res = train_steps(cfg, steps=12, device=device, export_to=tmp_path / "export")
    assert all(math.isfinite(x) for x in res.losses), res.losses
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < first, res.losses  # it learns
    # The export reloads in plain transformers and embeds (CPU, fp32).
    from raysys.models.embedder import load_embedder

    model, tok = load_embedder(str(tmp_path / "export"))
    with torch.no_grad():
        emb = model.encode_texts(tok, ["topic w3", "topic w4"], "query")
    assert emb.shape[0] == 2 and torch.isfinite(emb).all()
    p = next(model.parameters())
    assert p.dtype == torch.float32 or p.dtype == torch.bfloat16
