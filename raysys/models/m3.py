"""The M3 model (BGE-M3): one backbone, three representations from one pass.

- ``dense``: the pooled, normalised embedding, exactly as :class:`Embedder`;
- ``sparse``: a lexical weight ``ReLU(W_lex h_i)`` per token (``Linear(d, 1)``);
  padding and special tokens weigh nothing;
- ``multivector``: ``normalize(W_mul h_i)`` per token (``Linear(d, d')``),
  every attended token but the first (CLS/BOS).

The export is the plain backbone (it loads in transformers), the tokenizer,
the two heads in ``m3_heads.safetensors`` and a contract whose
``representations`` names the three and whose ``multivector_dim`` is ``d'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raysys.contract import EncodingContract
from raysys.models.embedder import Embedder
from raysys.representations.multivector import TokenVectors
from raysys.representations.sparse import TokenWeights

HEADS_FILE = "m3_heads.safetensors"
REPRESENTATIONS = ["dense", "sparse", "multivector"]


class M3Embedder(Embedder):
    """:class:`Embedder` plus the sparse and multi-vector heads."""

    def __init__(
        self, backbone: nn.Module, contract: EncodingContract, special_ids: list[int]
    ) -> None:
        super().__init__(backbone, contract)
        d = self.hidden_size
        self.sparse_head = nn.Linear(d, 1)
        self.multivector_head = nn.Linear(d, int(contract.multivector_dim or d))
        self.register_buffer(
            "special_ids",
            torch.tensor(sorted(set(special_ids)), dtype=torch.long),
            persistent=False,
        )

    @property
    def representations(self) -> tuple[str, ...]:
        return tuple(self.contract.representations)

    def represent(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        hidden = self.hidden_states(input_ids, attention_mask)
        dense = self.pooled(hidden, attention_mask)
        mask = attention_mask.bool()
        lexical = mask & ~torch.isin(input_ids, self.special_ids.to(input_ids.device))
        weights = F.relu(self.sparse_head(hidden).squeeze(-1)) * lexical.to(hidden.dtype)
        # Every attended token but the first (CLS, or BOS), whichever padding side.
        first = mask.to(torch.int8).argmax(dim=1)
        tokens = mask.clone()
        tokens[torch.arange(len(first), device=first.device), first] = False
        vectors = F.normalize(self.multivector_head(hidden).float(), dim=-1)
        return {
            "dense": dense,
            "sparse": TokenWeights(input_ids, weights),
            "multivector": TokenVectors(vectors, tokens),
        }

    def heads_state(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if k.startswith(("sparse_head.", "multivector_head."))
        }

    def load_heads(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(path) / HEADS_FILE))
        missing = {k for k in self.heads_state()} - set(state)
        if missing:
            raise ValueError(f"{path}/{HEADS_FILE} lacks {sorted(missing)}")
        self.load_state_dict(state, strict=False)


def save_heads(state: dict[str, torch.Tensor], out: str | Path) -> Path:
    """Write the heads' weights (keys ``sparse_head.*``, ``multivector_head.*``)."""
    from safetensors.torch import save_file

    path = Path(out) / HEADS_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
    return path


def is_m3(contract: EncodingContract) -> bool:
    return list(contract.representations) != ["dense"]


def export_m3(
    backbone: nn.Module,
    heads: dict[str, torch.Tensor],
    tokenizer: Any,
    contract: EncodingContract,
    out_dir: str | Path,
    *,
    merge: bool = True,
) -> Path:
    """:func:`raysys.models.embedder.export_embedder` plus the heads."""
    from raysys.models.embedder import export_embedder

    if not is_m3(contract):
        raise ValueError("an M3 export needs a contract with sparse/multivector representations")
    out = export_embedder(backbone, tokenizer, contract, out_dir, merge=merge)
    save_heads(heads, out)
    return out
