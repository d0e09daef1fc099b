"""The M3 model (#18): its three outputs, export and reload, and encoding a
corpus into every representation's index."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raysys.models.embedder import load_embedder
from raysys.models.m3 import REPRESENTATIONS, M3Embedder, export_m3
from tests.helpers import tiny_m3

_m3 = tiny_m3


def test_outputs_mask_special_and_padding_tokens(tiny_bert_dir) -> None:
    m, tok, c = _m3(tiny_bert_dir)
    texts = ["alpha beta gamma alpha", "beta"]
    enc = c.tokenize(tok, texts, "passage")
    with torch.no_grad():
        out = m.represent(enc["input_ids"], enc["attention_mask"])
        alone = m.represent(*c.tokenize(tok, texts[1:], "passage").values())
    assert out["dense"].shape == (2, m.hidden_size)
    ids, w = out["sparse"].ids, out["sparse"].weights
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    assert (w[special] == 0).all() and (w[~special & enc["attention_mask"].bool()] >= 0).all()
    mv = out["multivector"]
    assert mv.vectors.shape[-1] == 8
    # every attended token but the first ([CLS]); padding never counts
    assert mv.mask.sum(1).tolist() == [int(x) - 1 for x in enc["attention_mask"].sum(1)]
    assert torch.allclose(mv.vectors[mv.mask.bool()].norm(dim=-1), torch.ones(1), atol=1e-5)
    # the padded row equals the text encoded alone
    n = int(alone["multivector"].mask.sum())
    torch.testing.assert_close(
        mv.vectors[1][mv.mask[1].bool()],
        alone["multivector"].vectors[0][: n + 1][1:],
        atol=1e-5,
        rtol=1e-5,
    )
    torch.testing.assert_close(out["dense"][1], alone["dense"][0], atol=1e-5, rtol=1e-5)


def test_export_reloads_every_head(tiny_bert_dir, tmp_path) -> None:
    m, tok, c = _m3(tiny_bert_dir)
    with torch.no_grad():
        m.sparse_head.weight.normal_()  # not the init a reload would draw
        m.sparse_head.bias.fill_(0.5)
    out = export_m3(m.backbone, m.heads_state(), tok, c, tmp_path / "m3")
    saved = json.loads((out / "raysys_contract.json").read_text())
    assert saved["representations"] == REPRESENTATIONS and saved["multivector_dim"] == 8
    loaded, tok2 = load_embedder(str(out))
    assert isinstance(loaded, M3Embedder)
    enc = c.tokenize(tok, ["alpha beta", "gamma"], "query")
    with torch.no_grad():
        a = m.represent(enc["input_ids"], enc["attention_mask"])
        b = loaded.represent(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(a["dense"], b["dense"])
    torch.testing.assert_close(a["sparse"].weights, b["sparse"].weights)
    torch.testing.assert_close(a["multivector"].vectors, b["multivector"].vectors)
    (out / "m3_heads.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        load_embedder(str(out))


def _beir(root, n_docs=120, n_queries=16):  # noqa: ANN001, ANN202
    rng = np.random.default_rng(0)
    (root / "qrels").mkdir(parents=True)
    docs = [" ".join(f"w{int(x)}" for x in rng.integers(0, 150, size=10)) for _ in range(n_docs)]
    (root / "corpus.jsonl").write_text(
        "".join(
            json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(docs)
        )
    )
    qs = {f"q{i}": " ".join(docs[3 * i].split()[:4]) for i in range(n_queries)}
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in qs.items())
    )
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{3 * i}\t1\n" for i in range(n_queries))
    )
    return docs, qs


@pytest.mark.slow
def test_an_m3_export_searches_in_every_mode(ray_local, tiny_bert_dir, tmp_path) -> None:
    """The pipeline with train.enabled=false over an M3 export writes every
    mode's metrics; the hybrid run's scores are 1 x dense + 0.3 x sparse +
    1 x multi-vector of the model's own outputs."""
    from raysys.config import load_config
    from raysys.pipeline import run_pipeline
    from raysys.representations import get_representation

    m, tok, c = _m3(tiny_bert_dir, passage_max_len=32, query_max_len=16)
    export = export_m3(m.backbone, m.heads_state(), tok, c, tmp_path / "m3")
    docs, qs = _beir(tmp_path / "beir")
    cfg = load_config(
        None,
        [
            f"model={export}",
            f"data={tmp_path / 'beir'}",
            "train.enabled=false",
            "index.factory=Flat",
            "search.mode=hybrid",
            "search.hybrid_candidates=20",
            "encode.shard_size=50",
        ],
    )
    metrics = run_pipeline(cfg, tmp_path / "out")
    by_mode = json.loads((tmp_path / "out" / "metrics_by_mode.json").read_text())
    assert sorted(by_mode) == ["dense", "hybrid", "multivector", "sparse"]
    for v in by_mode.values():
        assert set(v) == {"nDCG@10", "MRR@10", "Recall@100", "Recall@1000"}
    assert metrics == by_mode["hybrid"]
    assert (tmp_path / "out" / "index" / "sparse" / "manifest.json").is_file()
    # Recompute the hybrid scores of some hits from the model directly.
    from raysys.search.runfile import read_run

    run = read_run(tmp_path / "out" / "run.trec")
    model, tok2 = load_embedder(str(export))
    for qid in ["q0", "q5"]:
        hits = list(run[qid].items())[:5]
        q = model.represent_texts(tok2, [qs[qid]], "query")
        p = model.represent_texts(tok2, [docs[int(d[1:])] for d, _ in hits], "passage")
        expect = sum(
            w * get_representation(h).score(q[h][0], p[h])
            for h, w in (("dense", 1.0), ("sparse", 0.3), ("multivector", 1.0))
        )
        np.testing.assert_allclose([s for _, s in hits], expect, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_the_m3_recipe_mines_trains_and_searches_every_mode(ray_local, tiny_bert_dir, tmp_path):
    """`raysys pipeline jobs/scifact_m3.yaml` on a tiny BEIR folder with a tiny
    model: the mine stage writes the groups the m3 task trains on, and the
    export is searched in every mode."""
    import subprocess
    import sys

    docs, qs = _beir(tmp_path / "beir", n_docs=90, n_queries=24)
    qrels = (tmp_path / "beir" / "qrels" / "test.tsv").read_text().splitlines()
    (tmp_path / "beir" / "qrels" / "train.tsv").write_text("\n".join(qrels[:1] + qrels[9:]) + "\n")
    (tmp_path / "beir" / "qrels" / "test.tsv").write_text("\n".join(qrels[:9]) + "\n")
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "raysys.cli", "pipeline", "jobs/scifact_m3.yaml",
        f"data={tmp_path / 'beir'}", f"model={tiny_bert_dir}", "train.max_steps=3",
        "train.per_device_queries=4", "mine.rank_from=0", "mine.rank_to=20", "mine.n=6",
        "contract.passage_max_len=32", "contract.query_max_len=16", "train.m3.multivector_dim=16",
        f"train.checkpoint.storage_path={tmp_path / 'ray'}", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    groups = [json.loads(x) for x in (out / "mine" / "groups.jsonl").read_text().splitlines()]
    assert len(groups) == 16 and all(len(g["negatives"]) == 6 for g in groups)
    summary = json.loads((out / "train" / "train_summary.json").read_text())
    assert len(summary["history"]) == 3
    by_mode = json.loads((out / "metrics_by_mode.json").read_text())
    assert sorted(by_mode) == ["dense", "hybrid", "multivector", "sparse"]
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(by_mode["hybrid"])
    assert "by search mode" in (out / "report.md").read_text()
