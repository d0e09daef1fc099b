"""Pooling token states into one vector, and the bidirectional attention mask."""

from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str, last_k: int = 1) -> torch.Tensor:
    """Pool token states ``(B, L, H)`` with attention ``mask`` ``(B, L)`` to ``(B, H)``.

    ``cls``: the first token; ``mean``: the mean over attended tokens;
    ``last``: the last attended token (RepLLaMA's EOS), found from the mask so
    it is right under left or right padding alike; with ``last_k > 1`` the
    mean of the last ``last_k`` attended tokens (LLaRA).
    """
    if how == "last" and last_k > 1:
        return last_k_mean(hidden, mask, last_k)
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


def last_k_positions(mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(B, k)`` of each row's last ``k`` attended tokens (oldest first)
    and whether each is attended (a row shorter than ``k``)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * mask.long()).argmax(dim=1)
    idx = last[:, None] - torch.arange(k - 1, -1, -1, device=mask.device)[None, :]
    valid = idx >= 0
    idx = idx.clamp(min=0)
    valid &= mask.gather(1, idx).bool()
    return idx, valid


def last_k_mean(hidden: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """The mean of the states of each row's last ``k`` attended tokens."""
    idx, valid = last_k_positions(mask, k)
    picked = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
    w = valid[..., None].to(hidden.dtype)
    return (picked * w).sum(1) / w.sum(1).clamp(min=1e-9)


def bidirectional_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask ``(B, 1, L, L)``: every token sees every non-pad token."""
    keep = mask[:, None, None, :].to(torch.bool)
    out = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~keep, torch.finfo(dtype).min).expand(-1, 1, mask.shape[1], -1)
