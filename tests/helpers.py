"""Tiny offline models and toy data for tests (random init, built in seconds),
and the rules every test shares (a skip that must not hide a broken CI)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True under ``CI=true`` (GitHub Actions, GitLab CI and most others set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test; under ``CI=true`` fail it instead: in CI a missing data
    set, package or network is a broken install, not a reason to go green."""
    if in_ci():
        pytest.fail(f"{reason} [CI=true: this would be a skip elsewhere]", pytrace=False)
    pytest.skip(reason)


def import_or_skip(module: str, install: str) -> ModuleType:
    """``module`` imported, else :func:`skip_or_fail` saying how to ``install`` it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        skip_or_fail(f"cannot import {module} ({e}); install it with: {install}")


def assert_loss_falls(losses: list[float], k: int = 3, by: float = 0.1) -> None:
    """The mean of the last ``k`` losses is below the mean of the first ``k``
    by at least the fraction ``by`` (a run that does not learn only wobbles)."""
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < (1 - by) * first, f"loss fell {1 - last / first:.1%} < {by:.0%}: {losses}"


WORDS = [f"w{i}" for i in range(200)] + [
    "the",
    "a",
    "of",
    "and",
    "topic",
    "about",
    "query",
    "passage",
    ":",
]


def _word_tokenizer(special: dict[str, str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(special.values()) + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, **special)


def tiny_llama(
    path: Path,
    model_type: str = "llama",
    padding_side: str = "right",
    hidden_size: int = 32,
    causal_lm: bool = False,
) -> Path:
    """A 2-layer random decoder (llama, mistral, qwen2, qwen3) with a word-level
    tokenizer; ``causal_lm``: saved with its LM head, tied to the input
    embeddings (as SmolLM2's)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok = _word_tokenizer(
        {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
    )
    tok.padding_side = padding_side
    tok.save_pretrained(path)
    kw = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if model_type in ("qwen3",):
        kw["head_dim"] = 8
    if causal_lm:
        kw["tie_word_embeddings"] = True
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    (AutoModelForCausalLM if causal_lm else AutoModel).from_config(config).save_pretrained(path)
    return path


def tiny_bert(path: Path, dropout: float = 0.1) -> Path:
    """A 2-layer random BERT with a word-level tokenizer (``dropout``: its
    hidden and attention dropout)."""
    import torch
    from transformers import BertConfig, BertModel

    path.mkdir(parents=True, exist_ok=True)
    tok = _word_tokenizer(
        {
            "unk_token": "[UNK]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        }
    )
    from tokenizers import processors

    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.cls_token_id), ("[SEP]", tok.sep_token_id)],
    )
    tok.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


def toy_groups(
    path: Path, n: int = 64, n_neg: int = 3, seed: int = 0, filler: int = 6, cue: bool = False
) -> Path:
    """Learnable toy task: query `topic wK` matches the passage that mentions wK.

    With ``cue`` the positive passages also end in `w199` and the others in
    `w198`: a signal a 2-layer cross-encoder learns in a few dozen steps (the
    pure matching task takes it hundreds)."""
    import random

    rng = random.Random(seed)
    corpus = []
    for k in range(n):
        vocab = WORDS[100:190] if cue else WORDS[100:200]
        words = " ".join(rng.choice(vocab) for _ in range(filler))
        corpus.append({"_id": f"d{k}", "title": "", "text": f"about w{k} {words}".strip()})
        if cue:
            corpus[-1]["text"] += " w199"
            corpus.append({"_id": f"n{k}", "title": "", "text": f"about w{k} {words} w198"})
    with (path / "corpus.jsonl").open("w") as f:
        for d in corpus:
            f.write(json.dumps(d) + "\n")
    with (path / "groups.jsonl").open("w") as f:
        for k in range(n):
            pool = [f"n{j}" for j in range(n)] if cue else [f"d{j}" for j in range(n) if j != k]
            negs = rng.sample(pool, n_neg)
            f.write(
                json.dumps(
                    {
                        "query_id": f"q{k}",
                        "query": f"topic w{k}",
                        "positives": [f"d{k}"],
                        "negatives": negs,
                    }
                )
                + "\n"
            )
    return path


def short_training(run_name: str, stage: int, lora: bool, storage: Path) -> list[str]:
    """Overrides of the adaptation tasks' 12-step runs on 2 workers (tiny LM)."""
    extra = [
        f"train.zero_stage={stage}",
        "train.max_steps=12",
        "train.per_device_queries=4",
        "train.optim.lr=2e-2",
        f"train.checkpoint.storage_path={storage}",
        f"train.checkpoint.run_name={run_name}",
    ]
    if lora:
        extra += [
            "model.lora.enabled=true",
            "model.lora.r=8",
            "model.lora.target_modules=[q_proj,v_proj]",
        ]
    return extra


def assert_probe_reproduced(model_dir: Path) -> None:
    """raysys's embedder on the export reproduces the training-time probe."""
    import torch

    from raysys.models.embedder import load_embedder

    probe = json.loads((model_dir / "train_probe.json").read_text())
    embedder, tok = load_embedder(str(model_dir))
    got = [embedder.encode_texts(tok, probe["passages"], "passage", formatted=True)]
    want = probe["passage_embeddings"]
    if probe.get("queries"):
        got.insert(0, embedder.encode_texts(tok, probe["queries"], "query", formatted=True))
        want = probe["query_embeddings"] + want
    torch.testing.assert_close(torch.cat(got), torch.tensor(want), atol=1e-4, rtol=1e-4)


def toy_train_overrides(model: Path | str, data: Path | str, *extra: str) -> list[str]:
    """Config overrides training ``model`` on the toy groups in ``data`` (6
    queries per device, groups of 4, CLS pooling), plus ``extra``."""
    data = Path(data)
    return [
        f"model={model}",
        f"data.groups={data / 'groups.jsonl'}",
        f"data.corpus={data / 'corpus.jsonl'}",
        "contract.pooling=cls",
        "train.per_device_queries=6",
        "train.group_size=4",
        "train.optim.lr=1e-3",
        *extra,
    ]


def tiny_m3(model_dir: Path | str, **contract: object) -> tuple:
    """(M3 model in eval mode, tokenizer, contract) over a tiny BERT, seeded:
    every representation, multi-vector dim 8, CLS pooling."""
    import torch

    from raysys.contract import EncodingContract
    from raysys.models.backbone import build_backbone, load_tokenizer
    from raysys.models.m3 import REPRESENTATIONS, M3Embedder

    torch.manual_seed(0)
    tok = load_tokenizer(str(model_dir))
    c = EncodingContract(
        model=str(model_dir),
        pooling="cls",
        representations=list(REPRESENTATIONS),
        multivector_dim=8,
        **contract,
    )
    return M3Embedder(build_backbone(str(model_dir)), c, tok.all_special_ids).eval(), tok, c
