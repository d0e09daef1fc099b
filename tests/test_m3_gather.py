"""All three M3 heads gather across workers: the m3 task's loss on 2 Ray Train
workers (gloo, half the queries each with their groups) equals one process
over the whole batch, per head, loss terms and gradients, to 1e-5 (what
tests/test_gather_gradients.py shows for the dense InfoNCE)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

# 8 queries of 3 passages (2 workers x 4): groups 0-7 of the toy data, whose
# negatives are other queries' positives, some on the other worker.
GROUPS, GROUP_SIZE = list(range(8)), 3
HEADS = ("dense", "sparse", "multivector")
# The three heads together (BGE-M3's weights), then each head alone in the
# loss and the ensemble, so that the backbone's gradient is that head's own.
VARIANTS = {"all_heads": []} | {
    f"{h}_only": [
        f"train.m3.{k}.{o}={float(o == h)}" for k in ("weights", "loss_weights") for o in HEADS
    ]
    for h in HEADS
}
PARAMS = {"sparse_head": "embedder.sparse_head.", "multivector_head": "embedder.multivector_head."}


def _overrides(model: str, data: str, *extra: str) -> list[str]:
    return [
        f"model={model}",
        f"data.groups={data}/groups.jsonl",
        f"data.corpus={data}/corpus.jsonl",
        "contract.pooling=mean",  # cls of a random BERT barely varies: a weak dense signal
        "contract.query_max_len=8",
        "contract.passage_max_len=16",
        "train.task=m3",
        f"train.group_size={GROUP_SIZE}",
        "train.loss.temperature=0.1",
        "train.m3.self_distill=true",
        "train.m3.self_distill_start=0",
        *extra,
    ]


def _pass(task: Any, tok: Any, batch: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """One forward and backward of the m3 task: its loss terms and the
    gradients of the sparse head, the multi-vector head and the backbone."""
    import torch

    torch.manual_seed(0)  # the heads start from the same random weights everywhere
    module = task.build(tok).train()
    task.step = 0
    out = task.loss_from_reps(
        [task.represent(module, batch, torch.device("cpu"))], batch, torch.device("cpu")
    )
    out.loss.backward()
    terms = {"loss": out.value, **{k: float(v) for k, v in out.terms.items()}}
    groups: dict[str, list[Any]] = {"sparse_head": [], "multivector_head": [], "backbone": []}
    for name, p in module.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        key = next((k for k, pre in PARAMS.items() if name.startswith(pre)), "backbone")
        groups[key].append(g.flatten())
    return terms, {k: torch.cat(v) for k, v in groups.items()}


def _worker(config: dict[str, Any]) -> None:
    import torch.distributed as dist
    from ray import train

    from raysys.config import load_config
    from raysys.models.backbone import load_tokenizer
    from raysys.train.tasks.m3 import M3Task

    rank, world = train.get_context().get_world_rank(), train.get_context().get_world_size()
    b = len(GROUPS) // world
    results = {}
    for name, extra in VARIANTS.items():
        task = M3Task(load_config(None, _overrides(config["model"], config["data"], *extra)))
        # The reference: one process, the whole batch, nothing to gather.
        ref_task = M3Task(
            load_config(
                None,
                _overrides(
                    config["model"], config["data"], *extra, "train.loss.gather_negatives=false"
                ),
            )
        )
        tok = load_tokenizer(task.model_path())
        collate = task.collator(task.load_data(), tok)
        terms, grads = _pass(task, tok, collate(GROUPS[rank * b : (rank + 1) * b], 0))
        for g in grads.values():
            dist.all_reduce(g)
            g /= world  # what DDP / DeepSpeed do with gradients
        full = collate(GROUPS, 0)
        ref_terms, ref_grads = _pass(ref_task, tok, full)
        cross = sum(  # known positives of a query among the other worker's passages
            bool(
                full.query_positive_ids[i]
                & set(full.passage_ids[j * GROUP_SIZE : (j + 1) * GROUP_SIZE])
            )
            for i in range(len(GROUPS))
            for j in range(len(GROUPS))
            if i // b != j // b
        )
        results[name] = {
            "terms": terms,
            "ref_terms": ref_terms,
            "grad_diff": {k: (grads[k] - ref_grads[k]).abs().max().item() for k in grads},
            "grad_norm": {k: ref_grads[k].norm().item() for k in ref_grads},
            "cross_worker_false_negatives": cross,
        }
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(results))


def test_m3_heads_gather_like_one_process(ray_local, toy_data, tmp_path):
    """Every head's loss term and the gradients of the sparse head, the
    multi-vector head and the backbone, with self-distillation from the
    ensemble over the gathered batch: 2 workers equal 1 process to 1e-5."""
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tests.helpers import tiny_bert

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    model = tiny_bert(tmp_path / "bert", dropout=0.0)  # both sides see the same activations
    out = tmp_path / "result.json"
    TorchTrainer(
        _worker,
        train_loop_config={"model": str(model), "data": str(toy_data), "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="m3-gather", storage_path=str(tmp_path / "ray")),
    ).fit()
    results = json.loads(out.read_text())
    print("m3 gather:", json.dumps(results))
    heads = {"dense": "backbone", "sparse": "sparse_head", "multivector": "multivector_head"}
    off = []  # every difference over 1e-5, so that a failure names each head it reaches
    for name, r in results.items():
        assert r["cross_worker_false_negatives"] > 0, name  # the mask crosses workers too
        terms, ref = r["terms"], r["ref_terms"]
        assert set(terms) == set(ref) and {"ensemble", "self_distill.sparse"} <= set(terms)
        off += [
            f"{name} {k}: {terms[k]:.6g} vs {v:.6g}"
            for k, v in ref.items()
            if abs(terms[k] - v) > 1e-5
        ]
        off += [f"{name} grad {k}: {d:.2g}" for k, d in r["grad_diff"].items() if d > 1e-5]
        # The comparisons are not between zeros: the heads in the loss have gradients.
        own = [heads[h] for h in HEADS if name in ("all_heads", f"{h}_only")]
        assert all(r["grad_norm"][k] > 1e-3 for k in {*own, "backbone"}), (name, r["grad_norm"])
    assert not off, "2 workers differ from 1 process: " + "; ".join(off)
