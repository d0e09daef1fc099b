"""Hard-negative mining: retrieve for the training queries, drop the positives,
sample negatives from a rank range, write training groups.

The output is raysys groups JSONL (``query_id``, ``query``, ``positives``,
``negatives``; passages as corpus ids), read back with ``data.groups=FILE
data.corpus=CORPUS``. Sampling is seeded per query, so a rerun gives the same
file. Optionally a reranker filters likely false negatives: a candidate scored
within ``margin`` of the query's lowest-scored positive (or above it) is dropped.
The reranker scores on the rerank stage's actor pool (``reranker.pool``: its
actors, batch sizes and ``use_gpu``), every query's pairs in one pass.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raysys.data.readers import Report
from raysys.errors import UserError
from raysys.search.runfile import Run

log = logging.getLogger(__name__)


@dataclass
class MineSpec:
    """Which retrieved candidates become negatives."""

    rank_from: int = 10  # 0-based, inclusive; ranks counted after dropping positives
    rank_to: int = 100  # exclusive
    n: int = 30
    seed: int = 42
    margin: float | None = None  # reranker filter; None = off
    report: Report = field(default_factory=Report)


def _rng(seed: int, qid: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(qid.encode())])


def sample_negatives(qid: str, ranked: list[str], positives: set[str], spec: MineSpec) -> list[str]:
    """Negatives for one query: ranked candidates minus positives, rank range, seeded sample."""
    cands = [d for d in ranked if d not in positives]
    window = cands[spec.rank_from : spec.rank_to]
    if len(window) < spec.n:
        spec.report.skip(
            f"queries with fewer than {spec.n} candidates in ranks "
            f"{spec.rank_from}-{spec.rank_to} (all kept)",
            qid,
        )
        return window
    pick = np.sort(_rng(spec.seed, qid).choice(len(window), size=spec.n, replace=False))
    return [window[int(i)] for i in pick]


def filter_false_negatives(
    pos_scores: list[float], cand: list[str], cand_scores: list[float], margin: float
) -> tuple[list[str], int]:
    """Drop candidates the reranker scores at or above ``min(pos_scores) - margin``."""
    bar = min(pos_scores) - margin
    kept = [d for d, s in zip(cand, cand_scores, strict=True) if s < bar]
    return kept, len(cand) - len(kept)


def mine_groups(
    run: Run,
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    spec: MineSpec,
    reranker: str | None = None,
    corpus: pa.Table | None = None,
    pool: Any = None,
) -> list[dict[str, Any]]:
    """Build groups from a run. ``reranker`` (a reranker export's local path),
    with ``corpus`` (a corpus table: id, title, text) and ``pool`` (a
    :class:`raysys.config.PoolConfig`), enables the false-negative filter
    (:func:`rerank_filter`)."""
    groups = []
    for qid in sorted(qrels):
        pos = sorted(d for d, r in qrels[qid].items() if r > 0)
        if qid not in queries:
            spec.report.skip("qrels queries missing from the queries", qid)
            continue
        if not pos:
            spec.report.skip("queries without a positive", qid)
            continue
        hits = run.get(qid, {})
        if not hits:
            spec.report.skip("queries with no retrieved candidates", qid)
            continue
        ranked = sorted(hits, key=lambda d: (-hits[d], d))
        negs = sample_negatives(qid, ranked, set(pos), spec)
        groups.append({"query_id": qid, "query": queries[qid], "positives": pos, "negatives": negs})
    if reranker is not None and spec.margin is not None:
        if corpus is None or pool is None:
            raise ValueError("the reranker filter needs the corpus table and the pool settings")
        rerank_filter(groups, corpus, reranker, pool, spec)
    return groups


def rerank_filter(
    groups: list[dict[str, Any]], corpus: pa.Table, reranker: str, pool: Any, spec: MineSpec
) -> int:
    """Drop likely false negatives from ``groups`` in place; returns how many.

    Every (query, positive) and (query, negative) pair of every group is scored
    at once by the rerank stage (:func:`raysys.search.rerank.score_pairs_ray`:
    its actor pool, on the GPU when ``pool.use_gpu``). Passages missing from
    the corpus are counted and left unscored: such a negative is kept, and a
    group with no scored positive keeps all its negatives.
    """
    from raysys.search import rerank

    assert spec.margin is not None, "the reranker filter needs a margin"
    cands = {
        g["query_id"]: dict.fromkeys(g["positives"] + g["negatives"], 0.0)
        for g in groups
        if g["negatives"]
    }
    if not cands:
        return 0
    texts = {g["query_id"]: g["query"] for g in groups}
    depth = max(len(c) for c in cands.values())
    pairs, _ = rerank.candidate_pairs(cands, texts, corpus, depth, spec.report)
    if not pairs.num_rows:
        return 0
    scored = rerank.score_pairs_ray(pairs, reranker, pool)
    score = {
        (q, d): float(x)
        for q, d, x in zip(
            scored.column("qid").to_pylist(),
            scored.column("docid").to_pylist(),
            scored.column("score").to_pylist(),
            strict=True,
        )
    }
    if len(score) != pairs.num_rows:
        raise RuntimeError(f"mine: the reranker scored {len(score)} of {pairs.num_rows} pairs")
    dropped = 0
    for g in groups:
        qid = g["query_id"]
        pos_scores = [score[qid, d] for d in g["positives"] if (qid, d) in score]
        if not g["negatives"] or not pos_scores:
            continue
        scored_negs = [d for d in g["negatives"] if (qid, d) in score]
        kept, n_drop = filter_false_negatives(
            pos_scores, scored_negs, [score[qid, d] for d in scored_negs], spec.margin
        )
        keep = set(kept)
        g["negatives"] = [d for d in g["negatives"] if d in keep or (qid, d) not in score]
        dropped += n_drop
    if dropped:
        spec.report.counts["negatives dropped by the reranker filter"] += dropped
    return dropped


def write_groups(groups: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for g in groups:
            f.write(json.dumps(g) + "\n")
    tmp.replace(path)
    return path


def spec_from_config(m: Any) -> MineSpec:
    """A :class:`MineSpec` from a :class:`raysys.config.MineConfig`."""
    return MineSpec(rank_from=m.rank_from, rank_to=m.rank_to, n=m.n, seed=m.seed, margin=m.margin)


def mine(cfg: Any, out: str | Path) -> dict[str, Any]:
    """Mine groups for ``cfg.data``'s training split with ``cfg.model`` as ``cfg.mine`` says.

    Uses ``cfg.mine.index`` when set, else encodes the corpus under
    ``<out>.work/`` and searches it exactly, shard by shard in Ray tasks
    (``cfg.mine.factory: exact``, the default), or through an index built
    with that FAISS factory string.
    Returns a summary (also written to ``<out>.summary.json``).
    """
    from raysys.data.readers import BeirFolder, read_corpus
    from raysys.search.retrieve import QueryEncoder
    from raysys.stages import encode_stage, exact_search_stage, index_stage, search_stage

    m = cfg.mine
    spec = spec_from_config(m)
    if not cfg.data.path:
        raise UserError("data: set data=PATH to a BEIR folder (queries, qrels, corpus)")
    beir = BeirFolder(Path(cfg.data.path))
    out = Path(out)
    contract = cfg.encoding_contract()
    index_dir = m.index
    corpus_skipped: dict[str, int] = {}
    work = out.parent / f"{out.name}.work"
    if index_dir is None:
        enc = encode_stage(cfg, beir.corpus_path, work / "encode", cfg.model.path, contract)
        corpus_skipped = enc["corpus"].get("skipped") or {}
        if m.factory != "exact":
            icfg = dataclasses.replace(cfg.index, factory=m.factory)
            index_stage(dataclasses.replace(cfg, index=icfg), work / "encode", work / "index")
            index_dir = str(work / "index")
    qrels = beir.qrels(cfg.data.train_split)
    queries = beir.queries(spec.report)
    wanted = {q: queries[q] for q in qrels if q in queries}
    depth = spec.rank_to + max((len(v) for v in qrels.values()), default=0)
    # Leaving the block, a GPU query encoder gives its GPU back for the reranker.
    with QueryEncoder(cfg.model.path, contract, cfg.encode.pool) as encoder:
        if index_dir is None:
            run = exact_search_stage(cfg, work / "encode", wanted, encoder, topk=depth)
        else:
            run = search_stage(cfg, index_dir, wanted, encoder, topk=depth).run
    reranker, corpus = None, None
    if m.reranker is not None and spec.margin is not None:
        from raysys.models.hub import resolve_model

        reranker = resolve_model(m.reranker)
        corpus = read_corpus(beir.corpus_path, spec.report, on_bad_line=cfg.data.on_bad_line)
    groups = mine_groups(run, queries, qrels, spec, reranker, corpus, cfg.reranker.pool)
    write_groups(groups, out)
    n_neg = [len(g["negatives"]) for g in groups]
    summary = {
        "groups": len(groups),
        "negatives_per_group": {"min": min(n_neg, default=0), "max": max(n_neg, default=0)},
        "ranks": [spec.rank_from, spec.rank_to],
        "n": spec.n,
        "seed": spec.seed,
        "index": str(index_dir) if index_dir else f"exact search over {work / 'encode'}",
        "reranker_filter": (
            {
                "model": m.reranker,
                "margin": spec.margin,
                "pool": dataclasses.asdict(cfg.reranker.pool),
            }
            if reranker
            else None
        ),
        "corpus_skipped": corpus_skipped,
        **spec.report.to_dict(),
    }
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    return summary
