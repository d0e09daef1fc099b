"""The train step under DeepSpeed on NCCL (one GPU, no Ray): ZeRO-2 and
ZeRO-3, half precision, LoRA, gradient checkpointing, on a small Llama; the
export reloads and embeds like the trained module."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from raysys.config import load_config
from raysys.train.inprocess import train_steps
from tests.helpers import assert_loss_falls


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
    assert_loss_falls(res.losses, by=0.05)  # it learns (a run that does not only wobbles)
    _assert_export_embeds_as_trained(
        res.probe, tmp_path / "export", half_precision=cfg.train.precision != "fp32"
    )


def _assert_export_embeds_as_trained(
    probe: dict[str, Any] | None, export: Path, half_precision: bool
) -> None:
    """The export, reloaded in plain transformers (CPU, fp32), embeds the
    probe's texts as the trained module did right after its last step.

    fp32 differs only by rounding (LoRA merged into the weights rather than
    applied beside them): 1e-5. A bf16 module rounds every activation to 8
    significant bits while the reload runs in fp32: on the CPU (ZeRO-2 LoRA,
    ZeRO-3 full) that moved these unit vectors by at most 2.5e-3 per
    component (cosine 0.99997); 1e-2 leaves room for the GPU's kernels. An
    export that skips merging LoRA is off by 0.28.
    """
    from raysys.models.embedder import load_embedder

    assert probe is not None and probe["queries"] and probe["passages"]
    model, tok = load_embedder(str(export))
    assert next(model.parameters()).dtype == torch.float32
    got = torch.cat(
        [
            model.encode_texts(tok, probe["queries"], "query", formatted=True),
            model.encode_texts(tok, probe["passages"], "passage", formatted=True),
        ]
    )
    want = torch.tensor(probe["query_embeddings"] + probe["passage_embeddings"])
    assert got.shape == want.shape and torch.isfinite(got).all()
    tol = 1e-2 if half_precision else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    if half_precision:
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert cos.min() > 0.999, cos
