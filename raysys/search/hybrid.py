"""Hybrid retrieval over an M3 index (BGE-M3's "all"): candidates from the
dense and the sparse index (``candidates`` each per query, their union), each
scored exactly by every representation the index has (``score_rows``: dense
inner product as the index stores it, sparse term overlap, multi-vector
MaxSim), then fused by :mod:`raysys.search.fusion`: the weighted sum of the
raw scores (BGE-M3's ``1 * dense + 0.3 * sparse + 1 * multivector``) or RRF.

Every index of one embeddings folder numbers its rows the same way (global
row numbers in shard order), so a row means the same passage in each.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raysys.search import fusion

BLOCK = 32  # queries whose candidates are gathered at once


def hybrid_search(
    indexes: dict[str, Any],
    queries: dict[str, Any],
    k: int,
    *,
    nprobe: int = 0,
    candidates: int = 100,
    weights: dict[str, float] | None = None,
    method: str = "weighted",
    rrf_k: int = 60,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)``, each ``(n_queries, k)`` (a row of -1 is no hit)."""
    weights = {"dense": 1.0, "sparse": 0.3, "multivector": 1.0, **(weights or {})}
    heads = [h for h in ("dense", "sparse", "multivector") if h in indexes]
    n = len(queries["dense"])
    out_s = np.full((n, k), -np.inf, np.float32)
    out_r = np.full((n, k), -1, np.int64)
    _, dense_rows = indexes["dense"].search(queries["dense"], candidates, nprobe)
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        sparse_all = indexes["sparse"].scores(queries["sparse"][a:b]) if "sparse" in heads else None
        for i in range(a, b):
            rows = set(int(r) for r in dense_rows[i] if r >= 0)
            if sparse_all is not None:
                s = sparse_all[i - a]
                c = min(candidates, len(s))
                rows |= set(int(r) for r in np.argpartition(-s, c - 1)[:c])
            cand = np.array(sorted(rows), np.int64)
            runs = []
            for h in heads:
                if h == "sparse" and sparse_all is not None:
                    scores = sparse_all[i - a][cand]
                else:
                    scores = indexes[h].score_rows(queries[h][i], cand)
                runs.append({"q": {str(r): float(x) for r, x in zip(cand, scores, strict=True)}})
            w = [weights.get(h, 0.0) for h in heads]
            if method == "rrf":
                fused = fusion.rrf(runs, k=rrf_k, weights=w)["q"]
            else:
                fused = fusion.weighted_sum(runs, w, normalize=False)["q"]
            top = fusion.ranked(fused)[:k]
            out_s[i, : len(top)] = [fused[r] for r in top]
            out_r[i, : len(top)] = [int(r) for r in top]
    return out_s, out_r
