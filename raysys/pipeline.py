"""``raysys pipeline``: train -> encode -> index -> search -> rerank -> evaluate
from one config.

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
from raysys.eval import evaluate, write_metrics
from raysys.search.runfile import write_run

log = logging.getLogger(__name__)


def run_pipeline(cfg: Config, out_dir: str | Path) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = list(cfg.stages)
    if not cfg.train.enabled and "train" in stages:
        stages.remove("train")
    if not cfg.data.path:
        raise ConfigError("data: set data=PATH to a BEIR folder")
    beir = BeirFolder(Path(cfg.data.path))
    timings: dict[str, float] = {}
    notes: list[str] = []
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    model = cfg.model.path
    contract = cfg.encoding_contract()
    reranker = cfg.reranker.path
    train_summary = None
    if "train" in stages:
        from raysys.train.launch import run_training

        t0 = time.perf_counter()
        outcome = run_training(cfg, out / "train")
        timings["train"] = time.perf_counter() - t0
        if outcome.model_dir is None:
            raise RuntimeError(
                "training stopped before the end (train.stop_after?); no model to use"
            )
        if cfg.train.task == "rerank":
            reranker = str(outcome.model_dir)
        else:
            model, contract = str(outcome.model_dir), None  # the export carries its contract
        train_summary = outcome
    emb_dir = out / "encode"
    encoder = _QueryEncoder(model, contract)
    index_dir = out / "index"
    if "encode" in stages:
        from raysys.index.encode import EMB_DIR, encode_corpus

        t0 = time.perf_counter()
        m = encode_corpus(
            beir.corpus_path, emb_dir, model, contract, cfg.encode, on_bad_line=cfg.data.on_bad_line
        )
        timings["encode"] = time.perf_counter() - t0
        skipped = m["corpus"].get("skipped") or {}
        if skipped:
            notes.append(f"corpus: skipped {skipped}")
    if "index" in stages:
        from raysys.index.build import build_index
        from raysys.index.encode import EMB_DIR

        t0 = time.perf_counter()
        build_index(
            emb_dir / EMB_DIR,
            index_dir,
            cfg.index.factory,
            tune_queries=_tuning_queries(cfg, beir, encoder),
            train_sample=cfg.index.train_sample,
            ondisk=cfg.index.ondisk,
            seed=cfg.index.seed,
            recall_target=cfg.index.recall_target,
        )
        timings["index"] = time.perf_counter() - t0
    metrics: dict[str, float] = {}
    sweep: list[dict[str, Any]] = []
    if "search" in stages:
        from raysys.search.retrieve import Searcher

        qrels = beir.qrels(cfg.data.split)
        queries = beir.queries()
        missing = [q for q in qrels if q not in queries]
        if missing:
            notes.append(f"{len(missing)} qrels queries have no text in queries.jsonl")
        queries = {q: queries[q] for q in qrels if q in queries}
        t0 = time.perf_counter()
        searcher = Searcher(index_dir, model, contract, loaded=encoder.get())
        qids = sorted(queries)
        qvecs = searcher.encode([queries[q] for q in qids], cfg.search.batch_size)
        s = cfg.search
        run = searcher.search(
            qids, qvecs, topk=s.topk, nprobe=s.nprobe, drop_self_hits=s.drop_self_hits
        )
        timings["search"] = time.perf_counter() - t0
        write_run(run, out / "run.trec")
        final_run = run
        if "rerank" in stages:
            from raysys.search.rerank import rerank_run

            t0 = time.perf_counter()
            res = rerank_run(run, queries, beir.corpus(), str(reranker), cfg.reranker)
            final_run, rreport = res.run, res.report
            timings["rerank"] = time.perf_counter() - t0
            write_run(final_run, out / "run.rerank.trec", tag="raysys-rerank")
            if res.reranker_only is not None:
                write_run(res.reranker_only, out / "run.reranker_only.trec", tag="raysys-rerank")
            if rreport.counts:
                notes.append(f"rerank: {rreport.summary()}")
        if "evaluate" in stages:
            metrics = evaluate(qrels, final_run)
            write_metrics(metrics, out / "metrics.json")
            if final_run is not run:
                first = evaluate(qrels, run)
                write_metrics(first, out / "metrics_first_stage.json")
                notes.append(
                    "first stage (before reranking): "
                    + ", ".join(f"{k} {v:.4f}" for k, v in first.items())
                )
            nlist = _nlist(searcher.index)
            if nlist:
                for nprobe in sorted(
                    {p for p in s.sweep if p <= nlist} | {searcher.manifest["nprobe"]}
                ):
                    r = searcher.search(
                        qids, qvecs, topk=s.topk, nprobe=nprobe, drop_self_hits=s.drop_self_hits
                    )
                    sweep.append({"nprobe": nprobe, **evaluate(qrels, r)})
            else:
                sweep.append({"nprobe": 0, **metrics})
            _plot(sweep, out / "nprobe.png", searcher.manifest["factory"])
            (out / "nprobe_sweep.json").write_text(json.dumps(sweep, indent=2))
    _report(out, cfg, stages, metrics, sweep, timings, notes, train_summary, index_dir)
    return metrics


class _QueryEncoder:
    """The query encoder, loaded once on first use (nprobe tuning, then search)."""

    def __init__(self, model: str, contract: Any) -> None:
        self.model, self.contract, self._loaded = model, contract, None

    def get(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from raysys.models.embedder import load_embedder

            self._loaded = load_embedder(self.model, "cpu", self.contract)
        return self._loaded


def _tuning_queries(cfg: Config, beir: BeirFolder, encoder: _QueryEncoder) -> Any:
    """Vectors of up to 500 training-split queries (never the evaluated split),
    to tune the index's default nprobe on real queries; None if there are none."""
    split = cfg.data.train_split
    if split == cfg.data.split or not (beir.root / "qrels" / f"{split}.tsv").is_file():
        return None
    queries = beir.queries()
    qids = [q for q in sorted(beir.qrels(split)) if q in queries][:500]
    if not qids:
        return None
    embedder, tok = encoder.get()
    return embedder.encode_texts(tok, [queries[q] for q in qids], "query").numpy()


def _nlist(index: Any) -> int:
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return 0


def _plot(sweep: list[dict[str, Any]], path: Path, factory: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [max(1, s["nprobe"]) for s in sweep]
    ax.plot(xs, [s["Recall@100"] for s in sweep], marker="o", label="Recall@100")
    ax.plot(xs, [s["nDCG@10"] for s in sweep], marker="s", label="nDCG@10")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(
        "nprobe" + (" (exact index: no nprobe)" if sweep and sweep[0]["nprobe"] == 0 else "")
    )
    ax.set_ylabel("score")
    ax.set_title(f"{factory}: quality against nprobe")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(
    out: Path,
    cfg: Config,
    stages: list[str],
    metrics: dict[str, float],
    sweep: list[dict[str, Any]],
    timings: dict[str, float],
    notes: list[str],
    train: Any,
    index_dir: Path,
) -> None:
    lines = ["# raysys pipeline report", ""]
    lines.append(f"- data: `{cfg.data.path}` (split `{cfg.data.split}`)")
    lines.append(f"- model: `{cfg.model.path}`; stages: {', '.join(stages)}")
    if "rerank" in stages or cfg.train.task == "rerank":
        lines.append(f"- reranker: `{cfg.reranker.path}` (top {cfg.reranker.topk})")
    if (index_dir / "manifest.json").is_file():
        m = json.loads((index_dir / "manifest.json").read_text())
        lines.append(
            f"- index: `{m['factory']}` over {m['count']} vectors (dim {m['dim']}), default nprobe {m['nprobe']}"
        )
    if train is not None:
        h = train.history
        lines.append(
            f"- training: {train.stopped_at}/{train.total_steps} steps, loss {h[0]['loss']:.4f} -> {h[-1]['loss']:.4f}"
        )
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    if len(sweep) > 1:
        lines += ["", "## nprobe sweep", "", "| nprobe | nDCG@10 | Recall@100 |", "|---|---|---|"]
        lines += [f"| {s['nprobe']} | {s['nDCG@10']:.4f} | {s['Recall@100']:.4f} |" for s in sweep]
    lines += ["", "![nprobe](nprobe.png)", "", "## Timings (s)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in timings.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (out / "report.md").write_text("\n".join(lines) + "\n")
