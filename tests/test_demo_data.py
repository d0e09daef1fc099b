"""The docstring demo dataset: read with ast (nothing imported), deduplicated,
seeded and stable; its splits do not overlap."""

from __future__ import annotations

import json

from raysys.data.demo import build_demo_beir, docstring_pairs


def test_pairs_are_unique_and_named():
    pairs = docstring_pairs("small")
    assert len(pairs) > 1000
    summaries = [s for _, s, _ in pairs]
    assert len(set(summaries)) == len(summaries)
    titles = {t for t, _, _ in pairs}
    assert "json.dumps" in titles or "json.dump" in titles
    assert all(len(s) >= 15 and len(b) >= 40 for _, s, b in pairs)


def test_build_is_seeded_split_and_complete(tmp_path):
    a = build_demo_beir(tmp_path / "a", size="small", max_pairs=800)
    b = build_demo_beir(tmp_path / "b", size="small", max_pairs=800)
    assert (a / "corpus.jsonl").read_text() == (b / "corpus.jsonl").read_text()
    corpus = [json.loads(x) for x in (a / "corpus.jsonl").read_text().splitlines()]
    assert len(corpus) == 800
    splits = {}
    for name in ("train", "test"):
        rows = (a / "qrels" / f"{name}.tsv").read_text().splitlines()[1:]
        splits[name] = {r.split("\t")[0] for r in rows}
    assert len(splits["test"]) == 200  # at most a quarter
    assert not splits["train"] & splits["test"]
    assert len(splits["train"]) + len(splits["test"]) == 800
