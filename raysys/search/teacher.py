"""Teacher scores for distillation: a reranker scores every (query, passage) of
training groups on the rerank stage's actor pool, and the groups are written
again with ``pos_scores`` / ``neg_scores`` (one score per positive and per
negative, in order). ``train.loss.distill_weight`` then distils the scores
into the ``retrieve`` or ``m3`` task (:func:`raysys.losses.soft_cross_entropy`).

Passages stay corpus ids where the corpus has them; passages that came inline
(with their text) are written inline again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from raysys.config import ConfigError
from raysys.console import duration, say


def annotate_groups(cfg: Any, groups: str | Path, out: str | Path) -> dict[str, Any]:
    """Score ``groups`` (``data.corpus`` or ``data.path`` resolves their ids)
    with ``cfg.reranker.path`` and write them, with the scores, to ``out``."""
    from raysys.data.groups import read_groups
    from raysys.data.readers import Report, read_corpus
    from raysys.models.hub import resolve_model
    from raysys.search.rerank import score_pairs_ray
    from raysys.stages import corpus_path

    if not cfg.reranker.path:
        raise ConfigError("reranker.path: give the teacher, a reranker export")
    src = cfg.data.corpus or cfg.data.path
    report = Report()
    corpus = None
    if src:
        corpus = read_corpus(corpus_path(src), report, on_bad_line=cfg.data.on_bad_line)
    n_base = 0 if corpus is None else corpus.num_rows
    ts = read_groups(
        groups, corpus, on_bad_line=cfg.data.on_bad_line, max_queries=cfg.data.max_queries,
        report=report,
    )  # fmt: skip
    rows = [list(dict.fromkeys(ts.positives[i] + ts.negatives[i])) for i in range(len(ts))]
    flat = [(i, r) for i, rr in enumerate(rows) for r in rr]
    ids, titles, texts = ts.texts([r for _, r in flat])
    pairs = pa.table(
        {
            "qid": pa.array([str(i) for i, _ in flat], pa.string()),
            "docid": pa.array([str(r) for _, r in flat], pa.string()),
            "query": pa.array([ts.queries[i] for i, _ in flat], pa.string()),
            "title": pa.array(titles, pa.string()),
            "text": pa.array(texts, pa.string()),
        }
    )
    t0 = time.perf_counter()
    scored = score_pairs_ray(pairs, resolve_model(cfg.reranker.path), cfg.reranker.pool)
    seconds = time.perf_counter() - t0
    score = {
        (int(q), int(d)): float(s)
        for q, d, s in zip(
            scored.column("qid").to_pylist(),
            scored.column("docid").to_pylist(),
            scored.column("score").to_pylist(),
            strict=True,
        )
    }
    if len(score) != len(flat):
        raise RuntimeError(f"teacher: scored {len(score)} of {len(flat)} pairs")
    row_of = {
        r: (pid, ti, tx) for (_, r), pid, ti, tx in zip(flat, ids, titles, texts, strict=True)
    }

    def passage(r: int) -> Any:
        pid, ti, tx = row_of[r]
        return pid if r < n_base else {"id": pid, "title": ti, "text": tx}

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for i in range(len(ts)):
            rec = {
                "query_id": ts.query_ids[i],
                "query": ts.queries[i],
                "positives": [passage(r) for r in ts.positives[i]],
                "negatives": [passage(r) for r in ts.negatives[i]],
                "pos_scores": [score[(i, r)] for r in ts.positives[i]],
                "neg_scores": [score[(i, r)] for r in ts.negatives[i]],
            }
            f.write(json.dumps(rec) + "\n")
    tmp.replace(out)
    summary = {
        "groups": len(ts),
        "pairs": len(flat),
        "seconds": round(seconds, 1),
        "pairs_per_s": round(len(flat) / max(seconds, 1e-9), 1),
        "teacher": cfg.reranker.path,
        **report.to_dict(),
    }
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    say(
        f"teacher: {len(flat):,} pairs of {len(ts):,} groups scored in {duration(seconds)} "
        f"({summary['pairs_per_s']}/s) -> {out}"
    )
    return summary
