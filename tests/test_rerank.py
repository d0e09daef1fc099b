"""Reranker: contract and config errors, the rerank stage keeps every candidate,
score mixing, and a tiny decoder reranker trains under ZeRO-3 on 2 workers."""

import json
import math

import pyarrow as pa
import pytest
import torch

from raysys.config import ConfigError, load_config
from raysys.models.reranker import RerankContract, Reranker, Scorer, export_reranker


def test_rerank_config_errors():
    with pytest.raises(ConfigError, match="reranker.path"):
        load_config(None, ["train.task=rerank"])
    with pytest.raises(ConfigError, match="group_size"):
        load_config(None, ["train.task=rerank", "reranker.path=x", "train.group_size=1"])
    with pytest.raises(ConfigError, match="template"):
        load_config(None, ["train.task=rerank", "reranker.path=x", "reranker.template=foo"])


def test_pair_format_and_truncation_keeps_eos(tiny_llama_dir):
    from raysys.models.backbone import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    c = RerankContract(model="m", pooling="last", append_eos=True, max_len=10)
    assert c.format_pair("q", "T", "body") == "query: q document: T body"
    assert c.format_pair("q", "", "body") == "query: q document: body"
    ids = c.token_ids(tok, [c.format_pair("q", "", " ".join(["w1"] * 50))])[0]
    assert len(ids) == 10 and ids[-1] == tok.eos_token_id


@pytest.fixture(scope="module")
def tiny_reranker(tiny_bert_dir, tmp_path_factory):
    from transformers import AutoModel

    from raysys.models.backbone import load_tokenizer

    torch.manual_seed(0)
    model = Reranker(
        AutoModel.from_pretrained(tiny_bert_dir),
        RerankContract(model=str(tiny_bert_dir), pooling="cls", max_len=32),
    )
    out = tmp_path_factory.mktemp("rr") / "reranker"
    head = {k: v for k, v in model.head.state_dict().items()}
    return export_reranker(model, head, load_tokenizer(str(tiny_bert_dir)), out)


@pytest.mark.slow
def test_rerank_stage_keeps_every_candidate(ray_local, tiny_reranker, toy_data):
    from raysys.config import PoolConfig, RerankerConfig
    from raysys.data.readers import read_corpus
    from raysys.search.rerank import rerank_run

    corpus = read_corpus(toy_data / "corpus.jsonl")
    ids = corpus.column("id").to_pylist()
    run = {}
    for q in range(12):
        cands = ids[q : q + 25]
        run[f"q{q}"] = {d: 10.0 - r * 0.1 for r, d in enumerate(cands)}
    run["q3"]["ghost-doc"] = 100.0  # not in the corpus: kept unscored, counted
    run["q_empty"] = {}
    queries = {f"q{q}": f"topic w{q}" for q in range(12)} | {"q_empty": "nothing"}
    rcfg = RerankerConfig(
        path=str(tiny_reranker), topk=10, pool=PoolConfig(batch_size=16, micro_batch=4)
    )
    out, report, alone, _ = rerank_run(run, queries, corpus, str(tiny_reranker), rcfg)
    assert alone is None  # weight 1: the reranker alone is the final run
    assert report.counts["queries with no candidates"] == 1
    assert report.counts["candidates missing from the corpus (kept unscored)"] == 1
    # Every candidate exactly once (dicts cannot hold duplicates; sizes and sets match).
    for qid, hits in run.items():
        if not hits:
            continue
        assert set(out[qid]) == set(hits)
        first = sorted(hits, key=lambda d: -hits[d])[:10]
        ranked_out = sorted(out[qid], key=lambda d: (-out[qid][d], d))
        assert set(ranked_out[:10]) - {"ghost-doc"} == set(first) - {"ghost-doc"}
        tail = [d for d in sorted(hits, key=lambda d: -hits[d])[10:]]
        assert [d for d in ranked_out if d in tail] == tail  # first-stage order kept
    # Scores are the reranker's, each on its own pair (a plain loop agrees).
    scorer = Scorer(tiny_reranker)
    row = {d: i for i, d in enumerate(ids)}
    top = sorted(run["q5"], key=lambda d: -run["q5"][d])[:10]
    docs = [
        (corpus.column("title")[row[d]].as_py(), corpus.column("text")[row[d]].as_py()) for d in top
    ]
    plain = scorer.score(["topic w5"] * 10, docs)
    assert [out["q5"][d] for d in top] == pytest.approx(plain, abs=1e-5)


def test_assemble_refuses_lost_pairs():
    from raysys.search.rerank import assemble_run

    pairs = pa.table({"qid": ["a", "a"], "docid": ["x", "y"]})
    scored = pa.table({"qid": ["a"], "docid": ["x"], "score": [1.0]})
    with pytest.raises(RuntimeError, match="lost or duplicated"):
        assemble_run(scored, pairs, {"a": ([], [])}, keep_tail=True)


def test_score_interpolation_mixes_normalised_scores_and_keeps_the_tail():
    from raysys.search.rerank import assemble_run

    first = {"a": {"x": 30.0, "y": 20.0, "z": 10.0, "t": 5.0}}
    pairs = pa.table({"qid": ["a"] * 3, "docid": ["x", "y", "z"]})
    # Reranker: z > y > x, first stage: x > y > z.
    scored = pa.table({"qid": ["a"] * 3, "docid": ["z", "y", "x"], "score": [4.0, 3.0, 0.0]})
    tails = {"a": ([], ["t"])}
    only = assemble_run(scored, pairs, tails, keep_tail=True)["a"]
    assert sorted(only, key=lambda d: -only[d]) == ["z", "y", "x", "t"]
    mixed = assemble_run(scored, pairs, tails, keep_tail=True, first=first, weight=0.25)["a"]
    # x: 0.25*0 + 0.75*1 = 0.75; y: 0.25*0.75 + 0.75*0.5 = 0.5625; z: 0.25*1 + 0 = 0.25.
    assert mixed["x"] == pytest.approx(0.75)
    assert mixed["y"] == pytest.approx(0.5625)
    assert mixed["z"] == pytest.approx(0.25)
    assert sorted(mixed, key=lambda d: -mixed[d]) == ["x", "y", "z", "t"]
    with pytest.raises(ValueError, match="first-stage"):
        assemble_run(scored, pairs, tails, keep_tail=True, weight=0.5)


@pytest.mark.slow
def test_tiny_decoder_reranker_trains_under_zero3(ray_local, tiny_llama_dir, tmp_path):
    """The machinery under test: ZeRO-3 partitioning on 2 workers, EOS/last pooling,
    LoRA, grouped CE, export. The toy positives carry a cue token, which a 2-layer
    model learns in a few dozen steps (SciFact is the real-task evidence)."""
    from raysys.train.launch import run_training
    from tests.helpers import toy_groups

    toy_data = toy_groups(tmp_path, cue=True)
    cfg = load_config(
        None,
        [
            "train.task=rerank",
            f"reranker.path={tiny_llama_dir}",
            "reranker.random_init=false",
            "reranker.pooling=last",
            "reranker.append_eos=true",
            "reranker.max_len=32",
            "reranker.lora.enabled=true",
            "reranker.lora.r=16",
            "reranker.lora.dropout=0.0",
            "reranker.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
            f"data.groups={toy_data / 'groups.jsonl'}",
            f"data.corpus={toy_data / 'corpus.jsonl'}",
            "train.zero_stage=3",
            "train.scaling.num_workers=2",
            "train.per_device_queries=4",
            "train.group_size=4",
            "train.optim.lr=5e-3",
            "train.optim.head_lr=1e-2",  # a separate optimizer group under ZeRO-3
            "train.max_steps=30",
            "train.log_steps=5",
            "train.checkpoint.run_name=rerank-z3",
            f"train.checkpoint.storage_path={tmp_path / 'ray'}",
        ],
    )
    outcome = run_training(cfg, tmp_path / "out")
    losses = [h["loss"] for h in outcome.history]
    assert outcome.finished and losses[0] > math.log(4) * 0.8  # starts near chance
    assert losses[-1] < 0.3 * losses[0], losses
    # The export reloads and scores its probe pairs as training did.
    probe = json.loads((outcome.model_dir / "train_probe.json").read_text())
    scorer = Scorer(outcome.model_dir)
    ids = scorer.contract.token_ids(scorer.tokenizer, probe["pairs"])
    assert all(x[-1] == scorer.tokenizer.eos_token_id for x in ids)
    assert scorer.score_ids(ids) == pytest.approx(probe["scores"], abs=1e-4)


@pytest.mark.slow
def test_teacher_scores_every_group_passage(ray_local, tiny_reranker, toy_data, tmp_path):
    """`raysys teacher`'s function: one reranker score per positive and per
    negative, equal to the reranker's own on the pair; the groups read back
    with the scores, and training with distillation uses them."""
    import json

    from raysys.config import load_config
    from raysys.data.groups import read_groups
    from raysys.data.readers import read_corpus
    from raysys.search.teacher import annotate_groups

    cfg = load_config(
        None,
        [
            f"data.corpus={toy_data / 'corpus.jsonl'}",
            f"reranker.path={tiny_reranker}",
            "data.max_queries=6",
            "reranker.pool.batch_size=8",
        ],
    )
    out = tmp_path / "teacher.jsonl"
    summary = annotate_groups(cfg, toy_data / "groups.jsonl", out)
    assert summary["groups"] == 6 and summary["pairs"] == 6 * 4
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    src = [json.loads(x) for x in (toy_data / "groups.jsonl").read_text().splitlines()][:6]
    assert [r["negatives"] for r in recs] == [s["negatives"] for s in src]
    corpus = read_corpus(toy_data / "corpus.jsonl")
    text = dict(
        zip(corpus.column("id").to_pylist(), corpus.column("text").to_pylist(), strict=True)
    )
    r = recs[2]
    plain = Scorer(tiny_reranker).score(
        [r["query"]] * 4, [("", text[d]) for d in r["positives"] + r["negatives"]]
    )
    assert r["pos_scores"] + r["neg_scores"] == pytest.approx(plain, abs=1e-5)
    ts = read_groups(out, corpus)
    assert ts.teacher_scores(2, ts.positives[2] + ts.negatives[2]) == pytest.approx(plain, abs=1e-5)
