"""BGE-M3 and reranker distillation on SciFact (#18), on this 2-core CPU.

Steps (each skipped when its output exists, so a cut run resumes):

* ``m3``: ``raysys pipeline jobs/scifact_m3.yaml`` (mine with the untrained
  MiniLM, train the m3 task, encode every head, index, search in every mode)
  with the recipe's first settings (``FIRST``: equal dense loss weight, one
  epoch), which the later steps' export and groups come from;
* ``ablation``: the same training without self-distillation, on the same
  mined groups;
* ``evalonly``: the m3 export with ``train.enabled=false`` on BEIR folders
  (SciFact again, which must give the same metrics, and the offline demo
  set);
* ``reranker``: the SciFact cross-encoder (``jobs/scifact_rerank.yaml``) on
  the untrained model's ranks 0-99;
* ``teacher``: the reranker scores the m3 run's mined groups, cut to the
  first ``--teacher-negatives`` negatives of each;
* ``distill``: the plain retriever (``jobs/scifact.yaml``, exact search)
  trained on those scored groups with and without
  ``train.loss.distill_weight``;
* ``variants``: recipe changes aimed at the dense head (``VARIANTS``), each
  trained on the m3 run's mined groups; ``m3-dense3-2ep`` is the recipe as
  ``jobs/scifact_m3.yaml`` now has it;
* ``recipe``: the issue's command as it stands, ``raysys pipeline
  jobs/scifact_m3.yaml data=SCIFACT`` with no overrides (mining included).

Every run records minutes and its metrics into
``benchmarks/results/m3_scifact.json``.

    .venv/bin/python benchmarks/m3_scifact.py --work runs/m3bench [--steps m3,ablation,...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _results import write_results
from _runs import ROOT, run_raysys, train_summary

RESULTS = Path(__file__).parent / "results" / "m3_scifact.json"
STEPS = ("m3", "ablation", "evalonly", "reranker", "teacher", "distill", "variants", "recipe")
NO_MINE = "stages=[train,encode,index,search,evaluate]"
# The recipe as the m3 and ablation rows ran it (the YAML now has dense 3.0, 2 epochs).
FIRST = ["train.m3.loss_weights.dense=1.0", "train.epochs=1"]
# Recipe changes that give the dense head a larger share of the M3 loss.
VARIANTS: dict[str, list[str]] = {
    "m3-dense3": ["train.m3.loss_weights.dense=3.0"],
    "m3-dense3-no-self-distill": ["train.m3.loss_weights.dense=3.0", "train.m3.self_distill=false"],
    "m3-dense3-2ep": ["train.m3.loss_weights.dense=3.0", "train.epochs=2"],
    "m3-dense3-2ep-no-self-distill": [
        "train.m3.loss_weights.dense=3.0",
        "train.epochs=2",
        "train.m3.self_distill=false",
    ],
}


def cut_groups(src: Path, dst: Path, negatives: int) -> int:
    """Each group with its first ``negatives`` negatives; returns the pairs to score."""
    pairs = 0
    with dst.open("w") as f:
        for line in src.read_text().splitlines():
            if not line.strip():
                continue
            g = json.loads(line)
            g["negatives"] = g["negatives"][:negatives]
            pairs += len(g["positives"]) + len(g["negatives"])
            f.write(json.dumps(g) + "\n")
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "m3bench"))
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--teacher-negatives", type=int, default=15)
    ap.add_argument("--distill-weight", type=float, default=1.0)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    work, data, steps = Path(args.work), Path(args.data), args.steps.split(",")
    work.mkdir(parents=True, exist_ok=True)
    results = Path(args.results)
    res = json.loads(results.read_text()) if results.is_file() else {}
    m3_job = str(ROOT / "jobs" / "scifact_m3.yaml")

    def save() -> None:
        res["settings"] = {k: v for k, v in vars(args).items() if k not in ("data", "work")}
        write_results(results, res, "benchmarks/m3_scifact.py")

    def pipeline(name: str, job: str, overrides: list[str], trained: bool = True) -> None:
        out = work / name
        if (out / "metrics.json").is_file():
            return
        minutes = run_raysys(["pipeline", job, *overrides, "--out", str(out)], work / f"{name}.log")
        row: dict = {"minutes": minutes, "metrics": json.loads((out / "metrics.json").read_text())}
        by_mode = out / "metrics_by_mode.json"
        if by_mode.is_file():
            row["metrics_by_mode"] = json.loads(by_mode.read_text())
        if trained:
            row["train"] = train_summary(out / "train")
        res[name] = row
        save()

    groups = work / "m3" / "mine" / "groups.jsonl"
    if "m3" in steps:
        pipeline("m3", m3_job, [f"data={data}", *FIRST])
    if "ablation" in steps:
        pipeline(
            "m3-no-self-distill",
            m3_job,
            [f"data={data}", NO_MINE, f"data.groups={groups}", *FIRST]
            + ["train.m3.self_distill=false"],
        )
    if "evalonly" in steps:
        demo = work / "demo-beir"
        if not (demo / "corpus.jsonl").is_file():
            run_raysys(["demo-data", str(demo)], work / "demo-data.log")
        export = work / "m3" / "train" / "model"
        for name, folder in (("evalonly-scifact", data), ("evalonly-demo", demo)):
            pipeline(
                name,
                m3_job,
                [f"model={export}", "train.enabled=false", f"data={folder}"],
                trained=False,
            )

    base_groups = work / "base_0_100.jsonl"
    reranker = work / "reranker" / "model"
    rerank_job = str(ROOT / "jobs" / "scifact_rerank.yaml")
    if "reranker" in steps and not reranker.is_dir():
        if not base_groups.is_file():
            res["mine_0_100"] = {
                "minutes": run_raysys(
                    ["mine", str(ROOT / "jobs" / "scifact.yaml"), f"data={data}"]
                    + ["--ranks", "0:100", "--n", "30", "--out", str(base_groups)],
                    work / "mine_0_100.log",
                )
            }
        minutes = run_raysys(
            ["train", rerank_job, f"data={data}", f"data.groups={base_groups}"]
            + ["--out", str(work / "reranker")],
            work / "reranker.log",
        )
        res["reranker"] = {"minutes": minutes, **train_summary(work / "reranker")}
        save()

    scored = work / "teacher.jsonl"
    if "teacher" in steps and not scored.is_file():
        cut = work / f"groups_{args.teacher_negatives}neg.jsonl"
        pairs = cut_groups(groups, cut, args.teacher_negatives)
        minutes = run_raysys(
            ["teacher", rerank_job, f"data={data}", "--reranker", str(reranker)]
            + ["--groups", str(cut), "--out", str(scored)],
            work / "teacher.log",
        )
        res["teacher"] = {"minutes": minutes, "pairs": pairs}
        save()

    if "distill" in steps:
        base = [f"data={data}", "index.factory=Flat", f"data.groups={scored}"]
        pipeline("retrieve-no-distill", str(ROOT / "jobs" / "scifact.yaml"), base)
        pipeline(
            "retrieve-distill",
            str(ROOT / "jobs" / "scifact.yaml"),
            [*base, f"train.loss.distill_weight={args.distill_weight}"],
        )
    if "variants" in steps:
        for name, extra in VARIANTS.items():
            pipeline(name, m3_job, [f"data={data}", NO_MINE, f"data.groups={groups}", *extra])
    if "recipe" in steps:
        pipeline("m3-recipe", m3_job, [f"data={data}"])
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
