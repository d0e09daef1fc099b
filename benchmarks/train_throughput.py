"""Training throughput: `raysys train` (Ray Train + DeepSpeed, 2 CPU workers) against a
plain single-process torch loop on the same model, data and global batch.

Also measures the cost of the cross-worker gather by running raysys with the
gather on and off (in-batch negatives local to each worker).

    .venv/bin/python benchmarks/train_throughput.py --data ../shared/data/scifact

Prints a table and writes benchmarks/results/train_throughput.json. Steps
after the first (warm-up) are timed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from _results import write_results

from raysys.config import load_config
from raysys.data.groups import load_training_set
from raysys.losses import info_nce
from raysys.models.backbone import build_backbone, load_tokenizer
from raysys.models.embedder import Embedder
from raysys.models.hub import resolve_model
from raysys.train.launch import run_training
from raysys.train.loop import micro_batch_indices, plan_steps
from raysys.train.tasks.retrieve import RetrievalCollator


def overrides(args: argparse.Namespace, extra: list[str]) -> list[str]:
    return [
        f"model={args.model}",
        f"data={args.data}",
        f"data.max_queries={args.queries}",
        "data.sampled_negatives=8",
        "contract.pooling=mean",
        "contract.query_max_len=64",
        f"contract.passage_max_len={args.passage_len}",
        f"train.per_device_queries={args.per_device}",
        f"train.group_size={args.group}",
        f"train.max_steps={args.steps}",
        "train.scaling.num_workers=2",
        "train.log_steps=1",
        *extra,
    ]


def plain_torch_loop(args: argparse.Namespace) -> dict[str, float]:
    """One process, all cores, the same global batch (2 x per-device queries)."""
    cfg = load_config(None, overrides(args, []))
    torch.set_num_threads(os.cpu_count() or 1)
    data = load_training_set(cfg.data, seed=cfg.train.seed)
    path = resolve_model(cfg.model.path)
    tok = load_tokenizer(path)
    contract = cfg.encoding_contract()
    model = Embedder(build_backbone(path), contract).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.optim.lr)
    collate = RetrievalCollator(data, tok, contract, cfg.train.group_size, cfg.train.seed)
    t = cfg.train
    micro_per_epoch, _ = plan_steps(len(data), t, 2)
    tokens, timed = 0, 0.0
    for step in range(args.steps):
        idx: list[int] = []
        for rank in range(2):  # the same queries the two workers would take
            epoch, part = micro_batch_indices(len(data), t, step, micro_per_epoch, rank, 2)
            idx += part
        start = time.perf_counter()
        batch = collate(idx, epoch)
        q = model(batch.queries["input_ids"], batch.queries["attention_mask"])
        p = model(batch.passages["input_ids"], batch.passages["attention_mask"])
        loss = info_nce(q, p, group_size=t.group_size, temperature=t.loss.temperature, gather=False)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.optim.max_grad_norm)
        opt.step()
        if step > 0:
            timed += time.perf_counter() - start
            tokens += batch.num_tokens()
    return {"tokens_per_s": tokens / timed}


def raysys_run(args: argparse.Namespace, name: str, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            overrides(
                args,
                [
                    f"train.checkpoint.run_name={name}",
                    f"train.checkpoint.storage_path={tmp}/ray",
                    *extra,
                ],
            ),
        )
        outcome = run_training(cfg, Path(tmp) / "out")
    hist = outcome.history[1:]  # drop the warm-up step
    # tokens_per_s is per logging window (one step here): average by time.
    # Each entry is one step of a fixed global batch: weight steps by their time.
    tokens = sum(h["tokens_per_s"] / h["examples_per_s"] for h in hist)
    secs = sum(1.0 / h["examples_per_s"] for h in hist)
    return {"tokens_per_s": tokens / secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/scifact")
    )
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--per-device", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--passage-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    baseline = plain_torch_loop(args)
    zero0 = raysys_run(args, "bench-z0", ["train.zero_stage=0"])
    zero2 = raysys_run(args, "bench-z2", ["train.zero_stage=2"])
    no_gather = raysys_run(
        args, "bench-nogather", ["train.zero_stage=0", "train.loss.gather_negatives=false"]
    )
    res = {
        "setup": vars(args),
        "plain_torch_single_process": baseline,
        "raysys_zero0": zero0,
        "raysys_zero2": zero2,
        "raysys_zero0_no_gather": no_gather,
        "ratio_zero0_vs_plain": zero0["tokens_per_s"] / baseline["tokens_per_s"],
        "ratio_zero2_vs_plain": zero2["tokens_per_s"] / baseline["tokens_per_s"],
        "gather_cost": 1.0 - zero0["tokens_per_s"] / no_gather["tokens_per_s"],
    }
    out = Path(__file__).parent / "results" / "train_throughput.json"
    out.parent.mkdir(exist_ok=True)
    write_results(out, res, "benchmarks/train_throughput.py")
    print(f"{'run':32s} tokens/s")
    for k in (
        "plain_torch_single_process",
        "raysys_zero0",
        "raysys_zero2",
        "raysys_zero0_no_gather",
    ):
        print(f"{k:32s} {res[k]['tokens_per_s']:8.0f}")
    print(f"ratio raysys ZeRO-0 / plain: {res['ratio_zero0_vs_plain']:.2f}")
    print(f"ratio raysys ZeRO-2 / plain: {res['ratio_zero2_vs_plain']:.2f}")
    print(f"gather cost (share of throughput lost): {res['gather_cost']:.1%}")


if __name__ == "__main__":
    main()
