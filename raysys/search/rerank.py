"""The rerank stage: score a first-stage run's top-k with a cross-encoder on a
Ray Data actor pool, and write the reranked run.

Every top-k candidate comes back exactly once (checked), ordered by reranker
score, ties broken by doc id. With ``keep_tail`` the candidates below top-k
follow in their first-stage order with scores below the reranked ones, so the
run keeps its depth (Recall@1000 still describes the first stage). Queries
with no candidates are counted; top-k candidates missing from the corpus are
counted and placed first in the tail (kept, never silently dropped).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from raysys.console import Progress
from raysys.contract import RerankContract
from raysys.data.readers import Report
from raysys.models.backbone import cached_tokenizer
from raysys.runtime import ensure_ray, set_actor_threads, surface_user_errors, tokenize_and_map
from raysys.search.fusion import interpolate
from raysys.search.runfile import Run

log = logging.getLogger(__name__)


def candidate_pairs(
    run: Run,
    queries: dict[str, str],
    corpus: pa.Table,
    topk: int,
    report: Report,
) -> tuple[pa.Table, dict[str, tuple[list[str], list[str]]]]:
    """(pairs: qid, docid, query, title, text; tails: qid -> (unscored top-k ids, ids below top-k))."""
    wanted: set[str] = set()
    ranked: dict[str, list[str]] = {}
    for qid in sorted(run):
        hits = run[qid]
        if not hits:
            report.skip("queries with no candidates", qid)
            continue
        if qid not in queries:
            report.skip("run queries without query text", qid)
            continue
        ranked[qid] = sorted(hits, key=lambda d: (-hits[d], d))
        wanted.update(ranked[qid][:topk])
    ids = corpus.column("id")
    sub = corpus.filter(pc.is_in(ids, pa.array(sorted(wanted), ids.type)))
    row = {d: i for i, d in enumerate(sub.column("id").to_pylist())}
    titles, texts = sub.column("title").to_pylist(), sub.column("text").to_pylist()
    cols: dict[str, list[str]] = {k: [] for k in ("qid", "docid", "query", "title", "text")}
    tails: dict[str, tuple[list[str], list[str]]] = {}
    for qid, docs in ranked.items():
        unscored = []
        for d in docs[:topk]:
            if d not in row:
                report.skip("candidates missing from the corpus (kept unscored)", f"{qid}/{d}")
                unscored.append(d)
                continue
            cols["qid"].append(qid)
            cols["docid"].append(d)
            cols["query"].append(queries[qid])
            cols["title"].append(titles[row[d]])
            cols["text"].append(texts[row[d]])
        tails[qid] = (unscored, docs[topk:])
    return pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()}), tails


def tokenize_pairs(batch: pa.Table, model_path: str, contract: dict[str, Any]) -> pa.Table:
    """Ray Data CPU task: format and tokenize pairs."""
    c = RerankContract.from_dict(contract)
    pairs = [
        c.format_pair(q, ti, tx)
        for q, ti, tx in zip(
            batch.column("query").to_pylist(),
            batch.column("title").to_pylist(),
            batch.column("text").to_pylist(),
            strict=True,
        )
    ]
    ids = c.token_ids(cached_tokenizer(model_path), pairs)
    return pa.table(
        {
            "qid": batch.column("qid"),
            "docid": batch.column("docid"),
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
        }
    )


class RerankActor:
    """Ray Data actor: holds the reranker, scores tokenized pairs."""

    def __init__(self, model_path: str, opts: dict[str, Any]) -> None:
        from raysys.models.reranker import Scorer
        from raysys.runtime import check_worker_device

        set_actor_threads(opts)
        check_worker_device(bool(opts.get("use_gpu")), "rerank actor")
        self.scorer = Scorer(model_path, "cuda" if opts.get("use_gpu") else "cpu", opts)

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores = self.scorer.score_ids(batch.column("input_ids").to_pylist())
        return pa.table(
            {
                "qid": batch.column("qid"),
                "docid": batch.column("docid"),
                "score": pa.array(scores, pa.float64()),
            }
        )


def score_pairs_ray(pairs: pa.Table, model_path: str, pool: Any) -> pa.Table:
    """Score every pair on an actor pool (``pool``: a :class:`raysys.config.PoolConfig`);
    returns qid, docid, score (any order)."""
    import ray

    ensure_ray()
    contract = RerankContract.load(model_path).to_dict()
    # Several blocks, so the pairs are tokenized by several tasks in parallel
    # (one table is one block: one task would tokenize them all).
    step = max(1, pool.batch_size * 4)
    blocks = [pairs.slice(i, step) for i in range(0, pairs.num_rows, step)] or [pairs]
    ds = tokenize_and_map(
        ray.data.from_arrow(blocks),
        tokenize=tokenize_pairs,
        tokenize_kwargs={"model_path": model_path, "contract": contract},
        actor=RerankActor,
        actor_kwargs={"model_path": model_path},
        pool=pool,
        what="rerank (reranker.pool.use_gpu)",
    )
    parts = []
    bar = Progress("rerank", pairs.num_rows, "pairs")
    with surface_user_errors():
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            parts.append(batch)
            bar.update(batch.num_rows)
    bar.close()
    if not parts:
        return pa.table({"qid": [], "docid": [], "score": pa.array([], pa.float64())})
    return pa.concat_tables(parts)


def assemble_run(
    scored: pa.Table,
    pairs: pa.Table,
    tails: dict[str, tuple[list[str], list[str]]],
    keep_tail: bool,
    first: Run | None = None,
    weight: float = 1.0,
) -> Run:
    """The reranked run; checks every pair came back exactly once.

    With ``weight < 1`` a candidate's score is ``weight * rerank + (1 - weight)
    * first_stage``, both min-max normalised over the query's scored
    candidates (score interpolation; ``first`` is the first-stage run).
    """
    got = list(
        zip(scored.column("qid").to_pylist(), scored.column("docid").to_pylist(), strict=True)
    )
    want = list(
        zip(pairs.column("qid").to_pylist(), pairs.column("docid").to_pylist(), strict=True)
    )
    if len(got) != len(set(got)) or set(got) != set(want):
        raise RuntimeError(
            f"rerank: scored {len(got)} pairs ({len(set(got))} distinct) for "
            f"{len(want)} candidates; the stage lost or duplicated some"
        )
    run: Run = {}
    for (qid, did), s in zip(got, scored.column("score").to_pylist(), strict=True):
        run.setdefault(qid, {})[did] = float(s)
    if weight < 1.0:
        if first is None:
            raise ValueError("score interpolation needs the first-stage run")
        run = {qid: interpolate(hits, first[qid], weight) for qid, hits in run.items()}
    for qid, (unscored, below) in tails.items():
        hits = run.setdefault(qid, {})
        tail = unscored + (below if keep_tail else [])
        if tail:
            floor = min(hits.values(), default=0.0)
            for i, did in enumerate(tail, start=1):
                if did not in hits:
                    hits[did] = floor - i
    return run


class Reranked(NamedTuple):
    """The final run, what was skipped, and (with ``weight < 1``) the reranker-only run."""

    run: Run
    report: Report
    reranker_only: Run | None
    pairs: int = 0


def rerank_run(
    run: Run,
    queries: dict[str, str],
    corpus: pa.Table,
    model_path: str,
    rcfg: Any,
    report: Report | None = None,
) -> Reranked:
    """Rerank ``run``'s top ``rcfg.topk`` per query; see the module docstring."""
    from raysys.models.hub import resolve_model

    report = report if report is not None else Report()
    model_path = resolve_model(model_path)
    pairs, tails = candidate_pairs(run, queries, corpus, rcfg.topk, report)
    log.info("reranking %d pairs for %d queries (top %d)", pairs.num_rows, len(tails), rcfg.topk)
    scored = score_pairs_ray(pairs, model_path, rcfg.pool)
    alone = assemble_run(scored, pairs, tails, rcfg.keep_tail)
    out = alone
    if rcfg.weight < 1.0:
        out = assemble_run(scored, pairs, tails, rcfg.keep_tail, first=run, weight=rcfg.weight)
    if report.counts:
        log.warning("rerank: %s", report.summary())
    return Reranked(out, report, alone if out is not alone else None, pairs.num_rows)
