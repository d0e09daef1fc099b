"""Hard-negative mining: never a positive, seeded, counted skips, the reranker
filter, and `raysys mine` end to end (settings from the `mine:` section and flags)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from raysys.search.mine import MineSpec, filter_false_negatives, mine_groups, sample_negatives


def test_mining_never_emits_a_positive():
    import random

    rng = random.Random(0)
    run, qrels, queries = {}, {}, {}
    docs = [f"d{i}" for i in range(300)]
    for q in range(200):
        qid = f"q{q}"
        ranked = rng.sample(docs, 150)
        pos = rng.sample(ranked[:120], rng.randint(1, 6))  # positives inside the window too
        run[qid] = {d: 1.0 - r / 1000 for r, d in enumerate(ranked)}
        qrels[qid] = {d: 1 for d in pos} | {"d299": 0}  # a judged non-relevant doc
        queries[qid] = f"query {q}"
    spec = MineSpec(rank_from=10, rank_to=100, n=30, seed=7)
    groups = mine_groups(run, queries, qrels, spec)
    assert len(groups) == 200
    for g in groups:
        pos = {d for d, r in qrels[g["query_id"]].items() if r > 0}
        assert set(g["positives"]) == pos
        assert not pos & set(g["negatives"])
        assert len(g["negatives"]) == len(set(g["negatives"])) == 30
        # Negatives come from ranks 10..99 of the positive-free ranking.
        hits = run[g["query_id"]]
        window = [d for d in sorted(hits, key=lambda d: -hits[d]) if d not in pos][10:100]
        assert set(g["negatives"]) <= set(window)
    # Seeded: the same spec gives the same groups; another seed does not.
    assert mine_groups(run, queries, qrels, MineSpec(10, 100, 30, seed=7)) == groups
    assert mine_groups(run, queries, qrels, MineSpec(10, 100, 30, seed=8)) != groups


def test_mining_reports_short_windows_and_missing_candidates():
    spec = MineSpec(rank_from=0, rank_to=5, n=3)
    negs = sample_negatives("q", ["a", "p", "b"], {"p"}, spec)
    assert negs == ["a", "b"]
    assert sum(spec.report.counts.values()) == 1
    groups = mine_groups({"q1": {}}, {"q1": "x"}, {"q1": {"p": 1}}, spec)
    assert groups == [] and spec.report.counts["queries with no retrieved candidates"] == 1


def test_reranker_filter_drops_candidates_near_the_positive():
    kept, dropped = filter_false_negatives([5.0, 3.0], ["a", "b", "c"], [2.9, 2.0, 4.0], 0.5)
    assert kept == ["b"] and dropped == 2


class _StubEncoder:
    """A QueryEncoder stand-in: its embedder has ``contract``; encoding is recorded."""

    def __init__(self, contract):
        self.contract, self.encoded = contract, []

    def get(self):
        return SimpleNamespace(contract=self.contract), None

    def encode(self, texts, batch_size=None):
        self.encoded += texts
        return np.ones((len(texts), 4), np.float32)


def test_exact_search_refuses_a_query_encoder_of_another_contract(tmp_path, monkeypatch):
    """Mining's exact search (no index) checks the query encoder's contract
    against the embeddings' before encoding a query; a matching one searches."""
    import raysys.search.exact
    from raysys.config import load_config
    from raysys.contract import ContractError, EncodingContract
    from raysys.index.manifest import write_manifest
    from raysys.stages import exact_search_stage

    searched = []
    monkeypatch.setattr(
        raysys.search.exact,
        "exact_search",
        lambda emb, qids, qvecs, **kw: searched.append(qids) or {"q1": {"d1": 1.0}},
    )
    index_contract = EncodingContract(model="m", pooling="mean", dim=4)
    write_manifest(tmp_path, {"contract": index_contract.to_dict(), "dim": 4})
    cfg = load_config(None, [])
    other = _StubEncoder(EncodingContract(model="m", pooling="cls", dim=4))
    with pytest.raises(ContractError, match="pooling: index has 'mean', query encoder has 'cls'"):
        exact_search_stage(cfg, tmp_path, {"q1": "a query"}, other)
    assert other.encoded == [] and searched == []
    same = _StubEncoder(EncodingContract(model="m", pooling="mean", dim=4))
    assert exact_search_stage(cfg, tmp_path, {"q1": "a query"}, same) == {"q1": {"d1": 1.0}}
    assert same.encoded == ["a query"] and searched == [["q1"]]


@pytest.mark.slow
def test_mine_command_end_to_end(ray_local, tiny_bert_dir, toy_data, tmp_path, capsys):
    """`raysys mine` without an index: encode, exact index, retrieve, sample, write."""
    from raysys.cli import main
    from raysys.data.groups import read_groups
    from raysys.data.readers import read_corpus

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text((toy_data / "corpus.jsonl").read_text())
    groups = [json.loads(x) for x in (toy_data / "groups.jsonl").read_text().splitlines()]
    with (beir / "queries.jsonl").open("w") as f:
        for g in groups:
            f.write(json.dumps({"_id": g["query_id"], "text": g["query"]}) + "\n")
    (beir / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(f"{g['query_id']}\t{g['positives'][0]}\t1\n" for g in groups)
    )
    # A malformed corpus line: refused with file and line by default ...
    with (beir / "corpus.jsonl").open("a") as f:
        f.write("{not json\n")
    out = tmp_path / "mined.jsonl"
    args = [
        "mine",
        "-",
        f"model={tiny_bert_dir}",
        f"data={beir}",
        "contract.pooling=cls",
        "mine.n=9",  # the --n flag below wins over the config
        "--out",
        str(out),
        "--ranks",
        "2:20",
        "--n",
        "5",
    ]
    assert main(args) == 2
    assert f"{beir / 'corpus.jsonl'}:{len(groups) + 1}: malformed line" in capsys.readouterr().err
    # ... and counted under data.on_bad_line=skip, which mining honours.
    rc = main([*args[:5], "data.on_bad_line=skip", *args[5:]])
    assert rc == 0
    mined = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(mined) == len(groups)
    for g in mined:
        assert len(g["negatives"]) == 5 and g["positives"][0] not in g["negatives"]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["groups"] == len(groups) and summary["ranks"] == [2, 20]
    assert summary["n"] == 5 and summary["corpus_skipped"] == {"malformed lines": 1}
    # The file reads back as training groups against the corpus.
    ts = read_groups(out, read_corpus(beir / "corpus.jsonl", on_bad_line="skip"))
    assert len(ts) == len(groups) and all(len(n) == 5 for n in ts.negatives)
