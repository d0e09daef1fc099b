"""The bi-encoder over any Hugging Face ``AutoModel`` (encoders and decoders),
its export and its loading for encoding.

The backbone (LoRA, gradient checkpointing, bidirectional attention) is built
in :mod:`raysys.models.backbone`, pooled by :mod:`raysys.models.pooling`.
Export writes the merged model (or the adapter plus the name of its base), the
tokenizer and the encoding contract; encoders with mean/cls pooling also get
the files sentence-transformers needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raysys.contract import EncodingContract
from raysys.models.backbone import (
    base_model,
    hidden_size,
    is_decoder,
    load_pretrained,
    load_tokenizer,
    make_bidirectional,
    merged,
)
from raysys.models.hub import resolve_model
from raysys.models.pooling import bidirectional_mask, pool


class Embedder(nn.Module):
    """Encode tokenized texts into (optionally normalised) vectors under a contract."""

    def __init__(self, backbone: nn.Module, contract: EncodingContract) -> None:
        super().__init__()
        self.backbone = backbone
        self.contract = contract
        config = base_model(backbone).config
        self.model_type = config.model_type
        self._bidirectional = bool(contract.bidirectional and is_decoder(config))
        if self._bidirectional:
            make_bidirectional(backbone)

    @property
    def hidden_size(self) -> int:
        return hidden_size(self.backbone)

    @property
    def representations(self) -> tuple[str, ...]:
        """The representations this model produces (see :mod:`raysys.representations`)."""
        return ("dense",)

    def represent(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """Every representation of a batch, keyed by representation name."""
        return {"dense": self(input_ids, attention_mask)}

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states ``(B, L, d)`` under the contract."""
        mask_arg: torch.Tensor = attention_mask
        if self._bidirectional:
            dtype = next(p for p in self.backbone.parameters() if p.is_floating_point()).dtype
            mask_arg = bidirectional_mask(attention_mask, dtype)
        out = self.backbone(input_ids=input_ids, attention_mask=mask_arg, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The dense embedding of hidden states (pooling, normalisation)."""
        emb = pool(hidden, attention_mask, self.contract.pooling, self.contract.last_k)
        if self.contract.normalize:
            emb = F.normalize(emb.float(), dim=-1)
        return emb

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.hidden_states(input_ids, attention_mask), attention_mask)

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

    @torch.no_grad()
    def represent_texts(
        self,
        tokenizer: Any,
        texts: list[str],
        kind: str,
        batch_size: int = 32,
        formatted: bool = False,
    ) -> dict[str, Any]:
        """Every representation of ``texts`` (prefixes applied here unless
        ``formatted``), in eval mode, as
        :meth:`raysys.representations.Representation.combine` gives it."""
        from raysys.representations import get_representation

        if formatted:
            fmt = str
        else:
            fmt = self.contract.format_query if kind == "query" else self.contract.format_passage
        reps = [get_representation(r) for r in self.representations]
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        parts: dict[str, list[Any]] = {r.name: [] for r in reps}
        for i in range(0, len(texts), batch_size):
            batch = self.contract.tokenize(
                tokenizer, [fmt(t) for t in texts[i : i + batch_size]], kind
            )  # type: ignore[arg-type]
            out = self.represent(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            for r in reps:
                parts[r.name].append(r.collect(out[r.name], "float32"))
        self.train(was_training)
        return {r.name: r.combine(parts[r.name]) for r in reps}


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = base_model(backbone)
    dim = int(base.config.hidden_size)
    contract = EncodingContract.from_dict({**contract.to_dict(), "dim": dim})
    is_peft = base is not backbone
    if is_peft and not merge:
        backbone.save_pretrained(out)  # adapter_config.json + adapter weights
        contract.base_model = contract.base_model or resolve_model(contract.model)
    else:
        plain = merged(backbone)
        plain.save_pretrained(out)
        contract.base_model = None
        decoder = is_decoder(plain.config)
        # sentence-transformers has prefixes (prompts) but no suffix, EOS,
        # last-k pooling or bidirectional decoders: those exports are raysys-only.
        st_ok = not (contract.query_suffix or contract.passage_suffix or contract.last_k > 1)
        if st_ok and not contract.append_eos and not (contract.bidirectional and decoder):
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
    **load_kwargs: Any,
) -> tuple[Embedder, Any]:
    """Load a model for encoding: a raysys export (merged or adapter, with its
    contract) or a plain Hugging Face model with ``contract`` given.

    ``load_kwargs`` go to ``from_pretrained`` (``dtype``, ``attn_implementation``;
    see :mod:`raysys.models.inference`)."""

    load_kwargs.setdefault("dtype", torch.float32)  # not the checkpoint's (see inference.py)
    path, contract = resolve_contract(path, contract)
    if contract.base_model:
        from peft import PeftModel

        base = load_pretrained(resolve_model(contract.base_model), **load_kwargs)
        backbone = PeftModel.from_pretrained(base, path).merge_and_unload()
    else:
        backbone = load_pretrained(path, **load_kwargs)
    tokenizer = load_tokenizer(path)
    model: Embedder
    if list(contract.representations) != ["dense"]:
        from raysys.models.m3 import M3Embedder

        model = M3Embedder(backbone, contract, list(tokenizer.all_special_ids))
        model.load_heads(path)
    else:
        model = Embedder(backbone, contract)
    return model.to(device).eval(), tokenizer
