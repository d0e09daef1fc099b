"""Bi-encoder over any Hugging Face ``AutoModel``: encoders (BERT-like) and decoders.

- Pooling ``cls``, ``mean`` or ``last``. ``last`` is RepLLaMA's EOS/last token and
  is found from the attention mask, so it is right under left or right padding.
- Optional bidirectional attention for decoders (the LLM2Vec idea): the causal
  mask is replaced by a padding-only 4-D mask and the attention modules are told
  they are not causal. Supported for the architectures in
  :data:`BIDIRECTIONAL_ARCHS` (those whose mask builder in transformers passes a
  prepared 4-D mask through unchanged; each is covered by a test).
- Optional LoRA through peft, and gradient checkpointing.
- Export writes the merged model (or the adapter plus the name of its base),
  the tokenizer and the encoding contract; encoders with mean/cls pooling also
  get the files sentence-transformers needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raysys.contract import EncodingContract
from raysys.models.hub import resolve_model

# model_type values whose attention honours a custom 4-D mask and `is_causal`.
BIDIRECTIONAL_ARCHS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "mpnet", "electra"}
)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool token states ``(B, L, H)`` with attention ``mask`` ``(B, L)`` to ``(B, H)``."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if how == "last":
        # Position of the last attended token, under left or right padding alike.
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask.long()).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}")


def bidirectional_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask ``(B, 1, L, L)``: every token sees every non-pad token."""
    keep = mask[:, None, None, :].to(torch.bool)
    out = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~keep, torch.finfo(dtype).min).expand(-1, 1, mask.shape[1], -1)


def is_decoder(config: Any) -> bool:
    if getattr(config, "is_encoder_decoder", False):
        return False
    return config.model_type not in _ENCODER_TYPES


def _base_model(backbone: nn.Module) -> nn.Module:
    get_base = getattr(backbone, "get_base_model", None)
    return get_base() if callable(get_base) else backbone


class Embedder(nn.Module):
    """Encode tokenized texts into (optionally normalised) vectors under a contract."""

    def __init__(self, backbone: nn.Module, contract: EncodingContract) -> None:
        super().__init__()
        self.backbone = backbone
        self.contract = contract
        config = _base_model(backbone).config
        self.model_type = config.model_type
        if contract.bidirectional and is_decoder(config):
            if self.model_type not in BIDIRECTIONAL_ARCHS:
                raise ValueError(
                    f"bidirectional attention is not supported for model_type "
                    f"{self.model_type!r}; supported: {sorted(BIDIRECTIONAL_ARCHS)}"
                )
            for module in _base_model(backbone).modules():
                if hasattr(module, "is_causal"):
                    module.is_causal = False
            self._bidirectional = True
        else:
            self._bidirectional = False

    @property
    def hidden_size(self) -> int:
        return int(_base_model(self.backbone).config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask_arg: torch.Tensor = attention_mask
        if self._bidirectional:
            dtype = next(p for p in self.backbone.parameters() if p.is_floating_point()).dtype
            mask_arg = bidirectional_mask(attention_mask, dtype)
        out = self.backbone(input_ids=input_ids, attention_mask=mask_arg, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        emb = pool(hidden, attention_mask, self.contract.pooling)
        if self.contract.normalize:
            emb = F.normalize(emb.float(), dim=-1)
        return emb

    @torch.no_grad()
    def encode_texts(
        self,
        tokenizer: Any,
        texts: list[str],
        kind: str,
        batch_size: int = 32,
        formatted: bool = False,
    ) -> torch.Tensor:
        """Encode texts in eval mode; returns float32 on CPU.

        Prefixes are applied here unless ``formatted`` says they already are.
        """
        if formatted:
            fmt = str
        else:
            fmt = self.contract.format_query if kind == "query" else self.contract.format_passage
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        outs = []
        for i in range(0, len(texts), batch_size):
            batch = self.contract.tokenize(
                tokenizer, [fmt(t) for t in texts[i : i + batch_size]], kind
            )  # type: ignore[arg-type]
            outs.append(
                self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                .float()
                .cpu()
            )
        self.train(was_training)
        return torch.cat(outs) if outs else torch.empty(0, self.hidden_size)


def ffn_down_projections(model: nn.Module) -> set[str]:
    """Names of the ``nn.Linear`` layers that read the widest input: the FFN
    down-projections (BERT ``output.dense``, Llama ``down_proj``)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    widths = {m.in_features for m in linears.values()}
    if len(widths) < 2:
        return set()
    widest = max(widths)
    return {n for n, m in linears.items() if m.in_features == widest}


def quantize_int8(
    model: nn.Module, per_channel: bool = True, ffn_down_fp32: bool = False
) -> nn.Module:
    """Dynamic int8 quantisation of ``nn.Linear`` layers (CPU inference only).

    Activations get one scale per tensor, computed per call. Per-channel
    weight scales keep embeddings closer to fp32 than one scale per weight
    tensor. Most of the per-tensor drift comes from the FFN down-projections,
    whose post-GELU input has outlier channels; ``ffn_down_fp32`` leaves those
    in fp32. Mean cosine to fp32 on all-MiniLM-L6-v2, 320 SciFact passages:
    per-tensor 0.924, per-channel 0.983, per-tensor with fp32 FFN-down 0.991.
    In-process on 2 AVX2 cores all three ran at about 1.27x fp32 (runs vary
    by ~10%); end-to-end numbers are in benchmarks/results/.
    """
    from torch.ao import quantization as q

    qconfig = q.per_channel_dynamic_qconfig if per_channel else q.default_dynamic_qconfig
    keep = ffn_down_projections(model) if ffn_down_fp32 else set()
    spec = {
        n: qconfig for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in keep
    }
    return q.quantize_dynamic(model, spec, dtype=torch.qint8)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def build_backbone(
    path: str,
    *,
    random_init: bool = False,
    lora: Any | None = None,
    gradient_checkpointing: bool = False,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load an ``AutoModel`` (or build it from config) and apply LoRA if asked."""
    from transformers import AutoConfig, AutoModel

    if random_init:
        config = AutoConfig.from_pretrained(path)
        backbone = (
            AutoModel.from_config(config, dtype=dtype) if dtype else AutoModel.from_config(config)
        )
    else:
        backbone = (
            AutoModel.from_pretrained(path, dtype=dtype)
            if dtype
            else AutoModel.from_pretrained(path)
        )
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
    return backbone


# -- export / load ------------------------------------------------------------------


def _write_sentence_transformers_files(out: Path, contract: EncodingContract, dim: int) -> None:
    modes = {
        "cls": "pooling_mode_cls_token",
        "mean": "pooling_mode_mean_tokens",
        "last": "pooling_mode_lasttoken",
    }
    pooling = {k: False for k in modes.values()} | {modes[contract.pooling]: True}
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": dim, **pooling}, indent=2)
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if contract.normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
        (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": contract.passage_max_len, "do_lower_case": False}, indent=2)
    )
    prompts = {"query": contract.format_query(""), "document": contract.passage_prefix}
    (out / "config_sentence_transformers.json").write_text(
        json.dumps(
            {
                "prompts": prompts,
                "default_prompt_name": None,
                "similarity_fn_name": "cosine" if contract.normalize else "dot",
            },
            indent=2,
        )
    )


def export_embedder(
    backbone: nn.Module,
    tokenizer: Any,
    contract: EncodingContract,
    out_dir: str | Path,
    *,
    merge: bool = True,
) -> Path:
    """Write a reloadable model folder: weights (merged or adapter), tokenizer, contract.

    ``backbone`` must hold full (not ZeRO-partitioned) weights; it is not modified.
    """
    import copy

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = _base_model(backbone)
    dim = int(base.config.hidden_size)
    contract = EncodingContract.from_dict({**contract.to_dict(), "dim": dim})
    is_peft = base is not backbone
    if is_peft and not merge:
        backbone.save_pretrained(out)  # adapter_config.json + adapter weights
        contract.base_model = contract.base_model or resolve_model(contract.model)
    else:
        plain = copy.deepcopy(backbone).merge_and_unload() if is_peft else backbone
        plain.save_pretrained(out)
        contract.base_model = None
        decoder = is_decoder(plain.config)
        if not contract.append_eos and not (contract.bidirectional and decoder):
            _write_sentence_transformers_files(out, contract, dim)
    tokenizer.save_pretrained(out)
    contract.save(out)
    return out


def weights_fingerprint(path: str | Path) -> str:
    """A cheap content hash of a model folder's weights (size + head + tail of each file)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(
        p
        for p in Path(path).iterdir()
        if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file()
    )
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def resolve_contract(
    model_spec: str, configured: EncodingContract | None
) -> tuple[str, EncodingContract]:
    """(local path, contract) for a model: its saved contract if it is a raysys
    export, else the configured one (a plain Hugging Face model)."""
    path = resolve_model(model_spec)
    if EncodingContract.exists(path):
        contract = EncodingContract.load(path)
    elif configured is not None:
        contract = EncodingContract.from_dict(
            {**configured.to_dict(), "model": configured.model or model_spec}
        )
    else:
        raise ValueError(f"{model_spec}: no raysys_contract.json there and no contract configured")
    weights_dir = resolve_model(contract.base_model) if contract.base_model else path
    if contract.dim is None:
        from transformers import AutoConfig

        contract.dim = int(AutoConfig.from_pretrained(weights_dir).hidden_size)
    contract.fingerprint = weights_fingerprint(path) + (
        "+" + weights_fingerprint(weights_dir) if contract.base_model else ""
    )
    return path, contract


def load_embedder(
    path: str,
    device: str | torch.device = "cpu",
    contract: EncodingContract | None = None,
) -> tuple[Embedder, Any]:
    """Load a model for encoding: a raysys export (merged or adapter, with its
    contract) or a plain Hugging Face model with ``contract`` given."""
    from transformers import AutoModel

    path, contract = resolve_contract(path, contract)
    if contract.base_model:
        from peft import PeftModel

        base = AutoModel.from_pretrained(resolve_model(contract.base_model))
        backbone = PeftModel.from_pretrained(base, path).merge_and_unload()
    else:
        backbone = AutoModel.from_pretrained(path)
    model = Embedder(backbone, contract).to(device).eval()
    return model, load_tokenizer(path)
