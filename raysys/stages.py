"""One function per pipeline stage: train, encode, index, search, rerank,
evaluate. ``raysys pipeline``, the CLI verbs and ``raysys mine`` all call
these, so each stage's settings are read in one place: every function takes
the whole :class:`raysys.config.Config` and reads its own sections.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raysys.config import Config
from raysys.console import Progress, duration, say
from raysys.contract import EncodingContract
from raysys.data.readers import BeirFolder
from raysys.search.retrieve import QueryEncoder, Searcher
from raysys.search.runfile import Run
from raysys.storage import Location, resolve

log = logging.getLogger(__name__)


def train_stage(cfg: Config, out: Path) -> Any:
    """Train ``cfg.train.task``; returns a :class:`raysys.train.launch.TrainOutcome`."""
    from raysys.train.launch import run_training

    return run_training(cfg, out)


def encode_stage(
    cfg: Config,
    corpus: str | Path | Location,
    out: str | Path | Location,
    model: str,
    contract: EncodingContract | None,
) -> dict[str, Any]:
    """Encode ``corpus`` into ``out/embeddings`` (``cfg.encode``, ``cfg.data.on_bad_line``)."""
    from raysys.index.encode import encode_corpus

    t0 = time.perf_counter()
    m = encode_corpus(corpus, out, model, contract, cfg.encode, on_bad_line=cfg.data.on_bad_line)
    seconds = time.perf_counter() - t0
    rows = m["corpus"]["rows"]
    skipped = m["corpus"].get("skipped") or {}
    note = f"; skipped {sum(skipped.values())} ({', '.join(skipped)})" if skipped else ""
    say(
        f"encode: {rows:,} passages -> {len(m['done'])} shard(s), dim {m['dim']}, in "
        f"{duration(seconds)} ({rows / max(seconds, 1e-9):,.0f}/s){note}"
    )
    return m


def embeddings_dir(path: str | Path | Location) -> Location:
    """The embeddings folder of an encode output folder (or the folder itself)."""
    from raysys.index.encode import EMB_DIR

    loc = resolve(path)
    return loc.join(EMB_DIR) if loc.join(EMB_DIR).is_dir() else loc


def index_stage(
    cfg: Config,
    embeddings: str | Path | Location,
    out: str | Path | Location,
    tune_queries: np.ndarray | None = None,
) -> dict[str, Any]:
    """Build the index of each representation in ``embeddings`` (``cfg.index``)."""
    from raysys.index.manifest import read_manifest
    from raysys.representations import get_representation

    emb = embeddings_dir(embeddings)
    reps = read_manifest(emb).get("representations", ["dense"])
    out = resolve(out)
    first: dict[str, Any] = {}
    # The first (dense) index at ``out``; an M3 model's others in ``out/<name>``.
    for i, name in enumerate(reps):
        rep = get_representation(name)
        t0 = time.perf_counter()
        m = rep.build_index(
            emb, out if i == 0 else out.join(name), cfg.index, tune_queries=tune_queries
        )
        took = duration(time.perf_counter() - t0)
        if name == "sparse":
            line = (
                f"index ({name}): inverted index over {m['count']:,} passages, "
                f"{m['terms_per_passage']} terms each, {m['bytes'] / 2**20:.1f} MiB, in {took}"
            )
        elif name == "multivector":
            line = (
                f"index ({name}): {m['tokens']:,} token vectors, "
                f"{m['bytes_per_passage']:,.0f} bytes per passage, in {took}"
            )
        else:
            line = f"index: {m['factory']} over {m['count']:,} vectors in {took}"
        recalls = m.get("nprobe_recall_at_10") or {}
        if recalls:
            line += (
                f"; default nprobe {m['nprobe']} (recall@10 vs exact "
                f"{recalls[str(m['nprobe'])]:.3f}, best {max(recalls.values()):.3f}; "
                f"tuned in {duration(m['tuning']['seconds'])})"
            )
        say(line)
        first = first or m
    return first


@dataclass
class SearchResult:
    """A search's run, with what a re-search at another nprobe needs."""

    run: Run
    qids: list[str]
    qvecs: Any
    searcher: Searcher
    topk: int
    drop_self_hits: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def at_nprobe(self, nprobe: int) -> Run:
        """The same queries searched again at ``nprobe`` (for sweeps)."""
        return self.searcher.search(
            self.qids,
            self.qvecs,
            topk=self.topk,
            nprobe=nprobe,
            drop_self_hits=self.drop_self_hits,
        )


def search_stage(
    cfg: Config,
    index_dir: str | Path | Location,
    queries: dict[str, str],
    encoder: QueryEncoder,
    *,
    topk: int | None = None,
    mode: str | None = None,
    qreps: Any = None,
) -> SearchResult:
    """Encode ``queries`` under the index's contract and search (``cfg.search``;
    ``mode`` overrides ``search.mode``; ``qreps`` are queries already
    represented, as ``SearchResult.qvecs`` holds them)."""
    s = cfg.search
    searcher = Searcher(index_dir, encoder, mode or s.mode, s)
    qids = sorted(queries)
    bar = Progress("search", len(qids), "queries")
    if qreps is None:
        dim = int(searcher.manifest.get("dim") or 0)
        if searcher.mode == "dense":
            qreps = _encode_queries(encoder, queries, qids, s.batch_size, bar, dim)
        else:
            qreps = _represent_queries(encoder, queries, qids, s.batch_size, bar)
    k = topk or s.topk
    res = SearchResult({}, qids, qreps, searcher, k, s.drop_self_hits)
    res.run = res.at_nprobe(s.nprobe)
    nprobe = s.nprobe or searcher.manifest.get("nprobe") or 0
    bar.close(
        "search: "
        + (f"{searcher.mode} mode, " if searcher.mode != "dense" else "")
        + f"{len(qids):,} queries, top {k}"
        + (f", nprobe {nprobe}" if nprobe and searcher.mode in ("dense", "hybrid") else "")
        + f", in {duration(bar.elapsed)}"
    )
    return res


def _represent_queries(
    encoder: QueryEncoder, queries: dict[str, str], qids: list[str], batch: int, bar: Progress
) -> dict[str, Any]:
    """Every representation of the queries, by name (see :meth:`QueryEncoder.represent`)."""
    out: dict[str, Any] = {}
    for i in range(0, len(qids), batch):
        chunk = qids[i : i + batch]
        for name, value in encoder.represent([queries[q] for q in chunk], batch).items():
            if isinstance(value, np.ndarray):
                out[name] = np.concatenate([out[name], value]) if name in out else value
            else:
                out.setdefault(name, []).extend(value)
        bar.update(len(chunk))
    return out


def _encode_queries(
    encoder: QueryEncoder,
    queries: dict[str, str],
    qids: list[str],
    batch: int,
    bar: Progress,
    dim: int,
) -> np.ndarray:
    parts = []
    for i in range(0, len(qids), batch):
        chunk = qids[i : i + batch]
        parts.append(encoder.encode([queries[q] for q in chunk], batch))
        bar.update(len(chunk))
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def exact_search_stage(
    cfg: Config,
    embeddings: str | Path | Location,
    queries: dict[str, str],
    encoder: QueryEncoder,
    *,
    topk: int | None = None,
) -> Run:
    """Exact search over embedding shards, no index (Ray tasks, one shard each;
    ``cfg.search``, ``cfg.index.resources``)."""
    from raysys.contract import check_compatible
    from raysys.index.manifest import read_manifest
    from raysys.search.exact import exact_search

    s = cfg.search
    emb = embeddings_dir(embeddings)
    embedder, _ = encoder.get()
    manifest = read_manifest(emb)
    check_compatible(EncodingContract.from_dict(manifest["contract"]), embedder.contract)
    qids = sorted(queries)
    bar = Progress("encode queries", len(qids), "queries")
    qvecs = _encode_queries(encoder, queries, qids, s.batch_size, bar, int(manifest["dim"]))
    bar.close()
    k = topk or s.topk
    t0 = time.perf_counter()
    run = exact_search(
        emb, qids, qvecs, topk=k, drop_self_hits=s.drop_self_hits, resources=cfg.index.resources
    )
    say(f"exact search: {len(qids):,} queries, top {k}, in {duration(time.perf_counter() - t0)}")
    return run


def rerank_stage(
    cfg: Config, run: Run, queries: dict[str, str], corpus: pa.Table, reranker: str
) -> Any:
    """Rerank ``run`` with the reranker export ``reranker`` (``cfg.reranker``);
    returns :class:`raysys.search.rerank.Reranked`."""
    from raysys.search.rerank import rerank_run

    t0 = time.perf_counter()
    res = rerank_run(run, queries, corpus, reranker, cfg.reranker)
    seconds = time.perf_counter() - t0
    say(
        f"rerank: top {cfg.reranker.topk} of {len(res.run):,} queries ({res.pairs:,} pairs) in "
        f"{duration(seconds)} ({res.pairs / max(seconds, 1e-9):.1f} pairs/s)"
    )
    return res


def evaluate_stage(qrels: dict[str, dict[str, int]], run: Run) -> dict[str, float]:
    """nDCG@10, MRR@10, Recall@100 and Recall@1000 (ir-measures)."""
    from raysys.eval import evaluate

    return evaluate(qrels, run)


def tuning_queries(cfg: Config, beir: BeirFolder, encoder: QueryEncoder) -> np.ndarray | None:
    """Vectors of up to 500 training-split queries (never the evaluated split),
    to tune the index's default nprobe on real queries; None if there are none."""
    split = cfg.data.train_split
    if split == cfg.data.split or not (beir.root / "qrels" / f"{split}.tsv").is_file():
        return None
    queries = beir.queries()
    qids = [q for q in sorted(beir.qrels(split)) if q in queries][:500]
    if not qids:
        return None
    return encoder.encode([queries[q] for q in qids])


def corpus_path(path: str | Path | Location) -> Location:
    """A corpus file, or a BEIR folder's ``corpus.jsonl`` (paths or URIs)."""
    loc = resolve(path)
    return loc.join("corpus.jsonl") if loc.is_dir() else loc


__all__ = [
    "SearchResult",
    "corpus_path",
    "embeddings_dir",
    "encode_stage",
    "evaluate_stage",
    "exact_search_stage",
    "index_stage",
    "rerank_stage",
    "search_stage",
    "train_stage",
    "tuning_queries",
]
