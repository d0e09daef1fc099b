"""What a bigger contrastive batch buys: all-MiniLM-L6-v2 fine-tuned on
SciFact's train queries at global batch 32 and at global batch 256 (128
queries per worker on 2 workers, through GradCache in chunks of 16), the
same epochs (1) and everything else as ``jobs/scifact.yaml`` (group of 4,
random negatives, lr 5e-5, ZeRO-2) but texts cut at 128 tokens (half the
recipe's 256, to halve the CPU time), then encoded, searched exactly and
evaluated on the 300 test queries.

At the same epochs the big batch takes 8× fewer optimizer steps; with
``--scaled-lr`` a third run uses the big batch with lr × sqrt(8).

    .venv/bin/python benchmarks/grad_cache_scifact.py --data ../shared/data/scifact

Writes ``benchmarks/results/grad_cache_scifact.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def run(name: str, data: str, out: Path, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "raysys.cli",
        "pipeline",
        str(ROOT / "jobs" / "scifact.yaml"),
        f"data={data}",
        "index.factory=Flat",
        "contract.query_max_len=128",
        "contract.passage_max_len=128",
        f"train.checkpoint.run_name=gc-scifact-{name}",
        f"train.checkpoint.storage_path={out / 'ray'}",
        *extra,
        "--out",
        str(out / name),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / name / "metrics.json").read_text())
    summary_file = out / name / "train" / "train_summary.json"
    history = json.loads(summary_file.read_text())["history"] if summary_file.is_file() else []
    return {
        "overrides": extra,
        "metrics": metrics,
        "optimizer_steps": len(history),
        "losses": [h["loss"] for h in history],
        "train_examples_per_s": (
            sum(h["examples_per_s"] for h in history) / len(history) if history else None
        ),
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--scaled-lr", action="store_true")
    ap.add_argument("--keep", default="", help="keep the runs here (default: a temp folder)")
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    args = ap.parse_args()
    out = Path(args.keep or tempfile.mkdtemp(prefix="raysys-gc-scifact-"))
    out.mkdir(parents=True, exist_ok=True)
    runs = {
        "base_untrained": ["train.enabled=false"],
        "global_32": ["train.per_device_queries=16"],
        "global_256_grad_cache": [
            "train.per_device_queries=128",
            "train.grad_cache.chunk_size=16",
        ],
    }
    if args.scaled_lr:
        runs["global_256_grad_cache_lr_sqrt8"] = [
            *runs["global_256_grad_cache"],
            f"train.optim.lr={5e-5 * math.sqrt(8):.3g}",
        ]
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    result_file = RESULTS / "grad_cache_scifact.json"
    results = json.loads(result_file.read_text()) if result_file.is_file() else {}
    results.pop("setup", None)
    results.pop("written", None)
    for name, extra in runs.items():
        results[name] = run(name, args.data, out, extra)
        print(name, json.dumps(results[name]["metrics"]), flush=True)
        write_results(
            result_file,
            {"setup": "jobs/scifact.yaml, texts cut at 128 tokens, 1 epoch, exact search", **results},
            "benchmarks/grad_cache_scifact.py",
        )


if __name__ == "__main__":
    main()
