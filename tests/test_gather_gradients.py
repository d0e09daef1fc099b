"""Evidence 1: gradients with negatives gathered across 2 Ray Train workers equal
those of one process over the concatenated batch."""

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

N_Q, G = 8, 3  # 8 queries over 2 workers, 1 positive + 2 negatives each


def _batch():
    queries = [f"topic w{k} w{k + 1}" for k in range(N_Q)]
    passages, ids, pos = [], [], []
    for k in range(N_Q):
        passages += [f"about w{k} w{k + 1} w{k + 50}", f"about w{k + 20}", f"w{k + 30} w{k + 40}"]
        # Query 5's negative is query 1's positive: a false negative across workers.
        ids += [f"d{k}", "d1" if k == 5 else f"n{k}a", f"n{k}b"]
        pos.append({f"d{k}"})
    return queries, passages, ids, pos


def _worker(config):
    import torch
    import torch.distributed as dist
    from ray import train

    from raysys.contract import EncodingContract
    from raysys.losses import info_nce
    from raysys.models.backbone import build_backbone, load_tokenizer
    from raysys.models.embedder import Embedder

    rank, world = train.get_context().get_world_rank(), train.get_context().get_world_size()
    path, mask = config["model"], config["mask"]
    contract = EncodingContract(pooling="last", append_eos=True, normalize=True)
    tok = load_tokenizer(path)
    queries, passages, ids, pos = _batch()

    def run(qs, ps, pids, qpos, gather):
        model = Embedder(build_backbone(path), contract).train()
        qt = contract.tokenize(tok, qs, "query")
        pt = contract.tokenize(tok, ps, "passage")
        loss = info_nce(
            model(qt["input_ids"], qt["attention_mask"]),
            model(pt["input_ids"], pt["attention_mask"]),
            group_size=G,
            temperature=0.05,
            gather=gather,
            passage_ids=pids if mask else None,
            query_positive_ids=qpos if mask else None,
        )
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    b = N_Q // world
    qs = slice(rank * b, (rank + 1) * b)
    ps = slice(rank * b * G, (rank + 1) * b * G)
    loss, grad = run(queries[qs], passages[ps], ids[ps], pos[qs], gather=True)
    dist.all_reduce(grad)
    grad /= world  # what DDP / DeepSpeed do with gradients
    ref_loss, ref_grad = run(queries, passages, ids, pos, gather=False)
    if rank == 0:
        Path(config["out"]).write_text(
            json.dumps(
                {
                    "max_abs_diff": (grad - ref_grad).abs().max().item(),
                    "grad_norm": ref_grad.norm().item(),
                    "loss": loss.item() / world,
                    "ref_loss": ref_loss.item(),
                }
            )
        )


@pytest.mark.parametrize("mask", [False, True], ids=["plain", "false-negative-mask"])
def test_gathered_gradients_are_exact(ray_local, tiny_llama_dir, tmp_path, mask):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path / "result.json"
    TorchTrainer(
        _worker,
        train_loop_config={"model": str(tiny_llama_dir), "out": str(out), "mask": mask},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="gather", storage_path=str(tmp_path / "ray")),
    ).fit()
    r = json.loads(out.read_text())
    assert r["grad_norm"] > 1e-3  # the comparison is not between zeros
    assert r["loss"] == pytest.approx(r["ref_loss"], abs=1e-5)
    assert r["max_abs_diff"] < 1e-5, r
