"""Do LLaRA's pretext and LLM2Vec's MNTP help SmolLM2-135M retrieve? (#17)

On a fixed, seeded SciFact subset (every passage judged in the train and
test qrels plus random distractors, ``--passages`` in all: encoding all
5,183 passages with a 135M decoder for every comparison is too slow on 2 CPU
cores), each model under its own contract:

* ``raw``: SmolLM2 as it is, mean pooling, causal attention;
* ``llara``: after ``train.task=llara`` on the subset's texts (no labels),
  under the LLaRA contract (prompts, mean of the last 8 states);
* ``mntp``: after ``train.task=mntp``, bidirectional attention, mean pooling.

Steps (each skipped when its output exists, so a cut run resumes):
``subset``, ``adapt`` (the two pretext runs), ``zeroshot`` (encode, flat
index, search, evaluate the 300 test queries), ``mine`` (hard negatives for
the train queries, ranks 10-99 of all-MiniLM-L6-v2 on the subset: the same
groups for every model), ``finetune`` (each model, same settings, hard
negatives only) and ``eval`` of the fine-tuned models. Every run records
steps, tokens and minutes. Writes ``benchmarks/results/adapt_scifact.json``.

    .venv/bin/python benchmarks/adapt_scifact.py --work runs/adapt [--steps subset,adapt,...]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from _results import write_results
from _runs import ROOT, run_raysys, train_summary

RESULTS = Path(__file__).parent / "results" / "adapt_scifact.json"
STEPS = ("subset", "adapt", "zeroshot", "mine", "finetune", "eval")

CONTRACTS = {
    "raw": ["contract.pooling=mean"],
    "llara": [],  # the export carries its contract; fine-tuning restates it below
    "mntp": ["contract.pooling=mean", "contract.bidirectional=true"],
}
COMMON = ["contract.query_max_len=64", "train.scaling.num_workers=2"]


def make_subset(src: Path, dst: Path, n: int, seed: int) -> dict:
    """A BEIR folder: judged passages (train + test) plus seeded distractors."""
    judged: set[str] = set()
    for split in ("train", "test"):
        for line in (src / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]:
            judged.add(line.split("\t")[1])
    rows = [json.loads(x) for x in (src / "corpus.jsonl").read_text().splitlines() if x.strip()]
    keep = [r for r in rows if r["_id"] in judged]
    rest = [r for r in rows if r["_id"] not in judged]
    random.Random(seed).shuffle(rest)
    keep += rest[: max(0, n - len(keep))]
    (dst / "qrels").mkdir(parents=True, exist_ok=True)
    (dst / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    (dst / "queries.jsonl").write_text((src / "queries.jsonl").read_text())
    for split in ("train", "test"):
        (dst / "qrels" / f"{split}.tsv").write_text((src / "qrels" / f"{split}.tsv").read_text())
    return {"passages": len(keep), "judged": len(judged & {r["_id"] for r in keep})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "adapt"))
    ap.add_argument("--passages", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument(
        "--models", default="raw,llara,mntp", help="which of raw,llara,mntp to run (a fresh --work)"
    )
    ap.add_argument("--adapt-texts", type=int, default=1000, help="texts per pretext run")
    ap.add_argument("--passage-max-len", type=int, default=128)
    ap.add_argument("--ft-queries", type=int, default=400, help="train queries fine-tuned on")
    ap.add_argument("--adapt-lr", type=float, default=1e-4)
    ap.add_argument("--ft-lr", type=float, default=5e-5)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    results = Path(args.results)
    COMMON.append(f"contract.passage_max_len={args.passage_max_len}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    steps = args.steps.split(",")
    wanted = set(args.models.split(","))
    res = json.loads(results.read_text()) if results.is_file() else {}
    subset = work / "scifact-subset"

    def save() -> None:
        res["settings"] = {k: v for k, v in vars(args).items() if k not in ("data", "work")}
        write_results(results, res, "benchmarks/adapt_scifact.py")

    if "subset" in steps and not (subset / "corpus.jsonl").is_file():
        res["subset"] = make_subset(Path(args.data), subset, args.passages, args.seed)
        save()
    models = {"raw": "SmolLM2-135M"}
    adapt_cfg = str(ROOT / "jobs" / "adapt_smollm2.yaml")
    for name, extra in (
        ("llara", ["train.task=llara"]),
        ("mntp", ["train.task=mntp", *CONTRACTS["mntp"]]),
    ):
        out = work / f"adapt-{name}"
        models[name] = str(out / "model")
        if name not in wanted:
            continue
        if "adapt" in steps and not (out / "model").is_dir():
            minutes = run_raysys(
                [
                    "train",
                    adapt_cfg,
                    f"data.corpus={subset / 'corpus.jsonl'}",
                    f"data.max_texts={args.adapt_texts}",
                    f"train.llara.max_len={args.passage_max_len}",
                    f"train.mntp.max_len={args.passage_max_len}",
                    f"train.optim.lr={args.adapt_lr}",
                    f"train.checkpoint.storage_path={work / 'ray'}",
                    f"train.checkpoint.run_name=adapt-{name}",
                    *extra,
                    "--out",
                    str(out),
                ],
                work / f"adapt-{name}.log",
            )
            res.setdefault("adapt", {})[name] = {"minutes": minutes, **train_summary(out)}
            save()

    def evaluate(name: str, model: str, tag: str, contract: list[str]) -> None:
        out = work / f"{tag}-{name}"
        if (out / "metrics.json").is_file():
            return
        if name not in wanted:
            return
        minutes = run_raysys(
            [
                "pipeline",
                "-",
                f"data={subset}",
                f"model={model}",
                "train.enabled=false",
                "index.factory=Flat",
                *COMMON,
                *contract,
                "--out",
                str(out),
            ],
            work / f"{tag}-{name}.log",
        )
        metrics = json.loads((out / "metrics.json").read_text())
        res.setdefault(tag, {})[name] = {"minutes": minutes, **metrics}
        save()

    if "zeroshot" in steps:
        for name, model in models.items():
            evaluate(name, model, "zeroshot", CONTRACTS[name])
    groups = work / "mined.jsonl"
    if "mine" in steps and not groups.is_file():
        minutes = run_raysys(
            [
                "mine",
                str(ROOT / "jobs" / "scifact.yaml"),
                f"data={subset}",
                "--ranks",
                "10:100",
                "--n",
                "30",
                "--out",
                str(groups),
            ],
            work / "mine.log",
        )
        res["mine"] = {"minutes": minutes, "miner": "all-MiniLM-L6-v2 (exact search)"}
        save()
    llara_file = Path(models["llara"]) / "raysys_contract.json"
    llara_contract = json.loads(llara_file.read_text()) if "llara" in wanted else {}
    ft_contract = {
        "raw": CONTRACTS["raw"],
        "mntp": CONTRACTS["mntp"],
        "llara": [
            f"contract.{k}={json.dumps(llara_contract[k])}"
            for k in (
                "query_prefix",
                "passage_prefix",
                "query_suffix",
                "passage_suffix",
                "pooling",
                "last_k",
                "special_tokens",
            )
        ]
        if llara_contract
        else [],
    }
    for name, model in models.items():
        out = work / f"ft-{name}"
        if name not in wanted:
            continue
        if "finetune" in steps and not (out / "model").is_dir():
            minutes = run_raysys(
                [
                    "train",
                    adapt_cfg,
                    "train.task=retrieve",
                    f"model={model}",
                    f"data.groups={groups}",
                    f"data.corpus={subset / 'corpus.jsonl'}",
                    "train.group_size=4",
                    # 16 queries a step; 4 at a time per worker (8 at once
                    # peaked past 10 GB a worker). Without in-batch negatives
                    # the accumulated step equals the 8-query one.
                    "train.per_device_queries=4",
                    "train.grad_accum=2",
                    f"data.max_queries={args.ft_queries}",
                    "train.loss.in_batch_negatives=false",
                    "train.loss.temperature=0.02",
                    f"train.optim.lr={args.ft_lr}",
                    f"train.checkpoint.storage_path={work / 'ray'}",
                    f"train.checkpoint.run_name=ft-{name}",
                    *COMMON,
                    *ft_contract[name],
                    "--out",
                    str(out),
                ],
                work / f"ft-{name}.log",
            )
            res.setdefault("finetune", {})[name] = {"minutes": minutes, **train_summary(out)}
            save()
        if "eval" in steps and (out / "model").is_dir():
            evaluate(name, str(out / "model"), "finetuned", ft_contract[name])
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
