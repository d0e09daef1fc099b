"""Pooling token states into one vector, and the bidirectional attention mask."""

from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool token states ``(B, L, H)`` with attention ``mask`` ``(B, L)`` to ``(B, H)``.

    ``cls``: the first token; ``mean``: the mean over attended tokens;
    ``last``: the last attended token (RepLLaMA's EOS), found from the mask so
    it is right under left or right padding alike.
    """
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if how == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask.long()).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}")


def bidirectional_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask ``(B, 1, L, L)``: every token sees every non-pad token."""
    keep = mask[:, None, None, :].to(torch.bool)
    out = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~keep, torch.finfo(dtype).min).expand(-1, 1, mask.shape[1], -1)
