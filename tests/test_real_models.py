"""Evidence 4: real models train on real data (SciFact train qrels) on 2 workers."""

import json
import math

import pytest
import torch

from raysys.config import load_config
from raysys.models.embedder import load_embedder
from raysys.train.launch import run_training

pytestmark = pytest.mark.slow


def _check_export(outcome):
    assert outcome.finished and outcome.model_dir is not None
    assert all(math.isfinite(h["loss"]) for h in outcome.history)
    probe = json.loads((outcome.model_dir / "train_probe.json").read_text())
    model, tok = load_embedder(str(outcome.model_dir))
    q = model.encode_texts(tok, probe["queries"], "query", formatted=True)
    torch.testing.assert_close(q, torch.tensor(probe["query_embeddings"]), atol=1e-4, rtol=1e-4)
    return model


def test_minilm_mean_pooling_on_scifact(ray_local, scifact, tmp_path):
    cfg = load_config(
        None,
        [
            "model=all-MiniLM-L6-v2",
            f"data={scifact}",
            "data.max_queries=64",
            "data.sampled_negatives=8",
            "contract.pooling=mean",
            "contract.normalize=true",
            "contract.query_max_len=64",
            "contract.passage_max_len=128",
            "train.per_device_queries=8",
            "train.group_size=4",
            "train.max_steps=3",
            "train.zero_stage=2",
            "train.checkpoint.run_name=minilm",
            f"train.checkpoint.storage_path={tmp_path / 'ray'}",
        ],
    )
    outcome = run_training(cfg, tmp_path / "out")
    _check_export(outcome)
    assert (outcome.model_dir / "modules.json").is_file()  # loads in sentence-transformers


def test_smollm2_lora_last_pooling_on_scifact(ray_local, scifact, tmp_path):
    cfg = load_config(
        None,
        [
            "model=SmolLM2-135M",
            f"data={scifact}",
            "data.max_queries=16",
            "data.sampled_negatives=4",
            "model.lora.enabled=true",
            "model.lora.r=8",
            "model.lora.target_modules=[q_proj,v_proj]",
            "contract.pooling=last",
            "contract.append_eos=true",
            "contract.query_prefix='query: '",
            "contract.passage_prefix='passage: '",
            "contract.query_max_len=32",
            "contract.passage_max_len=64",
            "train.per_device_queries=2",
            "train.group_size=2",
            "train.max_steps=2",
            "train.optim.lr=1e-4",
            "train.zero_stage=3",
            "train.checkpoint.run_name=smollm",
            f"train.checkpoint.storage_path={tmp_path / 'ray'}",
        ],
    )
    outcome = run_training(cfg, tmp_path / "out")
    _check_export(outcome)
