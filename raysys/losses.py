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


def gather_batch(
    tensors: list[torch.Tensor],
    passage_ids: list[str] | None = None,
    query_positive_ids: list[set[str]] | None = None,
) -> tuple[list[torch.Tensor], list[str] | None, list[set[str]] | None, float]:
    """Every worker's copies of ``tensors`` (this rank's keep their gradient),
    the gathered ids, and the scale (world size) that makes the averaged
    gradients exact. Tensors must have the same shape on every rank."""
    _, world = _world()
    if world == 1:
        return tensors, passage_ids, query_positive_ids, 1.0
    out = [gather_with_local_grad(t) for t in tensors]
    if passage_ids is not None and query_positive_ids is not None:
        passage_ids = gather_objects(list(passage_ids))
        query_positive_ids = gather_objects(list(query_positive_ids))
    return out, passage_ids, query_positive_ids, float(world)


def group_scores(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(B, G)``: each query's scores over its own group, from ``(B, B * G)``."""
    bq = scores.shape[0]
    cols = torch.arange(bq, device=scores.device)[:, None] * group_size + torch.arange(
        group_size, device=scores.device
    )
    return scores.gather(1, cols)


def contrastive_loss(
    scores: torch.Tensor,
    *,
    group_size: int,
    in_batch: bool = True,
    passage_ids: list[str] | None = None,
    query_positive_ids: list[set[str]] | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``scores`` ``(B, B * G)`` (already divided by the
    temperature) towards each query's positive (column ``i * G``): over the
    whole row (in-batch negatives) or over the query's own group only.

    ``passage_ids`` / ``query_positive_ids`` enable false-negative masking: a
    passage that is a known positive of the query, other than the target
    itself, is removed from that query's softmax.
    """
    logits, target = contrastive_logits(
        scores,
        group_size=group_size,
        in_batch=in_batch,
        passage_ids=passage_ids,
        query_positive_ids=query_positive_ids,
    )
    return F.cross_entropy(logits, target)


def contrastive_logits(
    scores: torch.Tensor,
    *,
    group_size: int,
    in_batch: bool = True,
    passage_ids: list[str] | None = None,
    query_positive_ids: list[set[str]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits :func:`contrastive_loss` takes the cross-entropy of (false
    negatives masked; the own group only without ``in_batch``) and the
    target column of each row."""
    bq = scores.shape[0]
    n_p = scores.shape[1]
    if n_p != bq * group_size:
        raise ValueError(f"expected {bq * group_size} passages for {bq} queries, got {n_p}")
    scores = scores.float()
    target = torch.arange(bq, device=scores.device) * group_size
    if passage_ids is not None and query_positive_ids is not None:
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for i, positives in enumerate(query_positive_ids):
            if not positives:
                continue
            cols = [j for j, pid in enumerate(passage_ids) if pid in positives]
            if cols:
                mask[i, cols] = True
        mask[torch.arange(bq), target] = False
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    if not in_batch:
        scores = group_scores(scores, group_size)
        target = torch.zeros(bq, dtype=torch.long, device=scores.device)
    return scores, target


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``-sum(softmax(teacher) * log_softmax(student))`` per row, averaged:
    the distillation loss (KL divergence up to the teacher's entropy, which
    has no gradient). Both are logits (scores over temperatures)."""
    p = torch.softmax(teacher.detach().float(), dim=-1)
    logp = torch.log_softmax(student.float(), dim=-1)
    # Masked entries (a finfo.min logit) have p = 0: they contribute nothing.
    return -torch.where(p > 0, p * logp, torch.zeros_like(logp)).sum(-1).mean()


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
    every other passage in the global batch (see :func:`contrastive_loss`)."""
    bq = q.shape[0]
    if p.shape[0] != bq * group_size:
        raise ValueError(f"expected {bq * group_size} passages for {bq} queries, got {p.shape[0]}")
    q, p = q.float(), p.float()
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
    scale = 1.0
    if gather:
        (q, p), passage_ids, query_positive_ids, scale = gather_batch(
            [q, p], passage_ids, query_positive_ids
        )
    loss = contrastive_loss(
        q @ p.T / temperature,
        group_size=group_size,
        passage_ids=passage_ids,
        query_positive_ids=query_positive_ids,
    )
    return loss * scale


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
