"""Reranker: losses by hand, mining never emits a positive, the rerank stage keeps
every candidate, and a tiny decoder reranker trains under ZeRO-3 on 2 workers."""

import json
import math

import pyarrow as pa
import pytest
import torch

from raysys.config import ConfigError, load_config
from raysys.losses import grouped_ce, pointwise_bce
from raysys.models.reranker import RerankContract, Reranker, Scorer, export_reranker
from raysys.search.mine import MineSpec, filter_false_negatives, mine_groups, sample_negatives


def test_grouped_ce_equals_hand_value():
    scores = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    g1 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
    g2 = -math.log(1 / (1 + 1 + math.exp(1)))
    assert grouped_ce(scores, 3).item() == pytest.approx((g1 + g2) / 2, abs=1e-6)


def test_pointwise_bce_equals_hand_value():
    scores = torch.tensor([2.0, -1.0, 0.5, 0.0])

    def sig(x):
        return 1 / (1 + math.exp(-x))

    hand = -(math.log(sig(2)) + math.log(1 - sig(-1)) + math.log(sig(0.5)) + math.log(0.5)) / 4
    assert pointwise_bce(scores, 2).item() == pytest.approx(hand, abs=1e-6)


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


def test_rerank_config_errors():
    with pytest.raises(ConfigError, match="reranker.path"):
        load_config(None, ["train.task=rerank"])
    with pytest.raises(ConfigError, match="group_size"):
        load_config(None, ["train.task=rerank", "reranker.path=x", "train.group_size=1"])
    with pytest.raises(ConfigError, match="template"):
        load_config(None, ["train.task=rerank", "reranker.path=x", "reranker.template=foo"])


def test_pair_format_and_truncation_keeps_eos(tiny_llama_dir):
    from raysys.models.embedder import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    c = RerankContract(model="m", pooling="last", append_eos=True, max_len=10)
    assert c.format_pair("q", "T", "body") == "query: q document: T body"
    assert c.format_pair("q", "", "body") == "query: q document: body"
    ids = c.token_ids(tok, [c.format_pair("q", "", " ".join(["w1"] * 50))])[0]
    assert len(ids) == 10 and ids[-1] == tok.eos_token_id


@pytest.fixture(scope="module")
def tiny_reranker(tiny_bert_dir, tmp_path_factory):
    from transformers import AutoModel

    from raysys.models.embedder import load_tokenizer

    torch.manual_seed(0)
    model = Reranker(
        AutoModel.from_pretrained(tiny_bert_dir),
        RerankContract(model=str(tiny_bert_dir), pooling="cls", max_len=32),
    )
    out = tmp_path_factory.mktemp("rr") / "reranker"
    head = {k: v for k, v in model.head.state_dict().items()}
    return export_reranker(model, head, load_tokenizer(str(tiny_bert_dir)), out)


def test_rerank_stage_keeps_every_candidate(ray_local, tiny_reranker, toy_data):
    from raysys.config import RerankerConfig
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
    rcfg = RerankerConfig(path=str(tiny_reranker), topk=10, batch_size=16, micro_batch=4)
    out, report, alone = rerank_run(run, queries, corpus, str(tiny_reranker), rcfg)
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
            "train.num_workers=2",
            "train.per_device_queries=4",
            "train.group_size=4",
            "train.lr=5e-3",
            "train.head_lr=1e-2",  # a separate optimizer group under ZeRO-3
            "train.max_steps=30",
            "train.log_steps=5",
            "train.run_name=rerank-z3",
            f"train.storage_path={tmp_path / 'ray'}",
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
def test_mine_command_end_to_end(ray_local, tiny_bert_dir, toy_data, tmp_path):
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
    out = tmp_path / "mined.jsonl"
    rc = main(
        [
            "mine",
            "-",
            f"model={tiny_bert_dir}",
            f"data={beir}",
            "contract.pooling=cls",
            "--out",
            str(out),
            "--ranks",
            "2:20",
            "--n",
            "5",
        ]
    )
    assert rc == 0
    mined = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(mined) == len(groups)
    for g in mined:
        assert len(g["negatives"]) == 5 and g["positives"][0] not in g["negatives"]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["groups"] == len(groups) and summary["ranks"] == [2, 20]
    # The file reads back as training groups against the corpus.
    ts = read_groups(out, read_corpus(beir / "corpus.jsonl"))
    assert len(ts) == len(groups) and all(len(n) == 5 for n in ts.negatives)


def test_head_lr_gives_the_score_head_its_own_scheduled_rate():
    import torch
    from torch import nn

    from raysys.config import load_config
    from raysys.train.engine import param_groups, warmup_linear

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)

    t = load_config(None, ["train.lr=1e-4", "train.head_lr=1e-2", "train.warmup_ratio=0.5"]).train
    groups = [g for g in param_groups(Toy(), t) if g["params"]]
    head = [g for g in groups if g.get("lr") == 1e-2]
    assert len(head) == 1 and sum(p.numel() for p in head[0]["params"]) == 5
    assert sum(len(g["params"]) for g in groups) == 4
    opt = torch.optim.AdamW(groups, lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(4, t.warmup_ratio))
    assert sched.get_last_lr() == pytest.approx([0.5e-4, 0.5e-4, 0.5e-2])
    # Without head_lr the head trains at train.lr with the body.
    t0 = load_config(None, ["train.lr=1e-4"]).train
    assert [len(g["params"]) for g in param_groups(Toy(), t0)] == [2, 2, 0]


@pytest.mark.parametrize(
    ("cpus", "actors", "per", "want"),
    [
        (2, 0, 1.0, (1, 1.0)),  # the default on 2 CPUs: runs
        (2, 2, 0.75, (1, 0.75)),  # hung Ray Data 2.60 (tokenize starved): capped
        (2, 1, 4.0, (1, 1.0)),
        (16, 4, 2.0, (4, 2.0)),
        (16, 8, 2.0, (4, 2.0)),
    ],
)
def test_cpu_actor_pool_leaves_half_the_cluster_to_the_other_stages(cpus, actors, per, want):
    from raysys.pool import pool_size

    class FakeRay:
        @staticmethod
        def cluster_resources() -> dict[str, float]:
            return {"CPU": float(cpus)}

    assert pool_size(FakeRay, actors, False, per) == want


def test_actor_threads_come_from_the_config_else_the_node_cores_per_actor(monkeypatch):
    import torch

    from raysys.pool import set_actor_threads

    before = torch.get_num_threads()
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    try:
        assert set_actor_threads({"torch_threads": 3, "actors": 2}) == 3
        assert torch.get_num_threads() == 3
        assert set_actor_threads({"torch_threads": 0, "actors": 2}) == 4
        assert set_actor_threads({"actors": 16}) == 1
    finally:
        torch.set_num_threads(before)
