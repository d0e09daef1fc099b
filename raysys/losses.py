"""Contrastive losses for bi-encoders.

Layout of a batch: ``q`` is ``(B, d)``; ``p`` is ``(B * G, d)`` where each query
owns ``G`` consecutive passages, its positive first, then its hard negatives.

With ``gather=True`` queries and passages are all-gathered from every worker.
The gathered copies carry no gradient; each rank puts its own local tensors
back in its slice, computes the loss over the *global* batch and scales it by
the world size. After the usual gradient averaging over ranks (DDP or
DeepSpeed), parameter gradients equal those of one process over the
concatenated batch exactly (see tests/test_gather_gradients.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` along dim 0; only this rank's slice keeps its gradient."""
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


def gather_objects(obj: list) -> list:
    """All-gather a small picklable list from every rank, concatenated in rank order."""
    _, world = _world()
    if world == 1:
        return list(obj)
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return [x for part in out for x in part]


def info_nce(
    q: torch.Tensor,
    p: torch.Tensor,
    *,
    group_size: int,
    temperature: float,
    in_batch: bool = True,
    gather: bool = True,
    passage_ids: list[str] | None = None,
    query_positive_ids: list[set[str]] | None = None,
) -> torch.Tensor:
    """InfoNCE over each query's positive, its hard negatives and (optionally)
    every other passage in the global batch.

    ``passage_ids`` / ``query_positive_ids`` enable false-negative masking: a
    passage that is a known positive of the query, other than the target itself,
    is removed from that query's softmax.
    """
    bq = q.shape[0]
    if p.shape[0] != bq * group_size:
        raise ValueError(f"expected {bq * group_size} passages for {bq} queries, got {p.shape[0]}")
    q = q.float()
    p = p.float()
    if not in_batch:
        # Only the query's own group: (B, G) scores, the positive at index 0.
        scores = torch.einsum("bd,bgd->bg", q, p.view(bq, group_size, -1)) / temperature
        if passage_ids is not None and query_positive_ids is not None:
            ids = [passage_ids[i * group_size : (i + 1) * group_size] for i in range(bq)]
            mask = torch.tensor(
                [
                    [j > 0 and pid in query_positive_ids[i] for j, pid in enumerate(row)]
                    for i, row in enumerate(ids)
                ],
                device=scores.device,
            )
            scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        target = torch.zeros(bq, dtype=torch.long, device=q.device)
        return F.cross_entropy(scores, target)

    _, world = _world()
    if gather and world > 1:
        q_all = gather_with_local_grad(q)
        p_all = gather_with_local_grad(p)
        if passage_ids is not None and query_positive_ids is not None:
            passage_ids = gather_objects(list(passage_ids))
            query_positive_ids = gather_objects(list(query_positive_ids))
        scale = float(world)
    else:
        q_all, p_all, scale = q, p, 1.0
    n_q = q_all.shape[0]
    scores = q_all @ p_all.T / temperature
    target = torch.arange(n_q, device=q.device) * group_size
    if passage_ids is not None and query_positive_ids is not None:
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for i, positives in enumerate(query_positive_ids):
            if not positives:
                continue
            cols = [j for j, pid in enumerate(passage_ids) if pid in positives]
            if cols:
                mask[i, cols] = True
        mask[torch.arange(n_q), target] = False
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    return F.cross_entropy(scores, target) * scale


def grouped_ce(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RankLLaMA's loss: softmax cross-entropy over each group of ``group_size``
    pair scores whose first is the positive (no in-batch negatives)."""
    logits = scores.view(-1, group_size).float()
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


def pointwise_bce(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Binary cross-entropy per pair: the first of each group is 1, the rest 0."""
    logits = scores.view(-1, group_size).float()
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(logits, labels)
