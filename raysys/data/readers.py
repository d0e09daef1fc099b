"""Readers for corpora, queries and qrels: BEIR folders, JSONL and Parquet.

Every reader is strict about structure and honest about loss: a malformed line
raises :class:`DataError` naming the file and line (or, with
``on_bad_line="skip"``, is counted in a :class:`Report`); a missing field, an
empty text or a duplicate id is counted and skipped, never dropped silently.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from raysys.errors import UserError

log = logging.getLogger(__name__)

CORPUS_SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
READ_BATCH_ROWS = 100_000
ID_FIELDS = ("_id", "id", "docid", "doc_id", "pid", "query_id", "qid")
TEXT_FIELDS = ("text", "contents", "body", "passage", "query", "query_text")


class DataError(UserError):
    """Input data is malformed; the message says where."""


@dataclass
class Report:
    """Counts of what was skipped, with a few examples of each reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(example)

    def merge(self, other: Report) -> None:
        for k, v in other.counts.items():
            self.counts[k] += v
            self.examples.setdefault(k, []).extend(
                other.examples.get(k, [])[: 5 - len(self.examples.get(k, []))]
            )

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": dict(self.counts), "examples": self.examples}

    def summary(self) -> str:
        if not self.counts:
            return "nothing skipped"
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))


def iter_jsonl(
    path: str | Path, report: Report | None = None, on_bad_line: str = "error"
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file.

    A line that is not UTF-8, not JSON or not an object is a bad line: it
    raises :class:`DataError` naming file and line, or with
    ``on_bad_line="skip"`` is counted in ``report``.
    """
    import io

    from raysys.storage import resolve

    loc = resolve(path)
    path = loc.uri
    with io.BufferedReader(loc.fs.open_input_stream(loc.path)) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _bad_line(
                    f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})",
                    report,
                    on_bad_line,
                )
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except ValueError as e:
                _bad_line(f"{path}:{lineno}: malformed line: {e}", report, on_bad_line)
                continue
            yield lineno, obj


def _bad_line(msg: str, report: Report | None, on_bad_line: str) -> None:
    """Count a bad line under ``on_bad_line="skip"``, else raise :class:`DataError`."""
    if on_bad_line == "skip" and report is not None:
        report.skip("malformed lines", msg)
        log.warning(msg)
        return
    raise DataError(msg)


def iter_records(
    path: str | Path, report: Report | None = None, on_bad_line: str = "error"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(location, record)`` from a JSONL or Parquet file (a local
    path or a storage URI)."""
    from raysys.storage import resolve

    loc = resolve(path)
    path = loc.uri
    if not loc.exists():
        raise DataError(f"no such file: {path}")
    if loc.path.endswith(".parquet") or loc.is_dir():
        # Batch by batch: memory holds one batch of Python records, not the file.
        import pyarrow.dataset as pads

        try:
            dataset = pads.dataset(loc.path, format="parquet", filesystem=loc.fs)
            batches = dataset.to_batches(batch_size=READ_BATCH_ROWS)
            i = 0
            for batch in batches:
                for rec in batch.to_pylist():
                    yield f"{path}:row {i}", rec
                    i += 1
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file or folder: {e}") from None
    else:
        for lineno, rec in iter_jsonl(path, report, on_bad_line):
            yield f"{path}:{lineno}", rec


def _first(rec: dict[str, Any], names: tuple[str, ...]) -> Any:
    for n in names:
        if n in rec and rec[n] is not None:
            return rec[n]
    return None


def iter_corpus(
    path: str | Path, report: Report, on_bad_line: str = "error"
) -> Iterator[tuple[str, str, str]]:
    """Stream ``(id, title, text)`` from a corpus (BEIR ``corpus.jsonl``, JSONL or Parquet).

    Records with no id, or no text and no title, and repeated ids are counted
    in ``report`` and skipped.
    """
    seen: set[str] = set()
    for loc, rec in iter_records(path, report, on_bad_line):
        pid = _first(rec, ID_FIELDS)
        if pid is None:
            report.skip("corpus records without an id", loc)
            continue
        pid = str(pid)
        title = str(rec.get("title") or "")
        text = _first(rec, TEXT_FIELDS)
        text = "" if text is None else str(text)
        if not text.strip() and not title.strip():
            report.skip("corpus records with empty text", f"{loc} (id {pid})")
            continue
        if pid in seen:
            report.skip("duplicate corpus ids", f"{loc} (id {pid})")
            continue
        seen.add(pid)
        yield pid, title, text


def read_corpus(
    path: str | Path, report: Report | None = None, on_bad_line: str = "error"
) -> pa.Table:
    """Read a whole corpus into a table with string columns ``id``, ``title``, ``text``.

    Built in record batches of :data:`READ_BATCH_ROWS`, so Python objects for
    at most one batch exist at a time (the table may have several chunks).
    """
    report = report if report is not None else Report()
    batches: list[pa.RecordBatch] = []
    cols: tuple[list[str], list[str], list[str]] = ([], [], [])

    def flush() -> None:
        batches.append(
            pa.RecordBatch.from_arrays(
                [pa.array(c, pa.string()) for c in cols], schema=CORPUS_SCHEMA
            )
        )
        for c in cols:
            c.clear()

    for row in iter_corpus(path, report, on_bad_line):
        for c, v in zip(cols, row, strict=True):
            c.append(v)
        if len(cols[0]) >= READ_BATCH_ROWS:
            flush()
    if cols[0] or not batches:
        flush()
    if report.counts:
        log.warning("corpus %s: %s", path, report.summary())
    return pa.Table.from_batches(batches, schema=CORPUS_SCHEMA)


def compact_corpus(table: pa.Table) -> pa.Table:
    """The corpus with 64-bit-offset (``large_string``) columns of one chunk each.

    A 32-bit-offset string chunk holds at most 2 GiB, so Arrow splits larger
    corpora into chunks, and ``take`` on a chunked column first concatenates
    every chunk: a copy of the corpus per call (and "offset overflow" past
    2 GiB). On one ``large_string`` chunk, ``take`` copies only the rows taken.
    """
    arrays = [
        table.column(name).cast(pa.large_string()).combine_chunks() for name in table.column_names
    ]
    return pa.Table.from_arrays(arrays, names=table.column_names)


def read_queries(
    path: str | Path, report: Report | None = None, on_bad_line: str = "error"
) -> dict[str, str]:
    """Read queries (BEIR ``queries.jsonl``, JSONL or Parquet) into ``{id: text}``."""
    report = report if report is not None else Report()
    out: dict[str, str] = {}
    for loc, rec in iter_records(path, report, on_bad_line):
        qid = _first(rec, ("_id", "id", "query_id", "qid"))
        text = _first(rec, ("text", "query", "query_text"))
        if qid is None:
            report.skip("queries without an id", loc)
            continue
        if text is None or not str(text).strip():
            report.skip("queries with empty text", f"{loc} (id {qid})")
            continue
        if str(qid) in out:
            report.skip("duplicate query ids", f"{loc} (id {qid})")
            continue
        out[str(qid)] = str(text)
    return out


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:  # a path or a URI
    """Read a TREC or BEIR qrels file into ``{query_id: {doc_id: relevance}}``.

    Accepts BEIR's TSV with a ``query-id corpus-id score`` header and TREC's
    ``qid 0 docid rel`` lines.
    """
    import io

    from raysys.storage import resolve

    loc = resolve(path)
    path = loc.uri
    if not loc.is_file():
        raise DataError(f"no such qrels file: {path}")
    qrels: dict[str, dict[str, int]] = {}
    with io.BufferedReader(loc.fs.open_input_stream(loc.path)) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not valid UTF-8") from None
            row = next(csv.reader([line], delimiter="\t"), [])
            if len(row) == 1:
                row = row[0].split()
            if not row or (
                lineno == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid")
            ):
                continue
            try:
                if len(row) == 3:
                    qid, did, rel = row
                elif len(row) == 4:
                    qid, _, did, rel = row
                else:
                    raise ValueError(f"expected 3 or 4 columns, got {len(row)}")
                qrels.setdefault(qid.strip(), {})[did.strip()] = int(float(rel))
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: malformed qrels line: {e}") from None
    return qrels


@dataclass
class BeirFolder:
    """A BEIR dataset folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""

    root: Path
    on_bad_line: str = "error"

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        for name in ("corpus.jsonl", "queries.jsonl"):
            if not (self.root / name).is_file():
                raise DataError(f"{self.root} is not a BEIR folder: {name} is missing")

    @property
    def corpus_path(self) -> Path:
        return self.root / "corpus.jsonl"

    def corpus(self, report: Report | None = None) -> pa.Table:
        return read_corpus(self.corpus_path, report, self.on_bad_line)

    def queries(self, report: Report | None = None) -> dict[str, str]:
        return read_queries(self.root / "queries.jsonl", report, self.on_bad_line)

    def qrels(self, split: str) -> dict[str, dict[str, int]]:
        path = self.root / "qrels" / f"{split}.tsv"
        if not path.is_file():
            have = sorted(p.stem for p in (self.root / "qrels").glob("*.tsv"))
            raise DataError(f"{self.root}: no qrels split {split!r} (have {have})")
        return read_qrels(path)
