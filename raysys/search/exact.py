"""Exact search without an index: each embedding shard is scored in its own
Ray task (one shard in memory at a time, wherever the task runs) and the
per-shard top k are merged on the driver as they arrive. Memory is one shard
per task plus queries x k on the driver, whatever the corpus size; hard
negative mining uses it so that it never builds a corpus-sized exact index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from raysys.console import Progress
from raysys.index.encode import read_embeddings
from raysys.storage import Location, resolve

QUERY_BLOCK = 4096  # queries scored at once in a task (bounds its score matrix)


def shard_topk(emb_dir: str, shard: str, queries: np.ndarray, k: int) -> tuple[Any, Any]:
    """Ray task: (scores, doc ids), each queries x min(k, rows), best first."""
    from raysys.index.build import exact_topk

    ids, vecs = read_embeddings(emb_dir, shard)
    ids_arr = np.asarray(ids, dtype=object)
    kk = min(k, len(ids))
    out_s = np.empty((len(queries), kk), np.float32)
    out_i = np.empty((len(queries), kk), object)
    for i in range(0, len(queries), QUERY_BLOCK):
        top_s, top = exact_topk(queries[i : i + QUERY_BLOCK], vecs, 0, kk)
        order = np.argsort(-top_s, axis=1)
        out_s[i : i + QUERY_BLOCK] = np.take_along_axis(top_s, order, 1)
        out_i[i : i + QUERY_BLOCK] = ids_arr[np.take_along_axis(top, order, 1)]
    return out_s, out_i


def exact_search(
    emb_dir: str | Path | Location,
    qids: list[str],
    qvecs: np.ndarray,
    *,
    topk: int,
    drop_self_hits: bool = True,
    resources: dict[str, float] | None = None,
) -> dict[str, dict[str, float]]:
    """The exact top ``topk`` of every query over complete embedding shards."""
    import ray

    from raysys.index.manifest import read_manifest
    from raysys.runtime import ensure_ray

    emb = resolve(emb_dir)
    shards = read_manifest(emb)["shards"]
    ensure_ray()
    k = topk + (1 if drop_self_hits else 0)
    q_ref = ray.put(np.ascontiguousarray(qvecs, dtype=np.float32))
    task = ray.remote(num_cpus=1, resources=resources or None)(shard_topk)
    pending = [task.remote(emb.portable, s["name"], q_ref, k) for s in shards]
    best_s = np.full((len(qids), 0), -np.inf, np.float32)
    best_i = np.empty((len(qids), 0), object)
    bar = Progress("exact search", len(pending), "shards")
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        s, i = ray.get(ready[0])
        cand_s, cand_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
        bar.update(1)
    bar.close()
    run: dict[str, dict[str, float]] = {}
    for qid, srow, irow in zip(qids, best_s, best_i, strict=True):
        hits = {str(d): float(x) for x, d in zip(srow, irow, strict=True)}
        if drop_self_hits:
            hits.pop(qid, None)
        run[qid] = dict(sorted(hits.items(), key=lambda kv: -kv[1])[:topk])
    return run
