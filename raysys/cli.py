"""raysys: train LLM-based retrievers and rerankers, and index corpora, on Ray.

One verb per pipeline stage (train, encode, index, search, rerank, evaluate,
mine), plus `pipeline`, which runs them in order from one YAML config.
Each verb shows one progress bar per stage and a summary line; Ray's and the
libraries' logs go to raysys.log in the verb's output folder (--verbose shows
them instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raysys.config import ConfigError, load_config
from raysys.console import LOG_FILE, result, say, session
from raysys.errors import UserError
from raysys.storage import CACHE_ROOT, is_uri, parent, resolve

log = logging.getLogger("raysys")
_args: argparse.Namespace | None = None


@contextmanager
def _session(folder: str | Path | None) -> Iterator[None]:
    """Console + log file for this verb, in ``folder``; stops a Ray it started."""
    verbose = bool(_args and _args.verbose)
    if not verbose:
        # Loading bars of the hub and transformers would only clutter the log.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    remote = folder is not None and is_uri(folder)
    # A remote output folder gets its log at the end; it is written locally first.
    log_dir = _local_log_dir(str(folder)) if remote else folder
    try:
        with session(log_dir, verbose) as path:
            if path is not None and not verbose:
                where = f"{path}, then {folder}/{LOG_FILE}" if remote else path
                say(f"raysys {_args.verb if _args else ''}: logs in {where} (--verbose shows them)")
            try:
                yield
            except UserError:
                raise
            except BaseException:
                logging.getLogger("raysys.console").error("the run failed", exc_info=True)
                raise
            finally:
                from raysys.runtime import shutdown_ray

                shutdown_ray()
    finally:
        if remote and (Path(log_dir) / LOG_FILE).is_file():
            try:
                resolve(folder).join(LOG_FILE).upload(Path(log_dir) / LOG_FILE)
            except OSError as e:
                log.warning("could not copy the log to %s: %s", folder, e)


def _local_log_dir(uri: str) -> Path:
    import hashlib

    return CACHE_ROOT.parent / "logs" / hashlib.sha1(uri.encode()).hexdigest()[:16]


def _config_path(args: argparse.Namespace) -> str | None:
    """`-` (or `none`) means: no config file, defaults plus overrides."""
    return None if args.config in ("-", "none") else args.config


def _cmd_train(args: argparse.Namespace) -> int:
    from raysys.stages import train_stage

    cfg = load_config(_config_path(args), args.overrides)
    out = Path(args.out or cfg.out or "runs/train")
    with _session(out):
        outcome = train_stage(cfg, out)
    last = outcome.history[-1] if outcome.history else {}
    result(
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
    with _session(args.out):
        run_pipeline(cfg, args.out)
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    from raysys.stages import encode_stage

    cfg = load_config(_config_path(args), args.overrides)
    corpus = args.corpus or cfg.data.path
    if not corpus:
        raise ConfigError("give --corpus or data=PATH")
    with _session(args.out):
        m = encode_stage(cfg, corpus, args.out, cfg.model.path, cfg.encoding_contract())
    result(
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
    with _session(args.out):
        m = index_stage(cfg, args.embeddings, args.out)
    result(json.dumps({k: m[k] for k in ("factory", "count", "dim", "nprobe", "ondisk")}, indent=2))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from raysys.data.readers import read_queries
    from raysys.search.retrieve import QueryEncoder
    from raysys.search.runfile import write_run
    from raysys.stages import search_stage

    cfg = load_config(_config_path(args), args.overrides)
    queries = read_queries(args.queries, on_bad_line=cfg.data.on_bad_line)
    with _session(parent(args.run)):
        with QueryEncoder(cfg.model.path, cfg.encoding_contract(), cfg.encode.pool) as encoder:
            res = search_stage(cfg, args.index, queries, encoder)
        path = write_run(res.run, args.run)
    result(str(path))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from raysys.data.readers import read_qrels
    from raysys.eval import write_metrics
    from raysys.search.runfile import read_run
    from raysys.stages import evaluate_stage

    metrics = evaluate_stage(read_qrels(args.qrels), read_run(args.run))
    if args.out:
        write_metrics(metrics, args.out)
    result(json.dumps(metrics, indent=2))
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
    with _session(parent(args.out)):
        summary = mine(cfg, args.out)
    result(json.dumps(summary, indent=2))
    return 0


def _cmd_teacher(args: argparse.Namespace) -> int:
    from raysys.search.teacher import annotate_groups

    flags = [f"reranker.path={args.reranker}"] if args.reranker else []
    cfg = load_config(_config_path(args), [*args.overrides, *flags])
    with _session(parent(args.out)):
        summary = annotate_groups(cfg, args.groups, args.out)
    result(json.dumps(summary, indent=2))
    return 0


def _cmd_rerank(args: argparse.Namespace) -> int:
    from raysys.data.readers import read_corpus, read_queries
    from raysys.search.runfile import read_run, write_run
    from raysys.stages import corpus_path, rerank_stage

    cfg = load_config(_config_path(args), args.overrides)
    if not cfg.reranker.path:
        raise ConfigError("reranker.path: give a reranker export (reranker.path=DIR)")
    bad = cfg.data.on_bad_line
    run = read_run(args.run)
    queries = read_queries(args.queries, on_bad_line=bad)
    corpus = read_corpus(corpus_path(args.corpus), on_bad_line=bad)
    with _session(parent(args.out)):
        res = rerank_stage(cfg, run, queries, corpus, cfg.reranker.path)
        write_run(res.run, args.out, tag="raysys-rerank")
        written = {"out": args.out}
        if res.reranker_only is not None:
            # Interpolated: keep the reranker's own ranking too (weights can
            # then be compared without scoring again).
            alone = args.out.removesuffix(".trec") + ".reranker_only.trec"
            write_run(res.reranker_only, alone, tag="raysys-rerank")
            written["reranker_only"] = alone
    result(json.dumps({"queries": len(res.run), **written, **res.report.to_dict()}, indent=2))
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from raysys.data.demo import build_demo_beir

    root = build_demo_beir(args.out, size=args.size, max_pairs=args.max_pairs)
    result(str(root))
    return 0


_OVERRIDES = "key=value overrides of the config, e.g. train.zero_stage=3 (see raysys/config.py)"


def _verb(
    sub: Any, name: str, help: str, description: str, examples: str, func: Callable[..., int]
) -> argparse.ArgumentParser:
    v = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.set_defaults(func=func)
    return v


def _config_verb(
    sub: Any, name: str, help: str, description: str, examples: str, func: Callable[..., int]
) -> argparse.ArgumentParser:
    """A verb that takes a YAML config and key=value overrides."""
    v = _verb(sub, name, help, description, examples, func)
    v.add_argument("config", help="YAML config (see jobs/); `-` for defaults plus overrides")
    v.add_argument("overrides", nargs="*", help=_OVERRIDES)
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raysys",
        description=__doc__,
        epilog="examples:\n"
        "  raysys demo-data runs/demo/data\n"
        "  raysys pipeline jobs/quickstart.yaml data=runs/demo/data --out runs/demo\n"
        "  raysys train jobs/scifact.yaml train.zero_stage=3 --out runs/z3\n"
        "  raysys VERB --help       (options and an example for each verb)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show every log on the console (debug level)"
    )
    p.add_argument("--debug", action="store_true", help="show the Python traceback of any error")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    pl = _config_verb(
        sub,
        "pipeline",
        "train -> encode -> index -> search -> rerank -> evaluate, from one config",
        "Run the stages listed in `stages:` in order. With `baseline: true` the\n"
        "untrained model is evaluated too, for a side-by-side report. Writes\n"
        "report.md, metrics.json, run.trec, nprobe.png, train/loss.png and\n"
        "train/tensorboard/ into --out.",
        "  raysys pipeline jobs/quickstart.yaml data=runs/demo/data --out runs/demo\n"
        "  raysys pipeline jobs/scifact.yaml train.enabled=false index.factory=Flat --out runs/sf",
        _cmd_pipeline,
    )
    pl.add_argument("--out", required=True, help="run folder (report, runs, index, logs)")

    t = _config_verb(
        sub,
        "train",
        "train a retriever or reranker on Ray Train + DeepSpeed ZeRO",
        "Contrastive training (InfoNCE over in-batch and hard negatives, gathered\n"
        "across workers) of train.task (retrieve, rerank or module:Class) with\n"
        "train.scaling.num_workers Ray Train workers. Exports OUT/model, draws\n"
        "OUT/loss.png and writes TensorBoard events to OUT/tensorboard/.",
        "  raysys train jobs/scifact.yaml --out runs/sf-train\n"
        "  raysys train jobs/scifact.yaml train.zero_stage=3 train.max_steps=100 --out runs/z3",
        _cmd_train,
    )
    t.add_argument("--out", help="output folder (default: config `out`, else runs/train)")

    e = _config_verb(
        sub,
        "encode",
        "encode a corpus into embedding shards (Ray Data actor pool)",
        "Split the corpus into Parquet shards, then encode them on a Ray Data actor\n"
        "pool (GPU when encode.pool.use_gpu). A rerun resumes from the shards done.",
        "  raysys encode - model=all-MiniLM-L6-v2 --corpus data/corpus.jsonl --out runs/emb",
        _cmd_encode,
    )
    e.add_argument("--corpus", help="corpus file or BEIR folder (default: data.path)")
    e.add_argument("--out", required=True, help="output folder (shards, manifest, log)")

    ix = _config_verb(
        sub,
        "index",
        "build a FAISS index (IVF-PQ by default) from embedding shards",
        "Train the index on a sample, add the shards in parallel Ray tasks, merge,\n"
        "and tune the default nprobe against exact search (index.recall_target).",
        "  raysys index - --embeddings runs/emb --out runs/idx\n"
        "  raysys index - index.factory=IVF1024,PQ64x8np --embeddings runs/emb --out runs/idx",
        _cmd_index,
    )
    ix.add_argument("--embeddings", required=True, help="the output folder of `raysys encode`")
    ix.add_argument("--out", required=True, help="index folder")

    se = _config_verb(
        sub,
        "search",
        "search an index with queries; writes a TREC run",
        "Encode the queries under the index's encoding contract (checked against\n"
        "the model's) and take the top search.topk hits per query.",
        "  raysys search - model=all-MiniLM-L6-v2 --index runs/idx --queries q.jsonl --run run.trec",
        _cmd_search,
    )
    se.add_argument("--index", required=True, help="an index folder from `raysys index`")
    se.add_argument("--queries", required=True, help="queries.jsonl (BEIR) or JSONL/Parquet")
    se.add_argument("--run", required=True, help="output run file")

    rr = _config_verb(
        sub,
        "rerank",
        "rerank a run's top-k with a cross-encoder (Ray Data actor pool)",
        "Score each query's top reranker.topk candidates with the reranker export\n"
        "reranker.path; reranker.weight < 1 mixes in the first-stage scores.",
        "  raysys rerank - reranker.path=runs/rr/model --run run.trec --queries q.jsonl \\\n"
        "      --corpus data/ --out run.rerank.trec",
        _cmd_rerank,
    )
    rr.add_argument("--run", required=True, help="first-stage TREC run")
    rr.add_argument("--queries", required=True, help="queries.jsonl (BEIR) or JSONL/Parquet")
    rr.add_argument("--corpus", required=True, help="corpus file or BEIR folder")
    rr.add_argument("--out", required=True, help="reranked TREC run to write")

    ev = _verb(
        sub,
        "evaluate",
        "nDCG@10, MRR@10, Recall@100/1000 of a run",
        "Score a TREC run against BEIR qrels (ir-measures).",
        "  raysys evaluate --qrels data/qrels/test.tsv --run run.trec --out metrics.json",
        _cmd_evaluate,
    )
    ev.add_argument("--qrels", required=True, help="qrels TSV (query-id, corpus-id, score)")
    ev.add_argument("--run", required=True, help="TREC run file")
    ev.add_argument("--out", help="metrics.json to write")

    mi = _config_verb(
        sub,
        "mine",
        "mine hard negatives into training groups",
        "Retrieve for the training queries and sample negatives from ranks\n"
        "mine.rank_from..rank_to, optionally dropping likely false negatives with a\n"
        "reranker. Writes JSONL groups that data.groups can train on.",
        "  raysys mine jobs/scifact.yaml --ranks 10:100 --n 30 --out runs/groups.jsonl",
        _cmd_mine,
    )
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

    te = _config_verb(
        sub,
        "teacher",
        "score training groups with a reranker, for distillation",
        "Score every positive and negative of the groups with a reranker export on\n"
        "the rerank actor pool (reranker.pool) and write the groups again with\n"
        "pos_scores / neg_scores; train on them with train.loss.distill_weight > 0.\n"
        "Passage ids resolve through data.corpus (else data.path).",
        "  raysys teacher jobs/scifact_rerank.yaml data=D --reranker runs/reranker/model \\\n"
        "      --groups runs/mined.jsonl --out runs/mined.teacher.jsonl",
        _cmd_teacher,
    )
    te.add_argument("--groups", required=True, help="training groups (JSONL or Parquet)")
    te.add_argument("--out", required=True, help="groups JSONL to write, with scores")
    te.add_argument("--reranker", help="the teacher: a reranker export (reranker.path)")

    d = _verb(
        sub,
        "demo-data",
        "write the offline docstring demo dataset as a BEIR folder",
        "Queries are docstring summary lines, passages the rest of the docstring,\n"
        "read (never imported) from the standard library and installed packages.",
        "  raysys demo-data runs/demo/data\n  raysys demo-data --size small --max-pairs 1000 /tmp/demo",
        _cmd_demo_data,
    )
    d.add_argument("out", help="folder to write (kept if already complete)")
    d.add_argument(
        "--size",
        choices=("small", "full"),
        default="full",
        help="small: the standard library only (tests); full: plus installed packages",
    )
    d.add_argument(
        "--max-pairs",
        type=int,
        default=4000,
        help="keep a seeded sample of this many query/passage pairs (0: all; default 4000)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    global _args
    args = _args = build_parser().parse_args(argv)
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
