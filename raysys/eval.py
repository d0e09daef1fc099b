"""Retrieval metrics through ir-measures (pytrec_eval underneath): never hand-rolled."""

from __future__ import annotations

import json
from pathlib import Path

import ir_measures
from ir_measures import RR, R, nDCG

from raysys.storage import Location, resolve

# Our stable key names -> ir-measures measures.
METRICS = {
    "nDCG@10": nDCG @ 10,
    "MRR@10": RR @ 10,
    "Recall@100": R @ 100,
    "Recall@1000": R @ 1000,
}


def evaluate(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]
) -> dict[str, float]:
    """Mean metrics over the queries in ``qrels``; a query missing from the run scores 0."""
    run = {q: run.get(q, {}) for q in qrels}
    # pytrec_eval skips queries with no hits; give them an explicit zero.
    per_query = {name: {q: 0.0 for q in qrels} for name in METRICS}
    inverse = {repr(m): name for name, m in METRICS.items()}
    for m in ir_measures.iter_calc(
        list(METRICS.values()), qrels, {q: h for q, h in run.items() if h}
    ):
        per_query[inverse[repr(m.measure)]][m.query_id] = float(m.value)
    return {name: sum(v.values()) / max(1, len(v)) for name, v in per_query.items()}


def write_metrics(metrics: dict[str, float], path: str | Path | Location) -> Location:
    """Write ``metrics`` as JSON to a local path or a storage URI."""
    loc = resolve(path)
    loc.write_text(json.dumps(metrics, indent=2) + "\n")
    return loc
