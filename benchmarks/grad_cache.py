"""GradCache's memory and step time against the standard step, side by side.

One training worker (raysys's engine, task and step strategies, in process:
:func:`raysys.train.inprocess.train_steps`) trains all-MiniLM-L6-v2 on
SciFact's train queries at per-worker batch B, 4B and 16B queries, each with
its hard-negative group, with the standard one-pass step and with GradCache
at a fixed chunk of B queries. Every configuration runs in a fresh process,
so its peak is its own:

* CPU: peak RSS (``ru_maxrss``) and the peak above the RSS once the engine is
  built (the activations and the batch: what grows with B);
* GPU (``--device cuda``): peak allocated memory, and the same above the
  engine's.

Step time is the median of the steps after the first (warm-up). Writes
``benchmarks/results/grad_cache.json`` (``--device cuda``:
``grad_cache_gpu.json``) and prints a table.

    .venv/bin/python benchmarks/grad_cache.py --data ../shared/data/scifact
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _results import write_results

RESULTS = Path(__file__).parent / "results"


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def one_config(args: argparse.Namespace, batch: int, chunk: int) -> dict:
    """Train ``args.steps`` steps at per-worker ``batch`` (chunk 0: standard step)."""
    import torch

    from raysys.config import load_config
    from raysys.train.inprocess import train_steps

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(
        None,
        [
            f"model={args.model}",
            f"data={args.data}",
            "data.sampled_negatives=8",
            "contract.pooling=mean",
            "contract.query_max_len=64",
            f"contract.passage_max_len={args.passage_len}",
            f"train.per_device_queries={batch}",
            f"train.group_size={args.group}",
            f"train.zero_stage={args.zero}",
            f"train.max_steps={args.steps}",
            f"train.grad_cache.chunk_size={chunk}",
            f"train.precision={'bf16' if device.type == 'cuda' else 'fp32'}",
        ],
    )
    ready: dict[str, int] = {}

    def on_ready() -> None:
        ready["rss"] = _rss_bytes()
        if device.type == "cuda":
            ready["allocated"] = int(torch.cuda.memory_allocated(device))

    t0 = time.perf_counter()
    res = train_steps(cfg, args.steps, device, on_ready=on_ready)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timed = res.seconds[1:] or res.seconds
    out = {
        "per_worker_queries": batch,
        "passages_per_step": batch * args.group,
        "chunk": chunk,
        "step_s_median": statistics.median(timed),
        "step_s": res.seconds,
        "tokens_per_step": statistics.mean(res.tokens),
        "losses": res.losses,
        "peak_rss_bytes": peak_rss,
        "ready_rss_bytes": ready["rss"],
        "peak_above_ready_bytes": peak_rss - ready["rss"],
        "wall_s": time.perf_counter() - t0,
    }
    if device.type == "cuda":
        out["peak_allocated_bytes"] = res.peak_bytes
        out["peak_allocated_above_ready_bytes"] = res.peak_bytes - ready["allocated"]
    return out


def run_child(args: argparse.Namespace, batch: int, chunk: int) -> dict:
    """:func:`one_config` in a fresh Python process (its own peak)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        f"{batch},{chunk}",
        *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "child"],
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"configuration B={batch} chunk={chunk} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).parents[2] / "shared/data/scifact"))
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--base", type=int, default=4, help="B: queries per worker (and the chunk)")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--passage-len", type=int, default=128)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        batch, chunk = (int(x) for x in args.child.split(","))
        print(json.dumps(one_config(args, batch, chunk)))
        return

    b = args.base
    rows = []
    for mult in (1, 4, 16):
        for chunk in (0, b):
            r = run_child(args, b * mult, chunk)
            rows.append(r)
            mib = r["peak_above_ready_bytes"] / 2**20
            print(
                f"B={b * mult:4d} {'grad_cache' if chunk else 'standard  '} "
                f"peak RSS {r['peak_rss_bytes'] / 2**20:7.0f} MiB (+{mib:6.0f} above ready) "
                f"step {r['step_s_median']:6.2f} s",
                flush=True,
            )
    key = "peak_allocated_bytes" if args.device.startswith("cuda") else "peak_rss_bytes"
    by = {(r["per_worker_queries"], r["chunk"]): r for r in rows}
    summary = {}
    for name, chunk in (("standard", 0), ("grad_cache", b)):
        base = by[(b, chunk)]
        summary[name] = {
            f"peak_ratio_{m}B": by[(b * m, chunk)][key] / base[key] for m in (4, 16)
        } | {
            f"above_ready_ratio_{m}B": by[(b * m, chunk)]["peak_above_ready_bytes"]
            / base["peak_above_ready_bytes"]
            for m in (4, 16)
        }
    summary["step_time_ratio_grad_cache_vs_standard"] = {
        f"{m}B": by[(b * m, b)]["step_s_median"] / by[(b * m, 0)]["step_s_median"]
        for m in (1, 4, 16)
    }
    out = {
        "setup": {k: v for k, v in vars(args).items() if k != "child"},
        "memory_key": key,
        "summary": summary,
        "runs": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "grad_cache_gpu.json" if args.device.startswith("cuda") else "grad_cache.json"
    write_results(RESULTS / name, out, "benchmarks/grad_cache.py")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
