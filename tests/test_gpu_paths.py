"""The GPU code paths that can be checked without a GPU (issue #15): where
collectives put their tensors, GPU requests that cannot be met, training
precision, inference settings and batching, ZeRO-3 export, FAISS codes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def collectives_on(monkeypatch, device: torch.device):
    """A process-group stand-in: each collective checks that its tensors are
    on ``device`` (NCCL refuses CPU tensors) and records the call."""
    import torch.distributed as dist

    calls: list[tuple[str, torch.device]] = []

    def check(name, tensors):
        for t in tensors:
            assert t.device == device, f"{name} of a tensor on {t.device}, engine on {device}"
            calls.append((name, t.device))

    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: check("all_reduce", [t]))
    monkeypatch.setattr(dist, "all_gather", lambda out, t, *a, **k: check("all_gather", [t, *out]))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    yield calls


def test_step_metrics_are_reduced_on_the_engine_device(monkeypatch):
    from raysys.train.loop import sum_across_workers

    # "meta" stands in for cuda:0: a tensor made on the CPU fails the check.
    meta = torch.device("meta")
    with collectives_on(monkeypatch, meta) as calls:
        with pytest.raises(NotImplementedError):  # .tolist() of a meta tensor
            sum_across_workers([1.0, 2.0, 3.0], meta, world=2)
    assert calls == [("all_reduce", meta)]


def _sum_on_two_ranks(rank: int, init: str, out: str) -> None:
    """One of 2 gloo processes: each sums its own numbers over both."""
    import torch.distributed as dist

    from raysys.train.loop import sum_across_workers

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        got = sum_across_workers([1.0 + rank, 10.0 * rank, 0.25], torch.device("cpu"), world=2)
        Path(f"{out}.{rank}").write_text(repr(got))
    finally:
        dist.destroy_process_group()


def test_step_metrics_sum_over_two_real_processes(tmp_path):
    """Two processes, gloo: every rank gets the element-wise sum of both."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "sum")
    mp.spawn(_sum_on_two_ranks, args=(f"file://{tmp_path / 'rdzv'}", out), nprocs=2, join=True)
    for rank in (0, 1):
        assert Path(f"{out}.{rank}").read_text() == repr([3.0, 10.0, 0.5])


def test_negatives_are_gathered_on_the_embeddings_device(monkeypatch):
    from raysys.losses import gather_with_local_grad

    meta = torch.device("meta")
    with collectives_on(monkeypatch, meta) as calls:
        out = gather_with_local_grad(torch.empty(3, 4, device=meta))
    assert out.shape == (6, 4) and {d for _, d in calls} == {meta}


def test_a_gpu_worker_selects_its_gpu_and_reduces_its_metrics_there(monkeypatch, tmp_path):
    """``train_func`` on rank 0 of 2 (local rank 1) of a GPU run, with the
    engine, Ray Train and CUDA stood in for: it makes ``cuda:1`` the current
    device, steps there, and every step's metrics are summed over the workers
    on ``cuda:1``. The old loop all-reduced a CPU float64 tensor, which NCCL
    refuses (any collective here of a tensor off ``cuda:1`` fails the test)."""
    import types

    import ray.train

    import raysys.train.loop as loop
    from raysys.config import load_config, to_dict
    from raysys.train.tasks.base import Task

    gpu = torch.device("cuda:1")
    cfg = load_config(
        None,
        [
            "train.scaling.use_gpu=true",
            "train.per_device_queries=2",
            "train.max_steps=4",
            "train.checkpoint.stop_after=3",  # no final export
            "train.log_steps=1",
        ],
    )

    class Engine:
        module = torch.nn.Linear(2, 2)

        def train(self) -> None:
            pass

        def save_checkpoint(self, d, tag, client_state) -> None:  # noqa: ANN001
            pass

    class Stub(Task):
        def load_data(self) -> list[int]:
            return list(range(8))

        def model_path(self) -> str:
            return "unused"

        def build(self, tokenizer):  # noqa: ANN001, ANN201
            raise AssertionError("the engine is stood in for")

        def collator(self, data, tokenizer):  # noqa: ANN001, ANN201
            return lambda idx, epoch: idx

        def export(self, state_dict, tokenizer, out) -> None:  # noqa: ANN001
            raise AssertionError("stopped early: no export")

    ctx = types.SimpleNamespace(
        get_world_rank=lambda: 0, get_world_size=lambda: 2, get_local_rank=lambda: 1
    )
    current, step_devices, reduced, reports = [], [], [], []

    def step(engine, task, step_fn, collate, n, t, s, micro, rank, world, device):  # noqa: ANN001, ANN202
        step_devices.append(device)
        return 0.5 + s, 2, 30  # loss, examples, tokens of this rank

    def summed(values, device, world):  # noqa: ANN001, ANN202
        reduced.append(device)
        return [v * world for v in values]  # both workers alike

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(ray.train, "get_context", lambda: ctx)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", lambda m, checkpoint=None: reports.append(m))
    monkeypatch.setattr(loop, "init_deepspeed_comm", lambda use_gpu: None)
    monkeypatch.setattr(loop, "check_worker_device", lambda use_gpu, what: None)
    monkeypatch.setattr(loop, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(
        loop,
        "build_engine",
        lambda *a: (Engine(), types.SimpleNamespace(get_last_lr=lambda: [1e-3])),
    )
    monkeypatch.setattr(loop, "optimizer_step", step)
    monkeypatch.setattr(loop, "sum_across_workers", summed)
    with collectives_on(monkeypatch, gpu) as calls:
        out = loop.train_func({"cfg": to_dict(cfg), "data": list(range(8)), "task": Stub})
    assert current == [gpu]
    assert step_devices == reduced == [gpu] * 3 and calls == []
    assert [h["examples"] for h in out["history"]] == [4, 4, 4]
    assert [h["tokens"] for h in out["history"]] == [60, 60, 60]
    assert [h["loss"] for h in out["history"]] == [0.5, 1.5, 2.5]  # the mean over workers
    assert len(reports) == 3 and out["stopped_at"] == 3


# -- a GPU asked for where none can be used --------------------------------------


@pytest.mark.slow
def test_gpu_pool_on_a_cluster_without_gpus_fails_at_once(ray_local):
    from raysys.errors import GPUUnavailable
    from raysys.runtime import pool_strategy, require_gpus

    t0 = time.perf_counter()
    with pytest.raises(GPUUnavailable, match="no GPU"):
        require_gpus(ray_local, "encode")
    from raysys.config import PoolConfig

    with pytest.raises(GPUUnavailable, match="use_gpu=true"):
        pool_strategy(ray_local, PoolConfig(use_gpu=True))
    assert time.perf_counter() - t0 < 5


@pytest.mark.slow
def test_cli_encode_with_use_gpu_on_a_cpu_cluster_is_one_line_in_seconds(tmp_path, tiny_bert_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"_id": "d{i}", "text": "w{i} w2"}}\n' for i in range(50)))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "raysys.cli",
            "encode",
            str(REPO / "jobs" / "quickstart.yaml"),
            f"model.path={tiny_bert_dir}",
            "encode.pool.use_gpu=true",
            "--corpus",
            str(corpus),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": "", "RAYSYS_GPU_WAIT_S": "0"},
    )
    took = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("raysys: error:")]
    assert len(err) == 1 and "no GPU" in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert took < 120, took  # Ray's own start-up included; it used to hang for good


def test_a_worker_given_a_gpu_that_torch_cannot_see_refuses_to_run_on_cpu(monkeypatch):
    from raysys.errors import GPUUnavailable
    from raysys.models.inference import InferenceSettings
    from raysys.runtime import check_worker_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_worker_device(False, "encode actor")  # CPU asked: fine
    with pytest.raises(GPUUnavailable, match="sees no CUDA device"):
        check_worker_device(True, "encode actor")
    with pytest.raises(GPUUnavailable):
        InferenceSettings.from_opts({"use_gpu": True}, "rerank actor")


_FAKE_GPU_SCRIPT = r"""
import sys, time, ray
from raysys.errors import GPUUnavailable
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
from raysys.config import load_config
from raysys.index.encode import encode_corpus
cfg = load_config(None, [f"model.path={sys.argv[1]}", "encode.pool.use_gpu=true"])
t0 = time.perf_counter()
try:
    encode_corpus(sys.argv[2], sys.argv[3], cfg.model.path, cfg.encoding_contract(), cfg.encode)
except Exception as e:
    cause = e
    while cause is not None and not isinstance(cause, GPUUnavailable):
        cause = cause.__cause__
    print("RESULT", "user-error" if isinstance(e, GPUUnavailable) else type(e).__mro__)
    print("RESULT", "GPUUnavailable" if cause is not None or "sees no CUDA" in str(e) else repr(e))
    print(f"RESULT took {time.perf_counter() - t0:.1f}")
else:
    print("RESULT ran on CPU")
"""


@pytest.mark.slow
def test_encode_actor_holding_a_gpu_that_torch_cannot_see_fails(tmp_path, tiny_bert_dir):
    """A Ray node that advertises a GPU torch cannot use (here: a CPU box
    started with num_gpus=1) used to encode on its CPU without a word."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"_id": "d{i}", "text": "w{i} w2"}}\n' for i in range(20)))
    proc = subprocess.run(
        [sys.executable, "-c", _FAKE_GPU_SCRIPT, str(tiny_bert_dir), str(corpus), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **{k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"},
            "RAY_ADDRESS": "",
        },
    )
    lines = [x.split(" ", 1)[1] for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines[:2] == ["user-error", "GPUUnavailable"], proc.stdout + proc.stderr[-3000:]
    assert float(lines[2].split()[1]) < 120


# -- training precision and export ------------------------------------------------


def test_a_half_precision_checkpoint_trains_with_fp32_weights(tmp_path, tiny_llama_dir):
    """precision=fp32 on an fp16 checkpoint: fp32 parameters (hence fp32
    AdamW states), not pure half-precision AdamW."""
    from transformers import AutoModel

    from raysys.config import load_config
    from raysys.train.tasks.retrieve import RetrieveTask

    half = tmp_path / "half"
    AutoModel.from_pretrained(tiny_llama_dir, dtype=torch.float16).save_pretrained(half)
    for f in tiny_llama_dir.glob("*token*"):
        (half / f.name).write_bytes(f.read_bytes())
    assert AutoModel.from_pretrained(half).dtype == torch.float16
    cfg = load_config(None, [f"model.path={half}", "contract.pooling=last"])
    module = RetrieveTask(cfg).build(None)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    opt = torch.optim.AdamW(module.parameters())
    sum(p.float().sum() for p in module.parameters()).backward()
    opt.step()
    states = {v.dtype for s in opt.state.values() for v in s.values() if v.ndim}
    assert states == {torch.float32}


def test_deepspeed_config_precision_and_lora_persistence():
    from raysys.config import load_config
    from raysys.train.engine import deepspeed_config

    t = load_config(None, ["train.zero_stage=3", "train.precision=fp16"]).train
    full = deepspeed_config(t, 2)
    assert full["fp16"]["enabled"] and not full["bf16"]["enabled"]
    assert full["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert full["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    # LoRA: the adapters stay whole (no all-gather per micro-step): at least
    # DeepSpeed's default threshold, raised to the largest adapter's size.
    lora = deepspeed_config(t, 2, lora=True)
    assert lora["zero_optimization"]["stage3_param_persistence_threshold"] == 100_000
    big = deepspeed_config(t, 2, lora=True, persist_numel=352_256)
    assert big["zero_optimization"]["stage3_param_persistence_threshold"] == 352_256


class _Recorder:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, params, modifier_rank=None):
        self.sizes.append(len(params))
        return contextlib.nullcontext()


def test_zero3_export_gathers_one_parameter_at_a_time_and_only_adapters_under_lora(
    monkeypatch, tiny_llama_dir
):
    import types

    from raysys.config import LoraConfig
    from raysys.models.backbone import build_backbone
    from raysys.train.loop import gather_full_state_dict

    rec = _Recorder()
    # deepspeed as far as the export sees it (the quick subset imports no DeepSpeed).
    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=rec)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    model = build_backbone(str(tiny_llama_dir), lora=LoraConfig(enabled=True))
    # A bf16 base under fp32 adapters: each host copy keeps its own dtype.
    for n, p in model.named_parameters():
        if "lora_" not in n:
            p.data = p.data.to(torch.bfloat16)
    want = model.state_dict()
    assert {t.dtype for t in want.values()} == {torch.bfloat16, torch.float32}
    full = gather_full_state_dict(model, 3)
    assert rec.sizes and max(rec.sizes) == 1
    assert set(full) == set(want)
    assert {k: t.dtype for k, t in full.items()} == {k: t.dtype for k, t in want.items()}
    assert all(torch.equal(full[k], want[k]) for k in want)
    rec.sizes.clear()
    adapters = gather_full_state_dict(model, 3, trainable_only=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(adapters) == trainable and all("lora_" in n for n in adapters)
    assert len(rec.sizes) == len(trainable)


def test_lora_export_rebuilds_frozen_weights_from_the_checkpoint(tmp_path, tiny_llama_dir):
    """Only the adapters were gathered; the export equals a full one."""
    from raysys.config import load_config
    from raysys.models.backbone import load_tokenizer
    from raysys.train.loop import gather_full_state_dict
    from raysys.train.tasks.retrieve import RetrieveTask

    cfg = load_config(
        None, [f"model.path={tiny_llama_dir}", "model.lora.enabled=true", "contract.pooling=last"]
    )
    task = RetrieveTask(cfg)
    assert task.frozen_from_checkpoint()
    module = task.build(None)
    backbone = task.export_module(module)
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    tok = load_tokenizer(str(tiny_llama_dir))
    task.export(gather_full_state_dict(backbone, 0, trainable_only=True), tok, tmp_path / "part")
    task.export(gather_full_state_dict(backbone, 0), tok, tmp_path / "full")
    from safetensors.torch import load_file

    a, b = (
        load_file(tmp_path / "part" / "model.safetensors"),
        load_file(tmp_path / "full" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# -- inference ---------------------------------------------------------------------


def test_token_budget_batches():
    from raysys.models.inference import token_budget_batches

    lengths = [100, 90, 50, 50, 10, 10, 10, 10, 300]
    assert token_budget_batches(lengths, 32) == [list(range(9))]
    batches = token_budget_batches(lengths, 32, max_tokens=200)
    assert [i for b in batches for i in b] == list(range(9))
    for b in batches:
        padded = max(lengths[i] for i in b) * len(b)
        assert padded <= 200 or len(b) == 1
    assert batches == [[0, 1], [2, 3, 4, 5], [6, 7], [8]]
    assert token_budget_batches(lengths, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_prefetch_keeps_order_and_raises_in_order():
    from raysys.models.inference import prefetch

    assert list(prefetch(iter(range(10)))) == list(range(10))

    def bad():
        yield 1
        raise ValueError("broken at 2")

    got = []
    with pytest.raises(ValueError, match="broken at 2"):
        for x in prefetch(bad()):
            got.append(x)
    assert got == [1]
    # A consumer that stops early does not leave the producer blocked.
    it = prefetch(iter(range(1000)), depth=1)
    assert next(it) == 0
    it.close()


def test_inference_settings():
    from raysys.models.inference import InferenceSettings

    cpu = InferenceSettings.from_opts({"precision": "bf16"}, "x")
    assert cpu.load_kwargs() == {"dtype": torch.float32}  # CPU: autocast over fp32
    assert isinstance(cpu.autocast(), torch.autocast)
    old = InferenceSettings.from_opts({"bf16": True}, "x")
    assert old.precision == "bf16"
    gpu = InferenceSettings.for_device("cuda", {"precision": "fp16", "attn_implementation": "sdpa"})
    assert gpu.load_kwargs() == {"dtype": torch.float16, "attn_implementation": "sdpa"}
    assert not isinstance(gpu.autocast(), torch.autocast)


def test_fp16_inference_needs_a_gpu_and_gpu_shares_are_checked():
    from raysys.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        load_config(None, ["encode.pool.precision=fp16"])
    with pytest.raises(ConfigError, match="gpus_per_actor"):
        load_config(None, ["reranker.pool.gpus_per_actor=1.5"])
    cfg = load_config(None, ["encode.pool.use_gpu=true", "encode.pool.gpus_per_actor=0.25"])
    assert cfg.encode.pool.gpus_per_actor == 0.25


def test_reranker_and_embedder_forward_without_kv_cache(tiny_llama_dir):
    from raysys.contract import EncodingContract
    from raysys.models.backbone import build_backbone
    from raysys.models.embedder import Embedder
    from raysys.models.reranker import RerankContract, Reranker

    seen = []
    for model in (
        Reranker(build_backbone(str(tiny_llama_dir)), RerankContract(pooling="last")),
        Embedder(build_backbone(str(tiny_llama_dir)), EncodingContract(pooling="last")),
    ):
        inner = model.backbone.forward

        def spy(*a, _inner=inner, **k):
            seen.append(k.get("use_cache"))
            return _inner(*a, **k)

        model.backbone.forward = spy
        ids = torch.tensor([[5, 6, 7]])
        model(ids, torch.ones_like(ids))
    assert seen == [False, False]


def test_scorer_token_budget_gives_the_same_scores(tmp_path, tiny_bert_dir):
    """Token-budget micro-batches, prefetching and deferred copies change no score."""
    from raysys.models.backbone import build_backbone, load_tokenizer
    from raysys.models.reranker import RerankContract, Reranker, Scorer, export_reranker

    model = Reranker(build_backbone(str(tiny_bert_dir)), RerankContract())
    export_reranker(model, model.head.state_dict(), load_tokenizer(str(tiny_bert_dir)), tmp_path)
    ids = [[2] + [5 + (i * j) % 50 for j in range(3 + i % 17)] + [3] for i in range(40)]
    plain = Scorer(tmp_path, "cpu", {"micro_batch": 1}).score_ids(ids)
    budget = Scorer(tmp_path, "cpu", {"micro_batch": 16, "micro_tokens": 64}).score_ids(ids)
    assert budget == pytest.approx(plain, abs=1e-5)


# -- FAISS codes ---------------------------------------------------------------------


@pytest.mark.parametrize("dim", [32, 384, 768, 1024, 4096])
def test_auto_factory_codes(dim):
    import faiss

    from raysys.index.build import GPU_PQ_M, GPU_PQ_SUBDIMS, auto_factory

    cpu, c = auto_factory(1_000_000, dim)
    assert c["pq_m"] <= 256 and dim % c["pq_m"] == 0  # 4096-d: 256 B, not 2 KB
    gpu, g = auto_factory(1_000_000, dim, gpu=True)
    assert g["pq_m"] in GPU_PQ_M
    assert g.get("opq_dim", dim) // g["pq_m"] in GPU_PQ_SUBDIMS
    faiss.index_factory(dim, gpu, faiss.METRIC_INNER_PRODUCT)  # a valid string
    assert ("OPQ" in gpu) == (dim == 4096)


# -- Hugging Face hub ids ------------------------------------------------------------

_HUB_SCRIPT = r"""
import sys
from raysys.errors import UserError
from raysys.models.embedder import load_embedder, weights_fingerprint
from raysys.models.hub import resolve_model
from raysys.contract import EncodingContract
path = resolve_model("raysys-test/tiny-bert")
print("RESULT", path)
print("RESULT", weights_fingerprint(path))
model, tok = load_embedder("raysys-test/tiny-bert", "cpu", EncodingContract(model="raysys-test/tiny-bert"))
print("RESULT", model.contract.model)
try:
    resolve_model("raysys-test/not-cached")
except UserError as e:
    print("RESULT", str(e))
"""


def test_hub_ids_resolve_to_their_cached_snapshot(tmp_path, tiny_bert_dir):
    """A hub id works in every stage: it resolves to the hub cache's snapshot
    folder (offline here), which the fingerprint and loaders read."""
    import shutil

    from raysys.models.embedder import weights_fingerprint

    repo = tmp_path / "hub" / "models--raysys-test--tiny-bert"
    commit = "0" * 40
    shutil.copytree(tiny_bert_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    proc = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    lines = [x.split(" ", 1)[1] for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert len(lines) == 4, proc.stdout + proc.stderr[-3000:]
    assert lines[0] == str(repo / "snapshots" / commit)
    assert lines[1] == weights_fingerprint(tiny_bert_dir)
    assert lines[2] == "raysys-test/tiny-bert"
    assert "not-cached" in lines[3] and "HF_HUB_OFFLINE" in lines[3]


# -- the GPU install -----------------------------------------------------------------


def _extras() -> tuple[list[str], dict[str, list[str]]]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]


def _names(reqs: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_faiss_comes_from_exactly_one_extra():
    base, extras = _extras()
    assert not {n for n in _names(base) if n.startswith("faiss")}
    assert {n for n in _names(extras["cpu"]) if n.startswith("faiss")} == {"faiss-cpu"}
    assert {n for n in _names(extras["gpu"]) if n.startswith("faiss")} == {"faiss-gpu-cu12"}
    # The test/dev install takes the CPU build only.
    assert any("cpu" in r for r in extras["dev"]) and not any("gpu" in r for r in extras["dev"])


def test_a_doubled_faiss_install_is_refused_with_what_to_do(monkeypatch):
    from raysys.errors import UserError
    from raysys.index import faiss_lib

    faiss_lib.load_faiss.cache_clear()
    monkeypatch.setattr(faiss_lib, "faiss_distributions", lambda: ["faiss-cpu", "faiss-gpu-cu12"])
    with pytest.raises(UserError, match="several FAISS builds.*pip uninstall -y faiss-cpu"):
        faiss_lib.load_faiss()
    monkeypatch.undo()
    faiss_lib.load_faiss.cache_clear()
    assert faiss_lib.load_faiss().__name__ == "faiss"
    assert faiss_lib.faiss_distributions() == ["faiss-cpu"]  # this (CPU) install


def test_cluster_yamls_pin_ray_and_torch_on_rays_gpu_image():
    import yaml

    pins = dict(
        line.split("==")
        for line in (REPO / "constraints-gpu.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert {"ray", "torch", "faiss-gpu-cu12"} <= set(pins)
    for name in ("aws.yaml", "gcp.yaml"):
        cfg = yaml.safe_load((REPO / "cluster" / name).read_text())
        image = cfg["docker"]["image"]
        assert image.startswith(f"rayproject/ray:{pins['ray']}-") and image.endswith("-gpu")
        assert any("-c constraints-gpu.txt" in c and ".[gpu]" in c for c in cfg["setup_commands"])


@pytest.mark.slow
def test_the_gpu_install_resolves_one_faiss_on_torchs_cuda(tmp_path):
    """pip's resolver, dry run, for what the cluster YAMLs install."""
    import json
    import re

    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--disable-pip-version-check",
            "--report",
            str(report),
            "-c",
            "constraints-gpu.txt",
            ".[gpu]",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode and re.search(r"(?i)connection|network|resolve host", proc.stderr):
        from tests.helpers import skip_or_fail

        skip_or_fail(
            "this test needs the package index (PyPI, or PIP_INDEX_URL), which is "
            f"unreachable: {proc.stderr[-300:]}"
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    installs = {
        i["metadata"]["name"].lower(): i["metadata"]
        for i in json.loads(report.read_text())["install"]
    }
    faiss = [n for n in installs if n.startswith("faiss")]
    assert faiss == ["faiss-gpu-cu12"]
    torch_deps = " ".join(installs["torch"].get("requires_dist") or [])
    # torch's CUDA runtime libraries are CUDA 12, as faiss-gpu-cu12's are.
    assert "nvidia-cuda-runtime-cu12" in torch_deps and "cu13" not in torch_deps
    assert not [n for n in installs if n.endswith("-cu13")]
    assert installs["ray"]["version"] == "2.60.0"


def test_small_model_actors_share_a_gpu():
    from raysys.config import PoolConfig
    from raysys.runtime import pool_strategy

    class TwoGpus:
        def cluster_resources(self):
            return {"CPU": 32, "GPU": 2}

    strategy, _, n = pool_strategy(TwoGpus(), PoolConfig(use_gpu=True, gpus_per_actor=0.25))
    assert strategy["initial_size"] == n == 8  # four actors per GPU
    strategy, _, n = pool_strategy(TwoGpus(), PoolConfig(use_gpu=True))
    assert n == 2


@pytest.mark.slow
def test_no_autoscaler_config_on_a_local_cluster(ray_local):
    from raysys.runtime import autoscaler_max_gpus

    assert autoscaler_max_gpus(ray_local) is None


@pytest.mark.slow
def test_an_opq_ivfpq_index_builds_and_searches_through_the_index_stage(ray_local, tmp_path):
    """The GPU-shaped codes of a wide embedding (an OPQ rotation in front of
    IVF-PQ: an IndexPreTransform) go through the sharded build, merge and
    nprobe tuning like a plain IVF-PQ."""
    from benchmarks.index_memory import write_shards
    from raysys.cli import main
    from raysys.index.encode import EMB_DIR
    from raysys.index.manifest import read_manifest

    (tmp_path / "enc" / EMB_DIR).mkdir(parents=True)
    write_shards(tmp_path / "enc" / EMB_DIR, 4000, 1000)
    out = tmp_path / "index"
    rc = main(
        [
            "index",
            "-",
            "index.factory=OPQ8_32,IVF32,PQ8x8np",
            f"--embeddings={tmp_path / 'enc'}",
            f"--out={out}",
        ]
    )
    assert rc == 0
    m = read_manifest(out)
    assert m["count"] == 4000 and m["factory"].startswith("OPQ8_32")
    assert max(m["nprobe_recall_at_10"].values()) > 0.5


@pytest.mark.slow
def test_index_use_gpu_without_a_gpu_fails_before_reading(ray_local, tmp_path, capsys):
    from benchmarks.index_memory import write_shards
    from raysys.cli import main
    from raysys.index.encode import EMB_DIR

    (tmp_path / "enc" / EMB_DIR).mkdir(parents=True)
    write_shards(tmp_path / "enc" / EMB_DIR, 2000, 1000)
    t0 = time.perf_counter()
    rc = main(
        [
            "index",
            "-",
            "index.use_gpu=true",
            f"--embeddings={tmp_path / 'enc'}",
            f"--out={tmp_path / 'i'}",
        ]
    )
    assert rc == 2 and time.perf_counter() - t0 < 10
    assert (
        "index (index.use_gpu): use_gpu=true but the Ray cluster has no GPU"
        in capsys.readouterr().err
    )


def test_gpu_index_training_refuses_a_faiss_without_gpus():
    """A GPU task whose FAISS is faiss-cpu (or sees no GPU) says so, not
    silently trains on the CPU."""
    from raysys.errors import GPUUnavailable
    from raysys.index.build import faiss, train_on_gpu

    untrained = faiss.serialize_index(faiss.index_factory(8, "IVF4,Flat")).tobytes()
    with pytest.raises(GPUUnavailable, match=r"FAISS \(faiss-cpu\) sees no GPU.*raysys\[gpu\]"):
        train_on_gpu(untrained, np.zeros((100, 8), np.float32))
