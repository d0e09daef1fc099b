"""Backbone construction: tokenizer, ``AutoModel`` (or random init), LoRA,
gradient checkpointing and bidirectional attention for decoders.

Bidirectional attention (the LLM2Vec idea) replaces the causal mask with a
padding-only 4-D mask and tells the attention modules they are not causal.
It is supported for the architectures in :data:`BIDIRECTIONAL_ARCHS`, those
whose mask builder in transformers passes a prepared 4-D mask through
unchanged (each is covered by a test).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

# model_type values whose attention honours a custom 4-D mask and `is_causal`.
BIDIRECTIONAL_ARCHS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "mpnet", "electra"}
)


def is_decoder(config: Any) -> bool:
    """True for decoder-only language models (causal attention by default)."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    return config.model_type not in _ENCODER_TYPES


def base_model(backbone: nn.Module) -> nn.Module:
    """The plain transformers model under a peft wrapper (or the backbone itself)."""
    get_base = getattr(backbone, "get_base_model", None)
    return get_base() if callable(get_base) else backbone


def hidden_size(backbone: nn.Module) -> int:
    return int(base_model(backbone).config.hidden_size)


def make_bidirectional(backbone: nn.Module) -> None:
    """Switch a supported decoder's attention modules to non-causal."""
    model_type = base_model(backbone).config.model_type
    if model_type not in BIDIRECTIONAL_ARCHS:
        raise ValueError(
            f"bidirectional attention is not supported for model_type "
            f"{model_type!r}; supported: {sorted(BIDIRECTIONAL_ARCHS)}"
        )
    for module in base_model(backbone).modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False


def load_tokenizer(path: str) -> Any:
    """``AutoTokenizer`` with a pad token (EOS, else UNK, when the model has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str) -> Any:
    """:func:`load_tokenizer`, loaded once per process (Ray Data tokenize tasks)."""
    return load_tokenizer(path)


def load_pretrained(path: str, auto: Any = None, **kwargs: Any) -> nn.Module:
    """``AutoModel.from_pretrained`` (or ``auto``'s) that refuses a checkpoint
    lacking some of the model's weights (transformers would initialise them
    at random and only log it)."""
    from transformers import AutoModel

    from raysys.errors import UserError

    auto = auto or AutoModel
    model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise UserError(
            f"{path}: the checkpoint has no weights for {len(missing)} of the model's "
            f"parameters (e.g. {', '.join(sorted(missing)[:3])}); they would be random"
        )
    return model


def build_backbone(
    path: str,
    *,
    random_init: bool = False,
    lora: Any | None = None,
    gradient_checkpointing: bool = False,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "",
    causal_lm: bool = False,
    vocab_size: int | None = None,
    train_embeddings: bool = False,
) -> nn.Module:
    """Load an ``AutoModel`` (or build it from config) and apply LoRA if asked.

    ``dtype`` overrides the checkpoint's (training passes float32, so a
    half-precision checkpoint still gets fp32 master weights);
    ``attn_implementation`` names the attention kernel (sdpa, flash_attention_2).
    ``causal_lm`` loads ``AutoModelForCausalLM`` (with its LM head: LLaRA,
    MNTP). ``vocab_size`` resizes the embeddings (new tokens start at the
    mean embedding); ``train_embeddings`` keeps the input embeddings
    trainable under LoRA (new tokens must learn; peft's per-row trainable
    tokens gather through CUDA only under ZeRO-3).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kw: dict[str, Any] = {}
    if dtype is not None:
        kw["dtype"] = dtype
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    if random_init:
        backbone = auto.from_config(AutoConfig.from_pretrained(path), **kw)
    else:
        backbone = load_pretrained(path, auto=auto, **kw)
    if vocab_size is not None and vocab_size != backbone.get_input_embeddings().num_embeddings:
        backbone.resize_token_embeddings(vocab_size)
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.2x
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if lora is not None and lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        names = {n.split(".")[-1] for n, _ in backbone.named_modules()}
        missing = [t for t in lora.target_modules if t not in names]
        if missing:
            raise ValueError(
                f"LoRA target modules {missing} are not in the model; it has e.g. "
                f"{sorted(n for n in names if n)[:20]}"
            )
        backbone = get_peft_model(
            backbone,
            PeftLoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                bias="none",
            ),
        )
        if train_embeddings:
            base_model(backbone).get_input_embeddings().weight.requires_grad_(True)
    return backbone


def merged(backbone: nn.Module) -> nn.Module:
    """A plain model with LoRA merged in (a copy; ``backbone`` is not modified)."""
    import copy

    if base_model(backbone) is backbone:
        return backbone
    return copy.deepcopy(backbone).merge_and_unload()
