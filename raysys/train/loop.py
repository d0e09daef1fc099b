"""The Ray Train per-worker training function: retriever (bi-encoder, InfoNCE)
or reranker (cross-encoder, grouped CE / BCE), chosen by ``train.task``.

Every rank sees the same deterministic order: epoch ``e`` shuffles the groups
with ``(seed, e)``, each optimizer step takes ``grad_accum`` global
micro-batches, and rank ``r`` takes its slice of each. Negatives are drawn
from ``(seed, epoch, group)`` and dropout from ``(seed, micro-step, rank)``, so
a run resumed from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raysys.config import Config, _build
from raysys.contract import EncodingContract
from raysys.data.collator import RerankCollator, RetrievalCollator
from raysys.data.groups import TrainingSet
from raysys.losses import grouped_ce, info_nce, pointwise_bce
from raysys.models.embedder import Embedder, build_backbone, export_embedder, load_tokenizer
from raysys.models.hub import resolve_model
from raysys.models.reranker import RerankContract, Reranker, export_reranker
from raysys.train.engine import deepspeed_config, initialize, setup_accelerator_env

log = logging.getLogger(__name__)

# Fault-injection knob for tests: sleep this long before each optimizer step.
THROTTLE_S = float(os.environ.get("RAYSYS_TRAIN_THROTTLE_S", "0") or 0)
HISTORY_FILE = "history.json"
EXPORT_DIR = "export"
PROBE_FILE = "train_probe.json"


class DualEncoder(nn.Module):
    """One module call encodes queries and passages (one DeepSpeed forward)."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, q_ids, q_mask, p_ids, p_mask):  # noqa: ANN001, ANN201
        return self.embedder(q_ids, q_mask), self.embedder(p_ids, p_mask)


def plan_steps(n_groups: int, train: Any, world: int) -> tuple[int, int]:
    """Return (micro-batches per epoch, total optimizer steps)."""
    global_batch = train.per_device_queries * world
    micro_per_epoch = n_groups // global_batch
    if micro_per_epoch < 1:
        raise ValueError(
            f"{n_groups} training groups cannot fill one global batch of {global_batch} "
            f"queries ({train.per_device_queries} per worker x {world} workers)"
        )
    if train.max_steps > 0:
        return micro_per_epoch, train.max_steps
    steps = int(train.epochs * micro_per_epoch) // train.grad_accum
    return micro_per_epoch, max(1, steps)


def micro_batch_indices(
    n_groups: int, train: Any, micro: int, micro_per_epoch: int, rank: int, world: int
) -> tuple[int, list[int]]:
    """(epoch, group indices) of rank ``rank`` in global micro-batch ``micro``."""
    epoch, pos = divmod(micro, micro_per_epoch)
    perm = np.random.default_rng([train.seed, epoch]).permutation(n_groups)
    b = train.per_device_queries
    start = (pos * world + rank) * b
    return epoch, [int(i) for i in perm[start : start + b]]


def _probe_embeddings(embedder: Embedder, tokenizer: Any, data: TrainingSet) -> dict[str, Any]:
    """Training-time embeddings of a few fixed texts, to check the export against."""
    c = embedder.contract
    rows = [data.positives[i][0] for i in range(min(4, len(data)))]
    _, titles, texts = data.texts(rows)
    queries = [c.format_query(t) for t in data.queries[:4]]
    passages = [c.format_passage(t, ti) for t, ti in zip(texts, titles, strict=True)]
    device = next(embedder.parameters()).device
    embedder.eval()
    with torch.no_grad():
        q = c.tokenize(tokenizer, queries, "query")
        p = c.tokenize(tokenizer, passages, "passage")
        qe = embedder(q["input_ids"].to(device), q["attention_mask"].to(device))
        pe = embedder(p["input_ids"].to(device), p["attention_mask"].to(device))
    embedder.train()
    return {
        "queries": queries,
        "passages": passages,
        "query_embeddings": qe.float().cpu().tolist(),
        "passage_embeddings": pe.float().cpu().tolist(),
    }


def _full_state_dict(module: nn.Module, stage: int) -> dict[str, torch.Tensor] | None:
    """The full (gathered) weights of ``module`` on rank 0, else None."""
    import deepspeed
    import torch.distributed as dist

    backbone = module
    rank = dist.get_rank() if dist.is_initialized() else 0
    if stage == 3:
        params = list(backbone.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            sd = (
                {k: v.detach().float().cpu().clone() for k, v in backbone.state_dict().items()}
                if rank == 0
                else None
            )
        return sd
    if rank != 0:
        return None
    return {k: v.detach().float().cpu().clone() for k, v in backbone.state_dict().items()}


def _retrieval_loss(engine: Any, batch: Any, t: Any, device: torch.device) -> torch.Tensor:
    q, p = engine(
        batch.queries["input_ids"].to(device),
        batch.queries["attention_mask"].to(device),
        batch.passages["input_ids"].to(device),
        batch.passages["attention_mask"].to(device),
    )
    fn_mask = t.mask_false_negatives
    return info_nce(
        q,
        p,
        group_size=t.group_size,
        temperature=t.temperature,
        in_batch=t.in_batch_negatives,
        gather=t.gather_negatives,
        passage_ids=batch.passage_ids if fn_mask else None,
        query_positive_ids=batch.query_positive_ids if fn_mask else None,
    )


def _probe_scores(model: Reranker, tokenizer: Any, data: TrainingSet) -> dict[str, Any]:
    """Training-time scores of a few fixed pairs, to check the export against."""
    c = model.contract
    rows = [data.positives[i][0] for i in range(min(4, len(data)))]
    _, titles, texts = data.texts(rows)
    pairs = [
        c.format_pair(q, ti, tx) for q, ti, tx in zip(data.queries[:4], titles, texts, strict=True)
    ]
    enc = tokenizer.pad({"input_ids": c.token_ids(tokenizer, pairs)}, return_tensors="pt")
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        scores = model(enc["input_ids"].to(device), enc["attention_mask"].to(device))
    model.train()
    return {"pairs": pairs, "scores": scores.float().cpu().tolist()}


def train_func(config: dict[str, Any]) -> dict[str, Any]:
    """Per-worker entry point for ``TorchTrainer``."""
    import ray.train

    cfg: Config = _build(Config, config["cfg"])
    t = cfg.train
    setup_accelerator_env(t.use_gpu)
    import deepspeed  # after the accelerator env is set
    import torch.distributed as dist

    # Reuse the process group Ray Train set up (gloo on CPU, nccl on GPU).
    deepspeed.init_distributed()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    device = (
        torch.device(f"cuda:{ctx.get_local_rank()}")
        if t.use_gpu and torch.cuda.is_available()
        else torch.device("cpu")
    )

    data: TrainingSet = config["data"]
    if not isinstance(data, TrainingSet):  # an ObjectRef from the driver
        data = ray.get(data)
    rerank = t.task == "rerank"
    model_cfg = cfg.reranker if rerank else cfg.model
    model_path = resolve_model(model_cfg.path)
    contract: Any = cfg.rerank_contract() if rerank else cfg.encoding_contract()
    tokenizer = load_tokenizer(model_path)
    micro_per_epoch, total_steps = plan_steps(len(data), t, world)
    ds_config = deepspeed_config(t, world)

    hf_ds = None
    if t.zero_stage == 3:
        # Partitioned construction: weights are sharded while they load.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)
    # Same seed on every rank and every run: LoRA A matrices (and random_init
    # weights) must not depend on the process.
    torch.manual_seed(t.seed)
    backbone = build_backbone(
        model_path,
        random_init=model_cfg.random_init,
        lora=model_cfg.lora,
        gradient_checkpointing=t.gradient_checkpointing,
    )
    if rerank:
        model: nn.Module = Reranker(backbone, contract)
        trained: nn.Module = model
    else:
        model = DualEncoder(Embedder(backbone, contract))
        trained = model.embedder.backbone
    engine, _, scheduler = initialize(model, t, ds_config, total_steps)
    del hf_ds

    # -- resume ---------------------------------------------------------------------
    start_step, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and t.resume_from:
        ckpt = ray.train.Checkpoint.from_directory(t.resume_from)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, load_module_strict=False)
            start_step = int(client["step"])
            hist_path = Path(d) / HISTORY_FILE
            history = json.loads(hist_path.read_text()) if hist_path.is_file() else []
        history = [h for h in history if h["step"] <= start_step]
        if rank == 0:
            log.info("resumed at step %d of %d", start_step, total_steps)

    collator: Any = (RerankCollator if rerank else RetrievalCollator)(
        data, tokenizer, contract, t.group_size
    )
    use_gather = t.gather_negatives and t.in_batch_negatives and not rerank
    stop_at = min(total_steps, t.stop_after) if t.stop_after > 0 else total_steps

    def save(step: int, metrics: dict[str, Any], final: bool) -> None:
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=f"step-{step}", client_state={"step": step})
            sd = _full_state_dict(trained, t.zero_stage) if final else None
            probe = None
            if final:
                probe = (
                    _probe_scores(engine.module, tokenizer, data)
                    if rerank
                    else _probe_embeddings(engine.module.embedder, tokenizer, data)
                )
            if rank == 0:
                (Path(d) / HISTORY_FILE).write_text(json.dumps(history))
                if final and sd is not None:
                    export = _export_reranker if rerank else _export_from_state_dict
                    export(cfg, model_path, tokenizer, contract, sd, Path(d) / EXPORT_DIR)
                    (Path(d) / EXPORT_DIR / PROBE_FILE).write_text(json.dumps(probe))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    engine.train()
    metrics: dict[str, Any] = {"step": start_step}
    t0, n_examples, n_tokens = time.perf_counter(), 0, 0
    for step in range(start_step, stop_at):
        if THROTTLE_S:
            time.sleep(THROTTLE_S)
        step_loss = 0.0
        for k in range(t.grad_accum):
            micro = step * t.grad_accum + k
            epoch, idx = micro_batch_indices(len(data), t, micro, micro_per_epoch, rank, world)
            torch.manual_seed(t.seed * 1_000_003 + micro * 101 + rank)
            batch = collator(idx, epoch, t.seed)
            if rerank:
                scores = engine(
                    batch.pairs["input_ids"].to(device), batch.pairs["attention_mask"].to(device)
                )
                loss_fn = grouped_ce if t.rerank_loss == "grouped_ce" else pointwise_bce
                loss = loss_fn(scores, t.group_size)
            else:
                loss = _retrieval_loss(engine, batch, t, device)
            engine.backward(loss)
            engine.step()
            # The gathered loss is scaled by world size for exact gradients.
            step_loss += loss.item() / (world if use_gather and world > 1 else 1) / t.grad_accum
            n_examples += len(idx)
            n_tokens += batch.num_tokens()
        done = step + 1
        if done % t.log_steps == 0 or done == stop_at:
            counts = torch.tensor([n_examples, n_tokens, step_loss], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(counts)
            elapsed = time.perf_counter() - t0
            metrics = {
                "step": done,
                "total_steps": total_steps,
                "epoch": (done * t.grad_accum) / micro_per_epoch,
                "loss": counts[2].item() / world,
                "lr": scheduler.get_last_lr()[0],
                "examples_per_s": counts[0].item() / elapsed,
                "tokens_per_s": counts[1].item() / elapsed,
            }
            history.append(metrics)
            if rank == 0:
                print(
                    f"[raysys] step {done}/{total_steps} loss {metrics['loss']:.4f} "
                    f"lr {metrics['lr']:.2e} {metrics['examples_per_s']:.1f} ex/s "
                    f"{metrics['tokens_per_s']:.0f} tok/s",
                    flush=True,
                )
            t0, n_examples, n_tokens = time.perf_counter(), 0, 0
        is_last = done == stop_at
        if is_last or (t.save_steps and done % t.save_steps == 0):
            save(done, metrics, final=done == total_steps)
        elif done % t.log_steps == 0:
            ray.train.report(metrics)
    return {
        "history": history,
        "total_steps": total_steps,
        "started_at": start_step,
        "stopped_at": stop_at,
    }


def _export_from_state_dict(
    cfg: Config,
    model_path: str,
    tokenizer: Any,
    contract: EncodingContract,
    state_dict: dict[str, torch.Tensor],
    out: Path,
) -> None:
    """Rebuild the model un-partitioned on rank 0, load the gathered weights, export."""
    backbone = build_backbone(model_path, random_init=True, lora=cfg.model.lora)
    missing, unexpected = backbone.load_state_dict(state_dict, strict=False)
    if unexpected or [m for m in missing if "lora_" in m]:
        raise RuntimeError(
            f"export: state dict mismatch (missing {missing}, unexpected {unexpected})"
        )
    os.makedirs(out, exist_ok=True)
    export_embedder(backbone, tokenizer, contract, out, merge=not cfg.model.export_adapter)


def _export_reranker(
    cfg: Config,
    model_path: str,
    tokenizer: Any,
    contract: RerankContract,
    state_dict: dict[str, torch.Tensor],
    out: Path,
) -> None:
    """Rebuild the reranker un-partitioned on rank 0, load the gathered weights, export."""
    r = cfg.reranker
    model = Reranker(build_backbone(model_path, random_init=True, lora=r.lora), contract)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or missing:
        raise RuntimeError(
            f"export: state dict mismatch (missing {missing}, unexpected {unexpected})"
        )
    head = {k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")}
    export_reranker(model, head, tokenizer, out)
