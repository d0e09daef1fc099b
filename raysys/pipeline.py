"""``raysys pipeline``: train -> encode -> index -> search -> rerank -> evaluate
from one config, each step a function of :mod:`raysys.stages`.

Writes into the output folder: ``metrics.json`` (nDCG@10, MRR@10, Recall@100,
Recall@1000 of the final run: reranked when the rerank stage ran; with an M3
model, ``search.mode`` decides which run, and ``metrics_by_mode.json`` holds
every mode's), the run
file(s) (``run.trec``, ``run.rerank.trec``), ``report.md``, ``results.json``,
``nprobe.png`` (quality against nprobe) and, when it trained,
``train/loss.png`` and ``train/tensorboard/``.

With ``baseline: true`` the untrained ``model.path`` goes through encode,
index, search and evaluate first (into ``base/``), so the report compares
base and fine-tuned side by side.

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
from raysys.console import say, scope
from raysys.contract import EncodingContract
from raysys.data.readers import BeirFolder
from raysys.eval import write_metrics
from raysys.report import METRICS, Row, plot_nprobe, write_report
from raysys.runtime import check_gpu_stages
from raysys.search.retrieve import QueryEncoder
from raysys.search.runfile import Run, write_run
from raysys.stages import (
    encode_stage,
    evaluate_stage,
    index_stage,
    rerank_stage,
    search_stage,
    train_stage,
    tuning_queries,
)
from raysys.storage import Location, resolve

log = logging.getLogger(__name__)


class _Clock:
    """Per-stage wall-clock seconds, in the order the stages ran."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def _retrieval(
    cfg: Config,
    stages: list[str],
    name: str,
    model: str,
    contract: EncodingContract | None,
    out: Location,
    beir: BeirFolder,
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    clock: _Clock,
    notes: list[str],
) -> tuple[Row, Run | None]:
    """Encode, index, search and evaluate with one model; the row and its run."""
    label = "" if name in ("fine-tuned", "model") else f"{name} "
    emb_dir, index_dir = out.join("encode"), out.join("index")
    if "encode" in stages:
        m = clock.run(
            label + "encode", encode_stage, cfg, beir.corpus_path, emb_dir, model, contract
        )
        skipped = m["corpus"].get("skipped") or {}
        if skipped and not label:
            notes.append(f"corpus: skipped {skipped}")
    row = Row(name, {})
    # Leaving the block, a GPU query encoder gives its GPU back for the rerank pool.
    with QueryEncoder(model, contract, cfg.encode.pool) as encoder:
        if "index" in stages:
            tune = tuning_queries(cfg, beir, encoder)
            clock.run(label + "index", index_stage, cfg, emb_dir, index_dir, tune_queries=tune)
        if "search" not in stages:
            return row, None
        result = clock.run(label + "search", search_stage, cfg, index_dir, queries, encoder)
        by_mode = {result.searcher.mode: result}
        if "evaluate" in stages and len(result.searcher.modes) > 1:
            # An M3 index: every mode, from the same query representations.
            reps = result.qvecs if isinstance(result.qvecs, dict) else None
            for mode in result.searcher.modes:
                if mode not in by_mode:
                    r = clock.run(
                        label + "search (other modes)",
                        search_stage,
                        cfg,
                        index_dir,
                        queries,
                        encoder,
                        mode=mode,
                        qreps=reps,
                    )
                    reps = reps if reps is not None else r.qvecs
                    by_mode[mode] = r
    write_run(result.run, out.join("run.trec"))
    if len(by_mode) > 1:
        metrics_by_mode = {m: evaluate_stage(qrels, r.run) for m, r in by_mode.items()}
        out.join("metrics_by_mode.json").write_text(json.dumps(metrics_by_mode, indent=2))
        notes.append(
            f"{label}nDCG@10 by search mode: "
            + ", ".join(f"{m} {v['nDCG@10']:.4f}" for m, v in metrics_by_mode.items())
        )
    row.index = dict(result.searcher.manifest)
    if "evaluate" in stages:
        t0 = time.perf_counter()
        row.metrics = evaluate_stage(qrels, result.run)
        points = result.searcher.index.sweep_points(cfg.search.sweep)
        for nprobe in points:
            row.sweep.append({"nprobe": nprobe, **evaluate_stage(qrels, result.at_nprobe(nprobe))})
        if not points:
            row.sweep.append({"nprobe": 0, **row.metrics})
        out.join("nprobe_sweep.json").write_text(json.dumps(row.sweep, indent=2))
        clock.timings[label + "evaluate"] = time.perf_counter() - t0
    return row, result.run


def mine_stage(cfg: Config, out: Location, clock: _Clock) -> Config:
    """Mine hard negatives with the untrained model (``cfg.mine``) into
    ``out/mine/groups.jsonl``; returns ``cfg`` training on them."""
    import dataclasses

    from raysys.search.mine import mine

    local = out.local_path
    if local is None:
        raise ConfigError("the mine stage writes its groups locally: give a local --out")
    groups = Path(local) / "mine" / "groups.jsonl"
    if not groups.is_file():  # a rerun (resume) keeps the groups it mined
        groups.parent.mkdir(parents=True, exist_ok=True)
        summary = clock.run("mine", mine, cfg, groups)
        say(
            f"mine: {summary['groups']:,} groups, negatives from ranks "
            f"{summary['ranks'][0]}-{summary['ranks'][1]}"
        )
    data = dataclasses.replace(cfg.data, groups=str(groups), corpus=cfg.data.path)
    return dataclasses.replace(cfg, data=data)


def run_pipeline(cfg: Config, out_dir: str | Path | Location) -> dict[str, Any]:
    """Run the configured stages into ``out_dir`` (a local folder or a storage
    URI); returns the final metrics."""
    out = resolve(out_dir)
    out.mkdir()
    stages = list(cfg.stages)
    if not cfg.train.enabled and "train" in stages:
        stages.remove("train")
    if not cfg.data.path:
        raise ConfigError("data: set data=PATH to a BEIR folder")
    # A GPU stage the cluster can never hold fails now, not after training.
    check_gpu_stages(cfg, stages)
    beir = BeirFolder(Path(cfg.data.path), on_bad_line=cfg.data.on_bad_line)
    clock, notes, rows = _Clock(), [], []
    out.join("config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    if "search" in stages:
        qrels = beir.qrels(cfg.data.split)
        all_queries = beir.queries()
        missing = [q for q in qrels if q not in all_queries]
        if missing:
            notes.append(f"{len(missing)} qrels queries have no text in queries.jsonl")
        queries = {q: all_queries[q] for q in qrels if q in all_queries}

    model: str = cfg.model.path
    contract = cfg.encoding_contract()
    reranker = cfg.reranker.path
    train_summary = None
    trains_retriever = "train" in stages and cfg.train.task != "rerank"
    if cfg.baseline and trains_retriever:
        with scope("base"):
            row, _ = _retrieval(
                cfg,
                stages,
                "base",
                model,
                contract,
                out.join("base"),
                beir,
                queries,
                qrels,
                clock,
                notes,
            )
        rows.append(row)
    if "mine" in stages and "train" in stages:
        cfg = mine_stage(cfg, out, clock)
    if "train" in stages:
        outcome = clock.run("train", train_stage, cfg, out.join("train"))
        if outcome.model_dir is None:
            raise RuntimeError(
                "training stopped before the end (train.checkpoint.stop_after?); no model to use"
            )
        if cfg.train.task == "rerank":
            reranker = str(outcome.model_dir)
        else:
            model, contract = str(outcome.model_dir), None  # the export carries its contract
        train_summary = outcome
    name = "fine-tuned" if trains_retriever else "model"
    row, run = _retrieval(
        cfg, stages, name, model, contract, out, beir, queries, qrels, clock, notes
    )
    rows.append(row)
    if run is not None and "rerank" in stages:
        res = clock.run("rerank", rerank_stage, cfg, run, queries, beir.corpus(), str(reranker))
        write_run(res.run, out.join("run.rerank.trec"), tag="raysys-rerank")
        if res.reranker_only is not None:
            write_run(res.reranker_only, out.join("run.reranker_only.trec"), tag="raysys-rerank")
        if res.report.counts:
            notes.append(f"rerank: {res.report.summary()}")
        if "evaluate" in stages:
            if res.reranker_only is not None:
                rows.append(Row("reranker alone", evaluate_stage(qrels, res.reranker_only)))
            rows.append(Row("reranked", evaluate_stage(qrels, res.run)))
            write_metrics(row.metrics, out.join("metrics_first_stage.json"))
    metrics = rows[-1].metrics
    if metrics:
        write_metrics(metrics, out.join("metrics.json"))
        plot_nprobe(rows, out.join("nprobe.png"))
    report = write_report(out, cfg, stages, rows, clock.timings, notes, train_summary)
    if metrics:
        for line in _console_table(rows):
            say(line)
    say(f"report: {report}")
    return metrics


def _console_table(rows: list[Row]) -> list[str]:
    """The comparison as aligned plain text (the report has it as Markdown)."""
    rows = [r for r in rows if r.metrics]
    width = max(len(r.name) for r in rows) + 10
    lines = [f"{'':<12}" + "".join(f"{r.name:>{width}}" for r in rows)]
    for m in METRICS:
        if not all(m in r.metrics for r in rows):
            continue
        base = rows[0].metrics[m]
        cells = [f"{base:.4f}"] + [
            f"{r.metrics[m]:.4f} ({r.metrics[m] - base:+.3f})" for r in rows[1:]
        ]
        lines.append(f"{m:<12}" + "".join(f"{c:>{width}}" for c in cells))
    return lines
