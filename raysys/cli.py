"""``raysys`` command line: one command, one verb per pipeline stage."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raysys.config import ConfigError, load_config
from raysys.contract import ContractError
from raysys.data.readers import DataError

log = logging.getLogger("raysys")


def _config_path(args: argparse.Namespace) -> str | None:
    """`-` (or `none`) means: no config file, defaults plus overrides."""
    return None if args.config in ("-", "none") else args.config


def _cmd_train(args: argparse.Namespace) -> int:
    from raysys.train.launch import run_training

    cfg = load_config(_config_path(args), args.overrides)
    out = Path(args.out or cfg.out or "runs/train")
    outcome = run_training(cfg, out)
    last = outcome.history[-1] if outcome.history else {}
    print(
        json.dumps(
            {
                "steps": f"{outcome.stopped_at}/{outcome.total_steps}",
                "first_loss": outcome.history[0]["loss"] if outcome.history else None,
                "last_loss": last.get("loss"),
                "tokens_per_s": last.get("tokens_per_s"),
                "skipped": outcome.skipped["skipped"],
                "model": str(outcome.model_dir) if outcome.model_dir else None,
                "checkpoint": outcome.checkpoint_path,
            },
            indent=2,
        )
    )
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from raysys.pipeline import run_pipeline

    cfg = load_config(_config_path(args), args.overrides)
    metrics = run_pipeline(cfg, args.out)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    from raysys.index.encode import encode_corpus

    cfg = load_config(_config_path(args), args.overrides)
    corpus = args.corpus or cfg.data.path
    if not corpus:
        raise ConfigError("give --corpus or data=PATH")
    m = encode_corpus(
        corpus,
        args.out,
        cfg.model.path,
        cfg.encoding_contract(),
        cfg.encode,
        on_bad_line=cfg.data.on_bad_line,
    )
    print(
        json.dumps(
            {
                "passages": m["corpus"]["rows"],
                "shards": len(m["done"]),
                "dim": m["dim"],
                "skipped": m["corpus"]["skipped"],
            },
            indent=2,
        )
    )
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from raysys.index.build import build_index
    from raysys.index.encode import EMB_DIR

    cfg = load_config(_config_path(args), args.overrides)
    emb = Path(args.embeddings)
    if (emb / EMB_DIR).is_dir():
        emb = emb / EMB_DIR
    m = build_index(
        emb,
        args.out,
        cfg.index.factory,
        train_sample=cfg.index.train_sample,
        ondisk=cfg.index.ondisk,
        seed=cfg.index.seed,
    )
    print(json.dumps({k: m[k] for k in ("factory", "count", "dim", "nprobe", "ondisk")}, indent=2))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from raysys.data.readers import read_queries
    from raysys.search.retrieve import Searcher
    from raysys.search.runfile import write_run

    cfg = load_config(_config_path(args), args.overrides)
    searcher = Searcher(args.index, cfg.model.path, cfg.encoding_contract())
    queries = read_queries(args.queries)
    qids = sorted(queries)
    s = cfg.search
    run = searcher.search(
        qids,
        searcher.encode([queries[q] for q in qids], s.batch_size),
        topk=s.topk,
        nprobe=s.nprobe,
        drop_self_hits=s.drop_self_hits,
    )
    print(write_run(run, args.run))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from raysys.data.readers import read_qrels
    from raysys.eval import evaluate, write_metrics
    from raysys.search.runfile import read_run

    metrics = evaluate(read_qrels(args.qrels), read_run(args.run))
    if args.out:
        write_metrics(metrics, args.out)
    print(json.dumps(metrics, indent=2))
    return 0


def _parse_ranks(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--ranks must look like 10:100, not {text!r}") from None
    if not 0 <= lo < hi:
        raise ConfigError(f"--ranks {text}: need 0 <= from < to")
    return lo, hi


def _cmd_mine(args: argparse.Namespace) -> int:
    from raysys.search.mine import MineSpec, mine

    cfg = load_config(_config_path(args), args.overrides)
    lo, hi = _parse_ranks(args.ranks)
    if args.n < 1:
        raise ConfigError("--n must be >= 1")
    if (args.reranker is None) != (args.margin is None):
        raise ConfigError("the reranker filter needs both --reranker and --margin")
    spec = MineSpec(rank_from=lo, rank_to=hi, n=args.n, seed=args.seed, margin=args.margin)
    summary = mine(cfg, args.out, spec, index_dir=args.index, reranker=args.reranker)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_rerank(args: argparse.Namespace) -> int:
    from raysys.data.readers import read_corpus, read_queries
    from raysys.search.rerank import rerank_run
    from raysys.search.runfile import read_run, write_run

    cfg = load_config(_config_path(args), args.overrides)
    if not cfg.reranker.path:
        raise ConfigError("reranker.path: give a reranker export (reranker.path=DIR)")
    corpus = Path(args.corpus)
    corpus = corpus / "corpus.jsonl" if corpus.is_dir() else corpus
    res = rerank_run(
        read_run(args.run),
        read_queries(args.queries),
        read_corpus(corpus, on_bad_line=cfg.data.on_bad_line),
        cfg.reranker.path,
        cfg.reranker,
    )
    write_run(res.run, args.out, tag="raysys-rerank")
    written = {"out": args.out}
    if res.reranker_only is not None:
        # Interpolated: keep the reranker's own ranking too (weights can then
        # be compared without scoring again).
        alone = str(Path(args.out).with_suffix("")) + ".reranker_only.trec"
        write_run(res.reranker_only, alone, tag="raysys-rerank")
        written["reranker_only"] = alone
    print(json.dumps({"queries": len(res.run), **written, **res.report.to_dict()}, indent=2))
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from raysys.data.demo import build_demo_beir

    print(build_demo_beir(args.out))
    return 0


def _config_verb(
    sub: Any, name: str, help: str, func: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """A verb that takes a YAML config and key=value overrides."""
    v = sub.add_parser(name, help=help)
    v.add_argument("config", help="YAML config (see jobs/)")
    v.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.zero_stage=3")
    v.set_defaults(func=func)
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raysys", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="verb", required=True)

    t = _config_verb(
        sub, "train", "train a retriever or reranker on Ray Train + DeepSpeed", _cmd_train
    )
    t.add_argument("--out", help="output directory (default: config `out`, else runs/train)")

    pl = _config_verb(
        sub, "pipeline", "train -> encode -> index -> search -> rerank -> evaluate", _cmd_pipeline
    )
    pl.add_argument("--out", required=True)

    e = _config_verb(sub, "encode", "encode a corpus into embedding shards (Ray Data)", _cmd_encode)
    e.add_argument("--corpus", help="corpus file or BEIR folder (default: data.path)")
    e.add_argument("--out", required=True)

    ix = _config_verb(sub, "index", "build a FAISS index from embedding shards", _cmd_index)
    ix.add_argument("--embeddings", required=True, help="the output folder of `raysys encode`")
    ix.add_argument("--out", required=True)

    se = _config_verb(sub, "search", "search an index with queries; writes a TREC run", _cmd_search)
    se.add_argument("--index", required=True)
    se.add_argument("--queries", required=True, help="queries.jsonl (BEIR) or JSONL/Parquet")
    se.add_argument("--run", required=True, help="output run file")

    ev = sub.add_parser("evaluate", help="nDCG@10, MRR@10, Recall@100/1000 of a run")
    ev.add_argument("--qrels", required=True)
    ev.add_argument("--run", required=True)
    ev.add_argument("--out", help="metrics.json to write")
    ev.set_defaults(func=_cmd_evaluate)

    mi = _config_verb(sub, "mine", "mine hard negatives into training groups", _cmd_mine)
    mi.add_argument("--index", help="an index of the corpus (else: encode + exact index)")
    mi.add_argument("--out", required=True, help="groups JSONL to write")
    mi.add_argument("--ranks", default="10:100", help="rank range to sample from (from:to)")
    mi.add_argument("--n", type=int, default=30, help="negatives per query")
    mi.add_argument("--seed", type=int, default=42)
    mi.add_argument("--reranker", help="reranker export for the false-negative filter")
    mi.add_argument(
        "--margin", type=float, help="drop candidates scored above (lowest positive - margin)"
    )

    rr = _config_verb(
        sub, "rerank", "rerank a run's top-k with a cross-encoder (Ray Data)", _cmd_rerank
    )
    rr.add_argument("--run", required=True, help="first-stage TREC run")
    rr.add_argument("--queries", required=True)
    rr.add_argument("--corpus", required=True, help="corpus file or BEIR folder")
    rr.add_argument("--out", required=True, help="reranked TREC run to write")

    d = sub.add_parser("demo-data", help="write the stdlib-docstring demo dataset as a BEIR folder")
    d.add_argument("out")
    d.set_defaults(func=_cmd_demo_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ContractError, DataError) as e:
        print(f"raysys: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
