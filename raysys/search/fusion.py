"""Score fusion: combining the rankings of several runs (or score sets) for
the same queries into one.

- :func:`minmax`: per-query min-max normalisation to [0, 1].
- :func:`interpolate`: ``weight * a + (1 - weight) * b`` over a's documents,
  each min-max normalised first (how the rerank stage mixes reranker and
  first-stage scores).
- :func:`weighted_sum`: any number of runs, each normalised, weighted and
  summed; a document missing from a run gets that run's 0.
- :func:`rrf`: reciprocal-rank fusion, ``sum_i w_i / (k + rank_i)`` with ranks
  from 1 (Cormack et al. 2009; k = 60 by default); scale-free.

Ranks within a run order by score descending, ties by document id.
"""

from __future__ import annotations

from collections.abc import Sequence

from raysys.search.runfile import Run

Scores = dict[str, float]


def minmax(scores: Scores) -> Scores:
    """Scores mapped to [0, 1] (all 0 when they are all equal)."""
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    span = hi - lo
    return {d: (s - lo) / span if span > 0 else 0.0 for d, s in scores.items()}


def interpolate(a: Scores, b: Scores, weight: float) -> Scores:
    """``weight * minmax(a) + (1 - weight) * minmax(b restricted to a's docs)``.

    Every document of ``a`` must have a score in ``b``.
    """
    missing = [d for d in a if d not in b]
    if missing:
        raise ValueError(f"interpolate: {len(missing)} documents have no second score")
    na = minmax(a)
    nb = minmax({d: b[d] for d in a})
    return {d: weight * na[d] + (1.0 - weight) * nb[d] for d in a}


def _check(runs: Sequence[Run], weights: Sequence[float] | None) -> list[float]:
    if not runs:
        raise ValueError("fusion needs at least one run")
    w = list(weights) if weights is not None else [1.0] * len(runs)
    if len(w) != len(runs):
        raise ValueError(f"{len(runs)} runs but {len(w)} weights")
    return w


def weighted_sum(
    runs: Sequence[Run], weights: Sequence[float] | None = None, normalize: bool = True
) -> Run:
    """Per query, the weighted sum of each run's (min-max normalised) scores."""
    w = _check(runs, weights)
    out: Run = {}
    for run, wi in zip(runs, w, strict=True):
        for qid, hits in run.items():
            scores = minmax(hits) if normalize else hits
            acc = out.setdefault(qid, {})
            for d, s in scores.items():
                acc[d] = acc.get(d, 0.0) + wi * s
    return out


def ranked(hits: Scores) -> list[str]:
    """Document ids by score descending, ties by id."""
    return sorted(hits, key=lambda d: (-hits[d], d))


def rrf(runs: Sequence[Run], k: int = 60, weights: Sequence[float] | None = None) -> Run:
    """Reciprocal-rank fusion of ``runs``."""
    if k < 0:
        raise ValueError("rrf: k must be >= 0")
    w = _check(runs, weights)
    out: Run = {}
    for run, wi in zip(runs, w, strict=True):
        for qid, hits in run.items():
            acc = out.setdefault(qid, {})
            for rank, d in enumerate(ranked(hits), start=1):
                acc[d] = acc.get(d, 0.0) + wi / (k + rank)
    return out
