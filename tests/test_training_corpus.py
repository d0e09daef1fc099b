"""Fetching a batch of training passages costs O(batch): a corpus that Arrow
holds in many chunks (as it does past 2 GiB) is compacted once into one
large_string chunk per column, so `take` copies only the rows it takes."""

from __future__ import annotations

import pyarrow as pa

from raysys.data.groups import TrainingSet, read_groups
from raysys.data.readers import Report, read_corpus


def _chunked_corpus(n_chunks: int, rows_per_chunk: int, text_len: int) -> pa.Table:
    chunks = []
    for c in range(n_chunks):
        ids = [f"d{c}-{i}" for i in range(rows_per_chunk)]
        chunks.append(
            pa.table(
                {
                    "id": ids,
                    "title": [f"title {x}" for x in ids],
                    "text": [f"{x} " + "w" * text_len for x in ids],
                }
            )
        )
    return pa.concat_tables(chunks)


_POOLS: list[pa.MemoryPool] = []  # kept alive: buffers may outlive a measurement


def _peak_arrow_bytes(fn, *args):
    """Peak Arrow memory allocated while ``fn(*args)`` runs."""
    parent = pa.default_memory_pool()
    proxy = pa.proxy_memory_pool(parent)
    _POOLS.append(proxy)
    pa.set_memory_pool(proxy)
    try:
        fn(*args)
    finally:
        pa.set_memory_pool(parent)
    return proxy.max_memory()


def test_batch_fetch_copies_only_the_batch():
    corpus = _chunked_corpus(n_chunks=50, rows_per_chunk=1000, text_len=1100)  # ~56 MB, 50 chunks
    assert corpus.column("text").num_chunks == 50
    ts = TrainingSet(corpus, ["q"], ["query"], [[0]], [[1]], Report())
    assert ts.corpus.column("text").num_chunks == 1
    assert ts.corpus.schema.field("text").type == pa.large_string()
    rows = [7, 49_999, 12_345, 0, 31_000] * 25  # 125 rows from all over the corpus
    peak = _peak_arrow_bytes(ts.texts, rows)
    # The rows themselves are ~140 KB; a take that concatenates the chunks
    # first peaks at the corpus size (~56 MB), as it did before compaction.
    assert peak < 2_000_000, peak
    assert _peak_arrow_bytes(corpus.take, pa.array(rows)) > 50_000_000  # the old way
    ids, titles, texts = ts.texts(rows)
    assert ids[:5] == ["d0-7", "d49-999", "d12-345", "d0-0", "d31-0"]
    assert texts[1].startswith("d49-999 ") and titles[2] == "title d12-345"


def test_read_corpus_in_batches_and_groups_append_inline_passages(tmp_path, monkeypatch):
    import raysys.data.readers as readers

    monkeypatch.setattr(readers, "READ_BATCH_ROWS", 3)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(f'{{"_id": "d{i}", "title": "t{i}", "text": "passage {i}"}}\n' for i in range(8))
    )
    table = read_corpus(corpus)
    assert table.num_rows == 8 and table.column("id").num_chunks == 3
    groups = tmp_path / "groups.jsonl"
    groups.write_text(
        '{"query_id": "q1", "query": "one", "positives": ["d3"], '
        '"negatives": [{"docid": "x1", "text": "inline negative"}, "d5"]}\n'
    )
    ts = read_groups(groups, table)
    assert ts.corpus.num_rows == 9
    assert ts.texts(ts.positives[0])[2] == ["passage 3"]
    assert ts.texts(ts.negatives[0]) == (["x1", "d5"], ["", "t5"], ["inline negative", "passage 5"])


def test_parquet_corpus_is_read_batch_by_batch(tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    import pytest

    import raysys.data.readers as readers
    from raysys.data.readers import DataError

    monkeypatch.setattr(readers, "READ_BATCH_ROWS", 2)
    folder = tmp_path / "corpus"
    folder.mkdir()
    pq.write_table(
        pa.table({"docid": [1, 2, 3], "title": ["a", "", "c"], "contents": ["x", " ", "z"]}),
        folder / "part-0.parquet",
    )
    pq.write_table(
        pa.table({"docid": [3, 4], "title": ["dup", "d"], "contents": ["again", "w"]}),
        folder / "part-1.parquet",
    )
    report = Report()
    table = read_corpus(folder, report)
    assert table.column("id").to_pylist() == ["1", "3", "4"]
    assert table.column("text").to_pylist() == ["x", "z", "w"]
    assert report.counts == {"corpus records with empty text": 1, "duplicate corpus ids": 1}
    assert report.examples["duplicate corpus ids"] == [f"{folder}:row 3 (id 3)"]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_corpus(bad)
