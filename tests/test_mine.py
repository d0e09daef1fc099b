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


# -- the reranker filter runs on the rerank stage's actor pool (#34, fault 8) --


@pytest.fixture(scope="module")
def tiny_reranker_dir(tiny_bert_dir, tmp_path_factory):
    import torch
    from transformers import AutoModel

    from raysys.models.backbone import load_tokenizer
    from raysys.models.reranker import RerankContract, Reranker, export_reranker

    torch.manual_seed(0)
    model = Reranker(
        AutoModel.from_pretrained(tiny_bert_dir),
        RerankContract(model=str(tiny_bert_dir), pooling="cls", max_len=32),
    )
    out = tmp_path_factory.mktemp("rr") / "reranker"
    return export_reranker(model, model.head.state_dict(), load_tokenizer(str(tiny_bert_dir)), out)


def _toy_mining(toy_data):
    """(run, queries, qrels, corpus table) over the toy corpus: 8 queries."""
    import random

    from raysys.data.readers import read_corpus

    corpus = read_corpus(toy_data / "corpus.jsonl")
    ids = corpus.column("id").to_pylist()
    rng = random.Random(1)
    run, queries, qrels = {}, {}, {}
    for k in range(8):
        ranked = rng.sample(ids, 30)
        run[f"q{k}"] = {d: 1.0 - r / 100 for r, d in enumerate(ranked)}
        queries[f"q{k}"] = f"topic w{k}"
        qrels[f"q{k}"] = {f"d{k}": 1, f"d{k + 8}": 1}
    return run, queries, qrels, corpus


def _old_driver_filter(groups, queries, corpus, reranker, pool, margin):
    """The filter as mining ran it before: a Scorer on the driver, query by query."""
    import dataclasses

    from raysys.models.reranker import Scorer

    scorer = Scorer(reranker, opts=dataclasses.asdict(pool))
    text = {
        d: (t, x)
        for d, t, x in zip(
            corpus.column("id").to_pylist(),
            corpus.column("title").to_pylist(),
            corpus.column("text").to_pylist(),
            strict=True,
        )
    }
    kept, scores = {}, {}
    for g in groups:
        pos, negs = g["positives"], g["negatives"]
        s = scorer.score(
            [queries[g["query_id"]]] * (len(pos) + len(negs)), [text[d] for d in pos + negs]
        )
        scores[g["query_id"]] = dict(zip(pos + negs, s, strict=True))
        if margin is not None:
            kept[g["query_id"]] = filter_false_negatives(
                s[: len(pos)], negs, s[len(pos) :], margin
            )[0]
    return kept, scores


def _local_stage(calls):
    """score_pairs_ray's stand-in: records its arguments and scores the pairs
    with the stage's own tokenize task and actor, in this process."""
    import dataclasses

    import pyarrow as pa
    import torch

    from raysys.contract import RerankContract
    from raysys.search.rerank import RerankActor, tokenize_pairs

    def stage(pairs, model_path, pool):
        calls.append((model_path, pool, pairs.num_rows))
        tok = tokenize_pairs(pairs, model_path, RerankContract.load(model_path).to_dict())
        opts = {**dataclasses.asdict(pool), "torch_threads": torch.get_num_threads()}
        return RerankActor(model_path, opts)(tok).take(pa.array(range(tok.num_rows)[::-1]))

    return stage


def _margin_splitting(groups, scores):
    """A margin that drops about half the negatives (midway between two gaps,
    so that float rounding cannot move a negative across it)."""
    gaps = sorted(
        min(scores[g["query_id"]][p] for p in g["positives"]) - scores[g["query_id"]][d]
        for g in groups
        for d in g["negatives"]
    )
    m = len(gaps) // 2
    return (gaps[m - 1] + gaps[m]) / 2


def test_mining_filter_scores_on_the_rerank_stage_with_the_pool(
    tiny_reranker_dir, toy_data, monkeypatch
):
    """The filter calls the rerank stage's function once, with the pool it is
    given, and keeps exactly the negatives the driver-side filter kept."""
    import copy

    import raysys.search.rerank
    from raysys.config import PoolConfig

    run, queries, qrels, corpus = _toy_mining(toy_data)
    plain = mine_groups(run, queries, qrels, MineSpec(0, 20, 10, seed=3))
    pool = PoolConfig(micro_batch=3, batch_size=8)
    _, scores = _old_driver_filter(plain, queries, corpus, str(tiny_reranker_dir), pool, None)
    margin = _margin_splitting(plain, scores)
    want, _ = _old_driver_filter(plain, queries, corpus, str(tiny_reranker_dir), pool, margin)
    calls = []
    monkeypatch.setattr(raysys.search.rerank, "score_pairs_ray", _local_stage(calls))
    spec = MineSpec(0, 20, 10, seed=3, margin=margin)
    got = mine_groups(run, queries, qrels, spec, str(tiny_reranker_dir), corpus, pool)
    assert calls == [(str(tiny_reranker_dir), pool, sum(len(g["positives"]) + 10 for g in plain))]
    assert {g["query_id"]: g["negatives"] for g in got} == want
    dropped = sum(len(g["negatives"]) for g in plain) - sum(len(g["negatives"]) for g in got)
    assert 0 < dropped < sum(len(g["negatives"]) for g in plain)
    assert spec.report.counts["negatives dropped by the reranker filter"] == dropped
    # Everything but the negatives is as without the filter.
    strip = copy.deepcopy(got)
    for a, b in zip(strip, plain, strict=True):
        a["negatives"] = b["negatives"]
    assert strip == plain


def test_mine_routes_the_filter_through_the_configured_pool(
    tiny_bert_dir, tiny_reranker_dir, toy_data, tmp_path, monkeypatch
):
    """`raysys mine` with a reranker filter: no Scorer on the driver; the
    rerank stage gets ``reranker.pool`` (here use_gpu) and its scores decide."""
    import contextlib

    import pyarrow as pa

    import raysys.models.reranker
    import raysys.search.rerank
    import raysys.search.retrieve
    import raysys.stages
    from raysys.config import load_config
    from raysys.search.mine import mine

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text((toy_data / "corpus.jsonl").read_text())
    run, queries, qrels, _ = _toy_mining(toy_data)
    with (beir / "queries.jsonl").open("w") as f:
        for q, t in queries.items():
            f.write(json.dumps({"_id": q, "text": t}) + "\n")
    (beir / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(f"{q}\t{d}\t1\n" for q, ds in qrels.items() for d in ds)
    )
    monkeypatch.setattr(raysys.stages, "encode_stage", lambda *a, **k: {"corpus": {}})
    monkeypatch.setattr(raysys.stages, "exact_search_stage", lambda *a, **k: run)
    monkeypatch.setattr(
        raysys.search.retrieve, "QueryEncoder", lambda *a, **k: contextlib.nullcontext()
    )

    def no_driver_scorer(*a, **k):
        raise AssertionError("the reranker filter built a Scorer on the driver")

    monkeypatch.setattr(raysys.models.reranker, "Scorer", no_driver_scorer)
    calls = []

    def stage(pairs, model_path, pool):  # positives 1.0; even-numbered negatives 0.95
        calls.append((model_path, pool))
        qids, dids = pairs.column("qid").to_pylist(), pairs.column("docid").to_pylist()
        s = [
            1.0 if d in qrels[q] else 0.95 if int(d[1:]) % 2 == 0 else 0.0
            for q, d in zip(qids, dids, strict=True)
        ]
        return pa.table({"qid": qids, "docid": dids, "score": pa.array(s, pa.float64())})

    monkeypatch.setattr(raysys.search.rerank, "score_pairs_ray", stage)
    cfg = load_config(
        None,
        [
            f"model={tiny_bert_dir}",
            f"data={beir}",
            "contract.pooling=cls",
            f"mine.reranker={tiny_reranker_dir}",
            "mine.margin=0.1",
            "mine.rank_from=0",
            "mine.rank_to=20",
            "mine.n=10",
            "reranker.pool.use_gpu=true",
            "reranker.pool.micro_batch=3",
        ],
    )
    out = tmp_path / "mined.jsonl"
    summary = mine(cfg, out)
    assert len(calls) == 1 and calls[0][1] is cfg.reranker.pool and calls[0][1].use_gpu
    assert calls[0][0] == str(tiny_reranker_dir)
    mined = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(mined) == 8
    for g in mined:
        assert g["negatives"] and all(int(d[1:]) % 2 == 1 for d in g["negatives"])
    assert summary["reranker_filter"]["pool"]["use_gpu"] is True
    assert summary["skipped"]["negatives dropped by the reranker filter"] > 0


@pytest.mark.slow
def test_mining_filter_on_a_ray_pool_keeps_what_the_driver_kept(
    ray_local, tiny_reranker_dir, toy_data
):
    """On a real actor pool: the same scores and kept negatives as the old
    driver-side filter."""
    from raysys.config import PoolConfig

    run, queries, qrels, corpus = _toy_mining(toy_data)
    plain = mine_groups(run, queries, qrels, MineSpec(0, 20, 10, seed=3))
    pool = PoolConfig(actors=1, micro_batch=4, batch_size=16)
    _, scores = _old_driver_filter(plain, queries, corpus, str(tiny_reranker_dir), pool, None)
    margin = _margin_splitting(plain, scores)
    want, _ = _old_driver_filter(plain, queries, corpus, str(tiny_reranker_dir), pool, margin)
    spec = MineSpec(0, 20, 10, seed=3, margin=margin)
    got = mine_groups(run, queries, qrels, spec, str(tiny_reranker_dir), corpus, pool)
    assert {g["query_id"]: g["negatives"] for g in got} == want
    assert spec.report.counts["negatives dropped by the reranker filter"] > 0
