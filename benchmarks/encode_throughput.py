"""Corpus encoding throughput: `raysys encode` (Ray Data, actor pool) against
sentence-transformers `encode` on the same model, corpus and machine.

    .venv/bin/python benchmarks/encode_throughput.py --data ../shared/data/scifact

Each raysys variant (fp32, and the CPU levers: bf16, dynamic int8 with
per-channel or per-tensor scales, optionally with the FFN down-projections
left in fp32) is timed end to end (prepare + Ray Data
encode, Ray already up) and checked for quality: SciFact nDCG@10 with exact
search must stay within 0.005 of fp32. Writes
benchmarks/results/encode_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import write_results

from raysys.config import load_config
from raysys.data.readers import BeirFolder
from raysys.eval import evaluate
from raysys.index.encode import EMB_DIR, encode_corpus, read_embeddings
from raysys.models.embedder import load_embedder
from raysys.models.hub import resolve_model

OVERRIDES = ["contract.pooling=mean", "contract.query_max_len=256", "contract.passage_max_len=256"]


def ndcg(beir: BeirFolder, ids: list[str], vecs: np.ndarray, cfg) -> float:
    qrels = beir.qrels("test")
    queries = beir.queries()
    qids = sorted(q for q in qrels if q in queries)
    model, tok = load_embedder(cfg.model.path, "cpu", cfg.encoding_contract())
    q = model.encode_texts(tok, [queries[x] for x in qids], "query").numpy()
    scores = q @ vecs.T
    top = np.argsort(-scores, axis=1)[:, :100]
    run = {qid: {ids[j]: float(scores[i, j]) for j in top[i]} for i, qid in enumerate(qids)}
    return evaluate(qrels, run)["nDCG@10"]


def st_encode(beir: BeirFolder, batch_size: int) -> tuple[float, list[str], np.ndarray]:
    from sentence_transformers import SentenceTransformer

    corpus = beir.corpus()
    ids = corpus.column("id").to_pylist()
    texts = [
        f"{t} {x}" if t else x
        for t, x in zip(
            corpus.column("title").to_pylist(), corpus.column("text").to_pylist(), strict=True
        )
    ]
    model = SentenceTransformer(str(resolve_model("all-MiniLM-L6-v2")), device="cpu")
    model.max_seq_length = 256
    t0 = time.perf_counter()
    vecs = model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    return time.perf_counter() - t0, ids, np.asarray(vecs, dtype=np.float32)


def raysys_encode(beir: BeirFolder, extra: list[str]) -> tuple[float, list[str], np.ndarray]:
    cfg = load_config(None, OVERRIDES + extra)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        m = encode_corpus(
            beir.corpus_path, tmp, cfg.model.path, cfg.encoding_contract(), cfg.encode
        )
        secs = time.perf_counter() - t0
        ids, vecs = [], []
        for s in m["shards"]:
            i, v = read_embeddings(Path(tmp) / EMB_DIR, s["name"])
            ids += i
            vecs.append(v)
    return secs, ids, np.concatenate(vecs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/scifact")
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--variants",
        default="fp32,int8,int8_ffn_down_fp32",
        help="raysys variants to run, of fp32, bf16, int8 (per-channel), int8_per_tensor, "
        "int8_ffn_down_fp32 (per-tensor, FFN down-projections in fp32) "
        "(bf16 only pays off on CPUs with AVX512-BF16/AMX)",
    )
    args = ap.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    beir = BeirFolder(Path(args.data))
    cfg = load_config(None, OVERRIDES)
    import os

    import torch

    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    res: dict = {
        "setup": {
            **vars(args),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags,
        }
    }
    out = Path(__file__).parent / "results" / "encode_throughput.json"
    out.parent.mkdir(exist_ok=True)
    secs, ids, vecs = st_encode(beir, args.batch_size)
    res["sentence_transformers"] = {
        "docs_per_s": len(ids) / secs,
        "nDCG@10": ndcg(beir, ids, vecs, cfg),
    }
    write_results(out, res, "benchmarks/encode_throughput.py")  # partial results survive an interruption
    variants = {
        "fp32": [],
        "bf16": ["encode.pool.bf16=true"],
        "int8": ["encode.pool.int8=true"],
        "int8_per_tensor": ["encode.pool.int8=true", "encode.pool.int8_per_channel=false"],
        "int8_ffn_down_fp32": [
            "encode.pool.int8=true",
            "encode.pool.int8_per_channel=false",
            "encode.pool.int8_ffn_down_fp32=true",
        ],
    }
    wanted = ["fp32"] + [v for v in args.variants.split(",") if v != "fp32"]
    for name, extra in ((f"raysys_{v}", variants[v]) for v in wanted):
        secs, ids, vecs = raysys_encode(beir, extra)
        res[name] = {"docs_per_s": len(ids) / secs, "nDCG@10": ndcg(beir, ids, vecs, cfg)}
        res[name]["ratio_vs_st"] = (
            res[name]["docs_per_s"] / res["sentence_transformers"]["docs_per_s"]
        )
        res[name]["ndcg_within_0.005_of_fp32"] = (
            abs(res[name]["nDCG@10"] - res["raysys_fp32"]["nDCG@10"]) <= 0.005
        )
        write_results(out, res, "benchmarks/encode_throughput.py")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
