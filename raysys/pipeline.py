"""``raysys pipeline``: train -> encode -> index -> search -> rerank -> evaluate
from one config, each step a function of :mod:`raysys.stages`.

Writes into the output folder: ``metrics.json`` (nDCG@10, MRR@10, Recall@100,
Recall@1000 of the final run: reranked when the rerank stage ran), the run
file(s) (``run.trec``, ``run.rerank.trec``), ``report.md`` and ``nprobe.png``
(Recall@100 and nDCG@10 against nprobe for the built index).

``train.task=rerank`` makes the train stage train the reranker (from
``reranker.path``); the retrieval stages then use ``model.path`` as it is.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from raysys.config import Config, ConfigError, to_dict
from raysys.data.readers import BeirFolder
from raysys.eval import write_metrics
from raysys.report import plot_nprobe, write_report
from raysys.search.retrieve import QueryEncoder
from raysys.search.runfile import write_run
from raysys.stages import (
    encode_stage,
    evaluate_stage,
    index_stage,
    rerank_stage,
    search_stage,
    train_stage,
    tuning_queries,
)

log = logging.getLogger(__name__)


def run_pipeline(cfg: Config, out_dir: str | Path) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = list(cfg.stages)
    if not cfg.train.enabled and "train" in stages:
        stages.remove("train")
    if not cfg.data.path:
        raise ConfigError("data: set data=PATH to a BEIR folder")
    beir = BeirFolder(Path(cfg.data.path), on_bad_line=cfg.data.on_bad_line)
    timings: dict[str, float] = {}
    notes: list[str] = []
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    model: str = cfg.model.path
    contract = cfg.encoding_contract()
    reranker = cfg.reranker.path
    train_summary = None
    if "train" in stages:
        t0 = time.perf_counter()
        outcome = train_stage(cfg, out / "train")
        timings["train"] = time.perf_counter() - t0
        if outcome.model_dir is None:
            raise RuntimeError(
                "training stopped before the end (train.checkpoint.stop_after?); no model to use"
            )
        if cfg.train.task == "rerank":
            reranker = str(outcome.model_dir)
        else:
            model, contract = str(outcome.model_dir), None  # the export carries its contract
        train_summary = outcome
    encoder = QueryEncoder(model, contract)
    emb_dir, index_dir = out / "encode", out / "index"
    if "encode" in stages:
        t0 = time.perf_counter()
        m = encode_stage(cfg, beir.corpus_path, emb_dir, model, contract)
        timings["encode"] = time.perf_counter() - t0
        skipped = m["corpus"].get("skipped") or {}
        if skipped:
            notes.append(f"corpus: skipped {skipped}")
    if "index" in stages:
        t0 = time.perf_counter()
        index_stage(cfg, emb_dir, index_dir, tune_queries=tuning_queries(cfg, beir, encoder))
        timings["index"] = time.perf_counter() - t0
    metrics: dict[str, float] = {}
    sweep: list[dict[str, Any]] = []
    if "search" in stages:
        qrels = beir.qrels(cfg.data.split)
        queries = beir.queries()
        missing = [q for q in qrels if q not in queries]
        if missing:
            notes.append(f"{len(missing)} qrels queries have no text in queries.jsonl")
        queries = {q: queries[q] for q in qrels if q in queries}
        t0 = time.perf_counter()
        result = search_stage(cfg, index_dir, queries, encoder)
        timings["search"] = time.perf_counter() - t0
        run = final_run = result.run
        write_run(run, out / "run.trec")
        if "rerank" in stages:
            t0 = time.perf_counter()
            res = rerank_stage(cfg, run, queries, beir.corpus(), str(reranker))
            final_run = res.run
            timings["rerank"] = time.perf_counter() - t0
            write_run(final_run, out / "run.rerank.trec", tag="raysys-rerank")
            if res.reranker_only is not None:
                write_run(res.reranker_only, out / "run.reranker_only.trec", tag="raysys-rerank")
            if res.report.counts:
                notes.append(f"rerank: {res.report.summary()}")
        if "evaluate" in stages:
            metrics = evaluate_stage(qrels, final_run)
            write_metrics(metrics, out / "metrics.json")
            if final_run is not run:
                first = evaluate_stage(qrels, run)
                write_metrics(first, out / "metrics_first_stage.json")
                notes.append(
                    "first stage (before reranking): "
                    + ", ".join(f"{k} {v:.4f}" for k, v in first.items())
                )
            points = result.searcher.index.sweep_points(cfg.search.sweep)
            for nprobe in points:
                sweep.append({"nprobe": nprobe, **evaluate_stage(qrels, result.at_nprobe(nprobe))})
            if not points:
                sweep.append({"nprobe": 0, **metrics})
            plot_nprobe(sweep, out / "nprobe.png", result.searcher.manifest["factory"])
            (out / "nprobe_sweep.json").write_text(json.dumps(sweep, indent=2))
    write_report(out, cfg, stages, metrics, sweep, timings, notes, train_summary, index_dir)
    return metrics
