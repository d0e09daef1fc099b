"""Hard-negative mining: retrieve for the training queries, drop the positives,
sample negatives from a rank range, write training groups.

The output is raysys groups JSONL (``query_id``, ``query``, ``positives``,
``negatives``; passages as corpus ids), read back with ``data.groups=FILE
data.corpus=CORPUS``. Sampling is seeded per query, so a rerun gives the same
file. Optionally a reranker filters likely false negatives: a candidate scored
within ``margin`` of the query's lowest-scored positive (or above it) is dropped.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raysys.data.readers import Report
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
    reranker: Any = None,
    corpus: dict[str, tuple[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Build groups from a run. ``reranker`` (with ``corpus``: id -> (title, text))
    enables the false-negative filter; it is a :class:`raysys.models.reranker.Scorer`."""
    groups = []
    dropped = 0
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
        if reranker is not None and spec.margin is not None and negs:
            assert corpus is not None, "the reranker filter needs the corpus texts"
            docs = [corpus[d] for d in pos + negs]
            scores = reranker.score([queries[qid]] * len(docs), docs)
            negs, n_drop = filter_false_negatives(
                scores[: len(pos)], negs, scores[len(pos) :], spec.margin
            )
            dropped += n_drop
        groups.append({"query_id": qid, "query": queries[qid], "positives": pos, "negatives": negs})
    if dropped:
        spec.report.counts["negatives dropped by the reranker filter"] += dropped
    return groups


def write_groups(groups: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for g in groups:
            f.write(json.dumps(g) + "\n")
    tmp.replace(path)
    return path


def mine(
    cfg: Any,
    out: str | Path,
    spec: MineSpec,
    *,
    index_dir: str | Path | None = None,
    reranker: str | None = None,
) -> dict[str, Any]:
    """Mine groups for ``cfg.data``'s training split with ``cfg.model``.

    Uses ``index_dir`` when given, else encodes the corpus and builds an exact
    (Flat) index under ``<out>.work/``. Returns a summary (also written to
    ``<out>.summary.json``).
    """
    from raysys.data.readers import BeirFolder
    from raysys.search.retrieve import Searcher

    if not cfg.data.path:
        raise ValueError("data: set data=PATH to a BEIR folder (queries, qrels, corpus)")
    beir = BeirFolder(Path(cfg.data.path))
    out = Path(out)
    contract = cfg.encoding_contract()
    if index_dir is None:
        from raysys.index.build import build_index
        from raysys.index.encode import EMB_DIR, encode_corpus

        work = out.parent / f"{out.name}.work"
        encode_corpus(beir.corpus_path, work / "encode", cfg.model.path, contract, cfg.encode)
        build_index(work / "encode" / EMB_DIR, work / "index", "Flat")
        index_dir = work / "index"
    qrels = beir.qrels(cfg.data.train_split)
    queries = beir.queries()
    searcher = Searcher(index_dir, cfg.model.path, contract)
    qids = sorted(q for q in qrels if q in queries)
    run = searcher.search(
        qids,
        searcher.encode([queries[q] for q in qids], cfg.search.batch_size),
        topk=spec.rank_to + max((len(v) for v in qrels.values()), default=0),
        nprobe=cfg.search.nprobe,
        drop_self_hits=cfg.search.drop_self_hits,
    )
    scorer, corpus = None, None
    if reranker is not None and spec.margin is not None:
        from raysys.models.reranker import Scorer

        scorer = Scorer(reranker)
        table = beir.corpus()
        corpus = dict(
            zip(
                table.column("id").to_pylist(),
                zip(
                    table.column("title").to_pylist(), table.column("text").to_pylist(), strict=True
                ),
                strict=True,
            )
        )
    groups = mine_groups(run, queries, qrels, spec, scorer, corpus)
    write_groups(groups, out)
    n_neg = [len(g["negatives"]) for g in groups]
    summary = {
        "groups": len(groups),
        "negatives_per_group": {"min": min(n_neg, default=0), "max": max(n_neg, default=0)},
        "ranks": [spec.rank_from, spec.rank_to],
        "n": spec.n,
        "seed": spec.seed,
        "index": str(index_dir),
        "reranker_filter": {"model": reranker, "margin": spec.margin} if scorer else None,
        **spec.report.to_dict(),
    }
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    return summary
