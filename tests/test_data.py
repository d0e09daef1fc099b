import json

import pytest

from raysys.data.groups import groups_from_beir, read_groups
from raysys.data.readers import DataError, Report, read_corpus, read_qrels


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_line_names_file_and_line(tmp_path):
    p = _write(
        tmp_path / "g.jsonl",
        [
            json.dumps({"query_id": "1", "query": "a", "positives": [{"text": "x"}]}),
            '{"query_id": "2", "query": "b", "positives": [',
        ],
    )
    with pytest.raises(DataError, match=r"g\.jsonl:2: malformed line"):
        read_groups(p)


def test_malformed_line_can_be_counted_and_skipped(tmp_path):
    p = _write(
        tmp_path / "g.jsonl",
        [
            json.dumps({"query_id": "1", "query": "a", "positives": [{"text": "x"}]}),
            "not json",
        ],
    )
    ts = read_groups(p, on_bad_line="skip")
    assert len(ts) == 1 and ts.report.counts["malformed lines"] == 1


def test_queries_without_positive_are_counted(tmp_path):
    p = _write(
        tmp_path / "g.jsonl",
        [
            json.dumps(
                {
                    "query_id": "1",
                    "query": "a",
                    "positives": [{"text": "x"}],
                    "negatives": [{"text": "y"}],
                }
            ),
            json.dumps(
                {"query_id": "2", "query": "b", "positives": [], "negatives": [{"text": "y"}]}
            ),
            json.dumps({"query_id": "3", "query": "c", "positives": [{"text": "  "}]}),
            json.dumps({"query_id": "1", "query": "again", "positives": [{"text": "z"}]}),
        ],
    )
    ts = read_groups(p)
    assert ts.query_ids == ["1"]
    assert ts.report.counts["queries without a positive"] == 2
    assert ts.report.counts["passages with empty text"] == 1
    assert ts.report.counts["duplicate query ids"] == 1


def test_missing_query_field_is_an_error(tmp_path):
    p = _write(tmp_path / "g.jsonl", [json.dumps({"query_id": "1", "positives": ["d1"]})])
    with pytest.raises(DataError, match=r"g\.jsonl:1: missing field 'query'"):
        read_groups(p)


def test_tevatron_format_and_corpus_ids(tmp_path):
    corpus = read_corpus(
        _write(
            tmp_path / "c.jsonl",
            [
                json.dumps({"docid": "d1", "title": "T", "text": "one"}),
                json.dumps({"docid": "d2", "text": "two"}),
                json.dumps({"docid": "d2", "text": "dup"}),
                json.dumps({"docid": "d3", "text": ""}),
            ],
        )
    )
    assert corpus.column("id").to_pylist() == ["d1", "d2"]
    p = _write(
        tmp_path / "t.jsonl",
        [
            json.dumps(
                {
                    "query_id": "q",
                    "query": "hello",
                    "positive_passages": [{"docid": "d1", "title": "T", "text": "one"}],
                    "negative_passages": [
                        {"docid": "d9", "title": "", "text": "inline negative"},
                        "d2",
                        "missing",
                    ],
                }
            ),
        ],
    )
    ts = read_groups(p, corpus)
    ids, _, texts = ts.texts(ts.negatives[0])
    assert ids == ["d9", "d2"] and texts == ["inline negative", "two"]
    assert ts.report.counts["passage ids not in the corpus"] == 1


def test_sampling_is_seeded_and_never_returns_positives(tmp_path):
    p = _write(
        tmp_path / "g.jsonl",
        [
            json.dumps(
                {
                    "query_id": "1",
                    "query": "a",
                    "positives": [{"text": f"p{i}"} for i in range(3)],
                    "negatives": [{"text": f"n{i}"} for i in range(10)],
                }
            ),
        ],
    )
    ts = read_groups(p)
    a = [ts.sample(0, epoch=e, seed=1, n_neg=4) for e in range(5)]
    assert a == [ts.sample(0, epoch=e, seed=1, n_neg=4) for e in range(5)]
    assert len({tuple(x[1]) for x in a}) > 1  # differs across epochs
    for pos, negs in a:
        assert (
            pos in ts.positives[0] and not set(negs) & set(ts.positives[0]) and len(set(negs)) == 4
        )


@pytest.mark.slow
def test_beir_groups(scifact):
    ts = groups_from_beir(scifact, "train", sampled_negatives=5, max_queries=50)
    assert len(ts) == 50 and ts.corpus.num_rows == 5183
    for i in range(len(ts)):
        assert not set(ts.negatives[i]) & set(ts.positives[i])


def test_qrels_formats(tmp_path):
    beir = _write(tmp_path / "a.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td2\t0"])
    trec = _write(tmp_path / "b.txt", ["q1 0 d1 1", "q2 0 d3 2"])
    assert read_qrels(beir) == {"q1": {"d1": 1, "d2": 0}}
    assert read_qrels(trec) == {"q1": {"d1": 1}, "q2": {"d3": 2}}
    bad = _write(tmp_path / "c.tsv", ["q1\td1\tx"])
    with pytest.raises(DataError, match=r"c\.tsv:1"):
        read_qrels(bad)


def test_report_summary():
    r = Report()
    r.skip("x", "a")
    r.skip("x", "b")
    assert r.summary() == "2 x"
