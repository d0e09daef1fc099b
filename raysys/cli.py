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
from raysys.errors import UserError

log = logging.getLogger("raysys")


def _config_path(args: argparse.Namespace) -> str | None:
    """`-` (or `none`) means: no config file, defaults plus overrides."""
    return None if args.config in ("-", "none") else args.config


def _cmd_train(args: argparse.Namespace) -> int:
    from raysys.stages import train_stage

    cfg = load_config(_config_path(args), args.overrides)
    out = Path(args.out or cfg.out or "runs/train")
    outcome = train_stage(cfg, out)
    last = outcome.history[-1] if outcome.history else {}
    print(
        json.dumps(
            {
                "steps": f"{outcome.stopped_at}/{outcome.total_steps}",
                "first_loss": outcome.history[0]["loss"] if outcome.history else None,
                "last_loss": last.get("loss"),
                "tokens_per_s": last.get("tokens_per_s"),
                "skipped": outcome.skipped,
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
    from raysys.stages import encode_stage

    cfg = load_config(_config_path(args), args.overrides)
    corpus = args.corpus or cfg.data.path
    if not corpus:
        raise ConfigError("give --corpus or data=PATH")
    m = encode_stage(cfg, corpus, Path(args.out), cfg.model.path, cfg.encoding_contract())
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
    from raysys.stages import index_stage

    cfg = load_config(_config_path(args), args.overrides)
    m = index_stage(cfg, args.embeddings, Path(args.out))
    print(json.dumps({k: m[k] for k in ("factory", "count", "dim", "nprobe", "ondisk")}, indent=2))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from raysys.data.readers import read_queries
    from raysys.search.retrieve import QueryEncoder
    from raysys.search.runfile import write_run
    from raysys.stages import search_stage

    cfg = load_config(_config_path(args), args.overrides)
    queries = read_queries(args.queries, on_bad_line=cfg.data.on_bad_line)
    encoder = QueryEncoder(cfg.model.path, cfg.encoding_contract())
    result = search_stage(cfg, args.index, queries, encoder)
    print(write_run(result.run, args.run))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from raysys.data.readers import read_qrels
    from raysys.eval import write_metrics
    from raysys.search.runfile import read_run
    from raysys.stages import evaluate_stage

    metrics = evaluate_stage(read_qrels(args.qrels), read_run(args.run))
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
    from raysys.search.mine import mine

    flags = []
    if args.ranks is not None:
        lo, hi = _parse_ranks(args.ranks)
        flags += [f"mine.rank_from={lo}", f"mine.rank_to={hi}"]
    for name in ("n", "seed", "index", "reranker", "margin"):
        value = getattr(args, name)
        if value is not None:
            flags.append(f"mine.{name}={value}")
    # Flags win over the config file and over key=value overrides.
    cfg = load_config(_config_path(args), [*args.overrides, *flags])
    summary = mine(cfg, args.out)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_rerank(args: argparse.Namespace) -> int:
    from raysys.data.readers import read_corpus, read_queries
    from raysys.search.runfile import read_run, write_run
    from raysys.stages import corpus_path, rerank_stage

    cfg = load_config(_config_path(args), args.overrides)
    if not cfg.reranker.path:
        raise ConfigError("reranker.path: give a reranker export (reranker.path=DIR)")
    bad = cfg.data.on_bad_line
    res = rerank_stage(
        cfg,
        read_run(args.run),
        read_queries(args.queries, on_bad_line=bad),
        read_corpus(corpus_path(args.corpus), on_bad_line=bad),
        cfg.reranker.path,
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
    p.add_argument("-v", "--verbose", action="store_true", help="debug-level logs")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of any error")
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
    mi.add_argument(
        "--index", help="an index of the corpus (mine.index; else: encode + exact index)"
    )
    mi.add_argument("--out", required=True, help="groups JSONL to write")
    mi.add_argument(
        "--ranks", help="rank range to sample from, from:to (mine.rank_from/rank_to; 10:100)"
    )
    mi.add_argument("--n", type=int, help="negatives per query (mine.n; 30)")
    mi.add_argument("--seed", type=int, help="sampling seed (mine.seed; 42)")
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
    except UserError as e:
        if args.debug:
            raise
        # One line, whatever the message (contract diffs span several).
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"raysys: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
