"""README "Each export carries train_probe.json" for a full (non-LoRA)
ZeRO-3 fine-tune through the Ray loop (issue #33, item 7): every parameter is
partitioned, the export gathers them, and the export reloads with plain
transformers to the training-time embeddings."""

from __future__ import annotations

import json

import pytest
import torch

from raysys.config import load_config
from raysys.train.engine import deepspeed_config


def _embed(model: torch.nn.Module, tok, texts: list[str], max_len: int) -> torch.Tensor:
    """Transformers alone: the texts (already prefixed) cut to ``max_len - 1``
    tokens, EOS appended, the last state, L2-normalised (the contract's
    ``last`` pooling with ``append_eos``)."""
    out = []
    for t in texts:
        ids = tok(t, truncation=True, max_length=max_len - 1)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        out.append(torch.nn.functional.normalize(h, dim=-1))
    return torch.stack(out)


def test_full_fine_tuning_partitions_every_parameter_under_zero3() -> None:
    """Small parameters too (threshold 0), so the export's gather is exercised
    on a tiny model; under LoRA the threshold is raised to the adapters' size
    (#34 fault 7), never below DeepSpeed's default."""
    train = load_config(None, ["train.zero_stage=3"]).train
    full = deepspeed_config(train, 2)["zero_optimization"]
    lora = deepspeed_config(train, 2, lora=True)["zero_optimization"]
    big = deepspeed_config(train, 2, lora=True, persist_numel=352_256)["zero_optimization"]
    assert full["stage3_param_persistence_threshold"] == 0
    assert lora["stage3_param_persistence_threshold"] == 100_000
    assert big["stage3_param_persistence_threshold"] == 352_256


@pytest.mark.slow
def test_full_zero3_export_reloads_to_the_training_probe(
    ray_local, tiny_llama_dir, toy_data, tmp_path
) -> None:
    from transformers import AutoModel, AutoTokenizer

    from raysys.train.launch import run_training

    cfg = load_config(
        None,
        [
            f"model={tiny_llama_dir}",
            "model.lora.enabled=false",
            f"data.groups={toy_data / 'groups.jsonl'}",
            f"data.corpus={toy_data / 'corpus.jsonl'}",
            "contract.pooling=last",
            "contract.append_eos=true",
            "contract.query_prefix='query: '",
            "contract.passage_prefix='passage: '",
            "contract.query_max_len=16",
            "contract.passage_max_len=24",
            "train.zero_stage=3",
            "train.scaling.num_workers=2",
            "train.max_steps=3",
            "train.per_device_queries=4",
            "train.group_size=4",
            "train.optim.lr=1e-2",
            "train.optim.warmup_ratio=0.0",
            "train.checkpoint.run_name=zero3-full",
            f"train.checkpoint.storage_path={tmp_path / 'ray'}",
        ],
    )
    outcome = run_training(cfg, tmp_path / "out")
    assert outcome.finished and [h["step"] for h in outcome.history] == [1, 2, 3]
    model_dir = outcome.model_dir
    assert model_dir is not None
    # Plain transformers: every weight present, none left at random init.
    model, info = AutoModel.from_pretrained(model_dir, output_loading_info=True)
    assert not any(info.values()), info
    base = AutoModel.from_pretrained(tiny_llama_dir).state_dict()
    trained = model.state_dict()
    assert trained.keys() == base.keys()
    assert all(trained[k].shape == base[k].shape for k in base)
    moved = [k for k in base if not torch.allclose(trained[k], base[k], atol=1e-3)]
    assert len(moved) > len(base) // 2, moved  # a full fine-tune, not adapters
    probe = json.loads((model_dir / "train_probe.json").read_text())
    contract = json.loads((model_dir / "raysys_contract.json").read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model.eval()
    reloaded = torch.cat(
        [
            _embed(model, tok, probe["queries"], contract["query_max_len"]),
            _embed(model, tok, probe["passages"], contract["passage_max_len"]),
        ]
    )
    want = torch.tensor(probe["query_embeddings"] + probe["passage_embeddings"])
    torch.testing.assert_close(reloaded, want, atol=1e-4, rtol=1e-4)
    # The base model embeds the probe texts otherwise: the probe is the
    # trained model's.
    base_model = AutoModel.from_pretrained(tiny_llama_dir).eval()
    base_embs = _embed(base_model, tok, probe["passages"], contract["passage_max_len"])
    assert not torch.allclose(base_embs, torch.tensor(probe["passage_embeddings"]), atol=1e-3)
