"""Rerank throughput: the Ray Data actor-pool stage (`raysys rerank`) against a
plain single-process loop over the same pairs, same model, same machine.

    .venv/bin/python benchmarks/rerank_throughput.py --run runs/base/run.trec

Pairs: the top ``--topk`` candidates of the first ``--queries`` test queries of
a SciFact run. Model: ``--reranker`` (a raysys reranker export), else
all-MiniLM-L6-v2 with an untrained score head (throughput does not depend on
the head's weights). The plain loop formats and tokenizes every pair and
scores them longest-first in micro-batches with all cores; the stage
tokenizes in Ray Data tasks and scores on the actor pool. Both scores must
agree. Writes benchmarks/results/rerank_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _results import write_results

from raysys.config import PoolConfig, RerankerConfig
from raysys.data.readers import BeirFolder, Report
from raysys.search.rerank import candidate_pairs, rerank_run
from raysys.search.runfile import read_run


def untrained_reranker(out: Path) -> Path:
    from transformers import AutoModel

    from raysys.models.backbone import load_tokenizer
    from raysys.models.hub import resolve_model
    from raysys.models.reranker import RerankContract, Reranker, export_reranker

    path = resolve_model("all-MiniLM-L6-v2")
    torch.manual_seed(0)
    model = Reranker(
        AutoModel.from_pretrained(path), RerankContract(model=path, pooling="cls", max_len=256)
    )
    return export_reranker(model, model.head.state_dict(), load_tokenizer(path), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/scifact")
    )
    ap.add_argument("--run", required=True, help="first-stage TREC run on the test split")
    ap.add_argument("--reranker", help="a raysys reranker export")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--micro-batch", type=int, default=32)
    args = ap.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    beir = BeirFolder(Path(args.data))
    queries = beir.queries()
    run = read_run(args.run)
    qids = sorted(q for q in run if q in queries)[: args.queries]
    run = {q: run[q] for q in qids}
    corpus = beir.corpus()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.reranker or str(untrained_reranker(Path(tmp) / "rr"))
        rcfg = RerankerConfig(
            path=model, topk=args.topk, pool=PoolConfig(micro_batch=args.micro_batch)
        )
        pairs, _ = candidate_pairs(run, queries, corpus, args.topk, Report())
        n = pairs.num_rows

        from raysys.models.reranker import Scorer

        t0 = time.perf_counter()
        scorer = Scorer(model, opts={"micro_batch": args.micro_batch})
        plain = scorer.score(
            pairs.column("query").to_pylist(),
            list(
                zip(
                    pairs.column("title").to_pylist(), pairs.column("text").to_pylist(), strict=True
                )
            ),
        )
        plain_s = time.perf_counter() - t0
        del scorer

        t0 = time.perf_counter()
        out = rerank_run(run, queries, corpus, model, rcfg).run
        stage_s = time.perf_counter() - t0
    stage = [
        out[q][d]
        for q, d in zip(
            pairs.column("qid").to_pylist(), pairs.column("docid").to_pylist(), strict=True
        )
    ]
    res = {
        "setup": {**vars(args), "pairs": n, "cores": torch.get_num_threads()},
        "plain_loop": {"pairs_per_s": n / plain_s, "seconds": plain_s},
        "raysys_stage": {"pairs_per_s": n / stage_s, "seconds": stage_s},
        "ratio_stage_vs_plain": plain_s / stage_s,
        "max_abs_score_diff": float(np.max(np.abs(np.array(stage) - np.array(plain)))),
    }
    out_path = Path(__file__).parent / "results" / "rerank_throughput.json"
    out_path.parent.mkdir(exist_ok=True)
    write_results(out_path, res, "benchmarks/rerank_throughput.py")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
