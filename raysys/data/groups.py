"""Training groups: a query, its positives and its hard negatives.

A :class:`TrainingSet` holds a corpus table (``id``, ``title``, ``text``) and one
group per query whose passages are row numbers into that table, so it is cheap
to ship to Ray workers (``ray.put`` of Arrow tables is zero-copy on a node).

Groups are read from JSONL or Parquet with raysys field names
(``query_id``, ``query``, ``positives``, ``negatives``) or Tevatron's
(``positive_passages``/``negative_passages`` with ``docid``/``title``/``text``,
or ``query_text``/``positive_document_ids``/``negative_document_ids``). A
passage is an id into the corpus (a string) or an object with ``text`` (and
optionally ``id``/``docid`` and ``title``). They can also be built from a BEIR
folder's qrels with negatives sampled from the corpus.

Per epoch, :meth:`TrainingSet.sample` draws a fixed-size group (1 positive +
``n`` negatives) deterministically from ``(seed, epoch, group)``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raysys.data.readers import (
    CORPUS_SCHEMA,
    BeirFolder,
    DataError,
    Report,
    compact_corpus,
    iter_records,
    read_corpus,
)

log = logging.getLogger(__name__)

_POS_FIELDS = ("positives", "positive_passages", "positive_document_ids", "pos")
_NEG_FIELDS = ("negatives", "negative_passages", "negative_document_ids", "neg")
# Teacher scores, parallel to the positives / negatives lists (FlagEmbedding's names too).
_POS_SCORE_FIELDS = ("pos_scores", "positive_scores")
_NEG_SCORE_FIELDS = ("neg_scores", "negative_scores")


@dataclass
class TrainingSet:
    corpus: pa.Table  # id, title, text
    query_ids: list[str]
    queries: list[str]
    positives: list[list[int]]  # corpus rows
    negatives: list[list[int]]
    report: Report
    # Teacher scores per group, corpus row -> score (`raysys teacher`), or None.
    scores: list[dict[int, float]] | None = None

    def __post_init__(self) -> None:
        # One large_string chunk per column: fetching a batch of passages then
        # costs O(batch), whatever the corpus size (see compact_corpus).
        self.corpus = compact_corpus(self.corpus)

    def __len__(self) -> int:
        return len(self.query_ids)

    def positive_ids(self, i: int) -> set[str]:
        ids = self.corpus.column("id")
        return {ids[r].as_py() for r in self.positives[i]}

    def sample(self, i: int, epoch: int, seed: int, n_neg: int) -> tuple[int, list[int]]:
        """Draw (positive row, n_neg negative rows) for group ``i`` in ``epoch``."""
        rng = np.random.default_rng([seed, epoch, i])
        pos = self.positives[i][int(rng.integers(len(self.positives[i])))]
        if n_neg == 0:
            return pos, []
        pool = self.negatives[i]
        if len(pool) >= n_neg:
            negs = rng.choice(len(pool), size=n_neg, replace=False)
            return pos, [pool[int(j)] for j in negs]
        if pool:
            negs = rng.choice(len(pool), size=n_neg, replace=True)
            return pos, [pool[int(j)] for j in negs]
        # No negatives at all: random corpus passages that are not positives.
        banned = set(self.positives[i])
        out: list[int] = []
        while len(out) < n_neg:
            r = int(rng.integers(self.corpus.num_rows))
            if r not in banned:
                out.append(r)
        return pos, out

    def teacher_scores(self, i: int, rows: list[int]) -> list[float]:
        """Group ``i``'s teacher scores of ``rows`` (groups read with scores)."""
        if self.scores is None:
            raise DataError(
                "train.loss.distill_weight > 0 needs teacher scores in the training groups "
                "(pos_scores / neg_scores; `raysys teacher` writes them)"
            )
        return [self.scores[i][r] for r in rows]

    def texts(self, rows: list[int]) -> tuple[list[str], list[str], list[str]]:
        """(ids, titles, texts) for corpus rows."""
        sub = self.corpus.take(pa.array(rows, type=pa.int64()))
        return (
            sub.column("id").to_pylist(),
            sub.column("title").to_pylist(),
            sub.column("text").to_pylist(),
        )


class _CorpusBuilder:
    """Grows a corpus with passages given inline, keeping ids unique.

    The base corpus stays an Arrow table (only its ids become Python objects,
    to resolve ids to rows); inline passages are appended after it.
    """

    def __init__(self, base: pa.Table | None) -> None:
        self.base = base
        n_base = 0 if base is None else base.num_rows
        self.ids: list[str] = []
        self.titles: list[str] = []
        self.texts: list[str] = []
        self.row = (
            {} if base is None else {p: i for i, p in enumerate(base.column("id").to_pylist())}
        )
        self.n_base = n_base

    def resolve(self, item: Any, loc: str, report: Report) -> int | None:
        if isinstance(item, (str, int)) and not isinstance(item, bool):
            pid = str(item)
            if pid not in self.row:
                report.skip("passage ids not in the corpus", f"{loc} (id {pid})")
                return None
            return self.row[pid]
        if not isinstance(item, dict):
            raise DataError(f"{loc}: a passage must be an id or an object, got {item!r}")
        pid = item.get("docid", item.get("id", item.get("_id")))
        text = str(item.get("text") or "")
        title = str(item.get("title") or "")
        if pid is not None and str(pid) in self.row:
            return self.row[str(pid)]
        if not text.strip() and not title.strip():
            report.skip("passages with empty text", loc if pid is None else f"{loc} (id {pid})")
            return None
        if pid is None:
            pid = "text:" + hashlib.sha1(f"{title}\x00{text}".encode()).hexdigest()[:16]
            if pid in self.row:
                return self.row[pid]
        pid = str(pid)
        self.row[pid] = self.n_base + len(self.ids)
        self.ids.append(pid)
        self.titles.append(title)
        self.texts.append(text)
        return self.row[pid]

    def table(self) -> pa.Table:
        added = pa.table(
            {"id": self.ids, "title": self.titles, "text": self.texts}, schema=CORPUS_SCHEMA
        )
        if self.base is None:
            return added
        # 64-bit offsets: the base may already be past 2 GiB of text.
        large = pa.schema([(f.name, pa.large_string()) for f in CORPUS_SCHEMA])
        return pa.concat_tables([self.base.cast(large), added.cast(large)])


def _field(rec: dict[str, Any], names: tuple[str, ...]) -> Any:
    for n in names:
        if n in rec:
            return rec[n]
    return None


def read_groups(
    path: str | Path,
    corpus: pa.Table | None = None,
    *,
    on_bad_line: str = "error",
    max_queries: int = 0,
    report: Report | None = None,
) -> TrainingSet:
    """Read training groups from JSONL or Parquet (raysys or Tevatron field names)."""
    report = report if report is not None else Report()
    builder = _CorpusBuilder(corpus)
    qids: list[str] = []
    queries: list[str] = []
    positives: list[list[int]] = []
    negatives: list[list[int]] = []
    seen: set[str] = set()
    scores: list[dict[int, float]] = []
    for loc, rec in iter_records(path, report, on_bad_line):
        qid = _field(rec, ("query_id", "qid", "_id", "id"))
        query = _field(rec, ("query", "query_text", "text"))
        if query is None:
            raise DataError(f"{loc}: missing field 'query' (or 'query_text')")
        if not str(query).strip():
            report.skip("groups with an empty query", loc)
            continue
        qid = str(qid) if qid is not None else hashlib.sha1(str(query).encode()).hexdigest()[:16]
        if qid in seen:
            report.skip("duplicate query ids", f"{loc} (id {qid})")
            continue
        pos_items = _field(rec, _POS_FIELDS) or []
        neg_items = _field(rec, _NEG_FIELDS) or []
        if not isinstance(pos_items, list) or not isinstance(neg_items, list):
            raise DataError(f"{loc}: positives and negatives must be lists")
        pos_rows = [builder.resolve(x, loc, report) for x in pos_items]
        pos = [r for r in pos_rows if r is not None]
        if not pos:
            report.skip("queries without a positive", f"{loc} (query {qid})")
            continue
        pos_set = set(pos)
        neg_rows = [builder.resolve(x, loc, report) for x in neg_items]
        neg = [r for r in neg_rows if r is not None]
        dropped = [r for r in neg if r in pos_set]
        if dropped:
            report.skip("negatives that are also positives", f"{loc} (query {qid})")
        group_scores = _teacher_scores(rec, loc, pos_rows, neg_rows)
        if (group_scores is None) != (not scores) and qids:
            raise DataError(
                f"{loc}: teacher scores must be on every group or on none "
                f"({'this group has none' if group_scores is None else 'earlier groups have none'})"
            )
        if group_scores is not None:
            scores.append(group_scores)
        seen.add(qid)
        qids.append(qid)
        queries.append(str(query))
        positives.append(pos)
        negatives.append([r for r in neg if r not in pos_set])
        if max_queries and len(qids) >= max_queries:
            break
    if report.counts:
        log.warning("training groups %s: %s", path, report.summary())
    if not qids:
        raise DataError(f"{path}: no usable training groups ({report.summary()})")
    return TrainingSet(builder.table(), qids, queries, positives, negatives, report, scores or None)


def _teacher_scores(
    rec: dict[str, Any], loc: str, pos_rows: list[int | None], neg_rows: list[int | None]
) -> dict[int, float] | None:
    """corpus row -> teacher score of one group, or None when it has none."""
    pos_s, neg_s = _field(rec, _POS_SCORE_FIELDS), _field(rec, _NEG_SCORE_FIELDS)
    if pos_s is None and neg_s is None:
        return None
    out: dict[int, float] = {}
    for what, rows, vals in (("pos", pos_rows, pos_s), ("neg", neg_rows, neg_s)):
        if not isinstance(vals, list) or len(vals) != len(rows):
            raise DataError(
                f"{loc}: {what}_scores must be a list with one number per "
                f"{'positive' if what == 'pos' else 'negative'} ({len(rows)})"
            )
        for r, v in zip(rows, vals, strict=True):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise DataError(f"{loc}: {what}_scores holds {v!r}, not a number")
            if r is not None:
                out[r] = float(v)
    return out


def groups_from_beir(
    root: str | Path,
    split: str = "train",
    *,
    sampled_negatives: int = 30,
    seed: int = 42,
    max_queries: int = 0,
) -> TrainingSet:
    """Build groups from a BEIR folder: qrels positives plus random corpus negatives."""
    beir = BeirFolder(Path(root))
    report = Report()
    corpus = beir.corpus(report)
    queries = beir.queries(report)
    qrels = beir.qrels(split)
    row = {pid: i for i, pid in enumerate(corpus.column("id").to_pylist())}
    rng = np.random.default_rng(seed)
    qids, texts, positives, negatives = [], [], [], []
    for qid in sorted(qrels):
        if qid not in queries:
            report.skip("qrels queries missing from queries.jsonl", qid)
            continue
        pos = []
        for did, rel in qrels[qid].items():
            if rel <= 0:
                continue
            if did in row:
                pos.append(row[did])
            else:
                report.skip("qrels docs missing from the corpus", f"{qid}/{did}")
        if not pos:
            report.skip("queries without a positive", qid)
            continue
        banned = set(pos)
        cand = rng.choice(
            corpus.num_rows, size=min(corpus.num_rows, sampled_negatives + len(pos)), replace=False
        )
        neg = [int(r) for r in cand if int(r) not in banned][:sampled_negatives]
        qids.append(qid)
        texts.append(queries[qid])
        positives.append(pos)
        negatives.append(neg)
        if max_queries and len(qids) >= max_queries:
            break
    if report.counts:
        log.warning("BEIR %s/%s: %s", root, split, report.summary())
    if not qids:
        raise DataError(
            f"{root}: split {split!r} has no usable training queries ({report.summary()})"
        )
    return TrainingSet(corpus, qids, texts, positives, negatives, report)


def load_training_set(data: Any, seed: int = 42) -> TrainingSet:
    """Build the training set described by a :class:`raysys.config.DataConfig`."""
    if data.groups:
        corpus = None
        report = Report()
        corpus_src = data.corpus or data.path
        if corpus_src:
            p = Path(corpus_src)
            p = p / "corpus.jsonl" if p.is_dir() else p
            corpus = read_corpus(p, report, on_bad_line=data.on_bad_line)
        return read_groups(
            data.groups,
            corpus,
            on_bad_line=data.on_bad_line,
            max_queries=data.max_queries,
            report=report,
        )
    if not data.path:
        raise DataError(
            "no training data: set data.groups (a groups file) or data.path (a BEIR folder)"
        )
    return groups_from_beir(
        data.path,
        data.train_split,
        sampled_negatives=data.sampled_negatives,
        seed=seed,
        max_queries=data.max_queries,
    )
