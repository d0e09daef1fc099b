"""Issue #34, faults 4, 5, 6, 7 and 10: what a first GPU run would hit,
checked on the CPU (GPU counts, DeepSpeed's floor, inference precision,
ZeRO-3 persistence of LoRA adapters, TF32, GradCache's coalesced reduction)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "jobs").glob("*.yaml"))


class _Cluster:
    """A stand-in for the ``ray`` module: a fixed cluster of ``gpus`` GPUs."""

    def __init__(self, gpus: float, cpus: float = 64) -> None:
        self.res = {"CPU": cpus, "GPU": gpus}

    def cluster_resources(self) -> dict[str, float]:
        return self.res


@pytest.fixture
def fixed_cluster(monkeypatch):
    """No autoscaler config (a fixed cluster), no wait, no declared capacity."""
    from raysys import runtime

    monkeypatch.setattr(runtime, "autoscaler_max_gpus", lambda ray: None)
    monkeypatch.delenv("RAYSYS_GPU_WAIT_S", raising=False)
    monkeypatch.delenv("RAYSYS_GPU_CAPACITY", raising=False)


# -- fault 4: a stage's GPUs counted against what the cluster can reach ----------------


def test_a_gpu_pool_larger_than_the_cluster_fails_at_once_with_both_numbers(fixed_cluster):
    """8 GPUs, a fixed pool of 16 actors: a one-line error naming 16 and 8
    (before: the pool was built and 8 actors waited forever); 8 actors fit."""
    from raysys.config import PoolConfig
    from raysys.errors import GPUUnavailable
    from raysys.runtime import pool_strategy

    with pytest.raises(GPUUnavailable) as e:
        pool_strategy(_Cluster(8), PoolConfig(use_gpu=True, actors=16))
    msg = str(e.value)
    assert "\n" not in msg
    assert re.search(r"needs 16 GPUs .*actors=16 x 1 GPU.* can reach 8 \(8 up now", msg), msg
    assert "no autoscaler config" in msg and "RAYSYS_GPU_CAPACITY" in msg
    assert pool_strategy(_Cluster(8), PoolConfig(use_gpu=True, actors=8))[0] == {"size": 8}
    # Four small-model actors share a GPU: 16 x 0.25 = 4 GPUs fit.
    pool = PoolConfig(use_gpu=True, actors=16, gpus_per_actor=0.25)
    assert pool_strategy(_Cluster(8), pool)[0] == {"size": 16}


def test_the_autoscaler_max_or_a_declared_capacity_counts(monkeypatch, fixed_cluster):
    from raysys import runtime
    from raysys.errors import GPUUnavailable, UserError

    # 0 GPUs up, an autoscaler that can start 2 nodes x 8: 16 fit, 24 do not.
    monkeypatch.setattr(runtime, "autoscaler_max_gpus", lambda ray: 16)
    assert runtime.require_gpus(_Cluster(0), "training", need=16) == 0.0
    with pytest.raises(GPUUnavailable, match=r"needs 24 GPUs but .* reach 16 .*autoscaler max 16"):
        runtime.require_gpus(_Cluster(0), "training", need=24)
    # Where Ray cannot know (no autoscaler config), the user can say.
    monkeypatch.setattr(runtime, "autoscaler_max_gpus", lambda ray: None)
    monkeypatch.setenv("RAYSYS_GPU_CAPACITY", "16")
    assert runtime.require_gpus(_Cluster(8), "training", need=16) == 8.0
    monkeypatch.setenv("RAYSYS_GPU_CAPACITY", "lots")
    with pytest.raises(UserError, match="RAYSYS_GPU_CAPACITY='lots'"):
        runtime.require_gpus(_Cluster(8), "training", need=16)


def test_training_on_more_gpus_than_the_cluster_fails_before_the_data_load(
    monkeypatch, fixed_cluster, tmp_path
):
    """The RepLLaMA recipe (16 workers) on a fixed 8-GPU cluster: the driver
    fails in seconds with both numbers, before reading any data (before: it
    went on and 8 of the 16 workers waited until Ray timed out)."""
    import ray

    from raysys.config import load_config
    from raysys.errors import GPUUnavailable
    from raysys.train import launch

    monkeypatch.setattr(launch, "ensure_ray", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", _Cluster(8).cluster_resources, raising=False)
    cfg = load_config(
        REPO / "jobs" / "repllama_msmarco.yaml",
        [f"data.groups={tmp_path / 'missing.jsonl'}", f"data.corpus={tmp_path / 'missing'}"],
    )
    with pytest.raises(GPUUnavailable) as e:
        launch.run_training(cfg, tmp_path / "out")
    msg = str(e.value)
    assert "training (train.scaling.use_gpu): needs 16 GPUs" in msg, msg
    assert "train.scaling.num_workers=16 x 1 GPU" in msg and "can reach 8" in msg, msg


def test_a_pipeline_checks_every_gpu_stage_before_the_first(fixed_cluster):
    from raysys.config import load_config
    from raysys.errors import GPUUnavailable
    from raysys.runtime import check_gpu_stages

    cfg = load_config(REPO / "jobs" / "rankllama_msmarco.yaml", ["train.scaling.num_workers=8"])
    # Training fits 8 GPUs now; the 16-actor encode pool would fail hours later.
    with pytest.raises(GPUUnavailable, match=r"^encode \(encode.pool.use_gpu\): needs 16 GPUs"):
        check_gpu_stages(cfg, cfg.stages, _Cluster(8))
    fits = load_config(
        REPO / "jobs" / "rankllama_msmarco.yaml",
        ["train.scaling.num_workers=8", "encode.pool.actors=8", "reranker.pool.actors=8"],
    )
    check_gpu_stages(fits, fits.stages, _Cluster(8))
    # A CPU-only pipeline checks nothing and starts no Ray.
    check_gpu_stages(load_config(None, []), ["train", "encode", "rerank"])


def test_run_pipeline_checks_its_gpu_stages_before_reading_data(
    monkeypatch, fixed_cluster, tmp_path
):
    """run_pipeline itself makes the check, before the data is read: the
    RankLLaMA recipe (16 workers) on a fixed 8-GPU cluster with a data path
    that does not exist fails on the GPU count, not on the data."""
    import ray

    from raysys import runtime
    from raysys.config import load_config
    from raysys.errors import GPUUnavailable
    from raysys.pipeline import run_pipeline

    monkeypatch.setattr(runtime, "ensure_ray", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", _Cluster(8).cluster_resources, raising=False)
    cfg = load_config(REPO / "jobs" / "rankllama_msmarco.yaml", [f"data={tmp_path / 'missing'}"])
    with pytest.raises(GPUUnavailable, match=r"^training \(train.scaling.use_gpu\): needs 16 GPUs"):
        run_pipeline(cfg, tmp_path / "out")


def _expected_gpus(text: str) -> int | None:
    m = re.search(r"Expected resources:[^.]*?(\d+)(?:-(\d+))? GPUs", text, re.S)
    return None if m is None else int(m.group(2) or m.group(1))


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_gpu_recipes_ask_for_no_more_gpus_than_their_comments_say(path):
    """A guard: each stage of a GPU recipe needs at most the GPUs its
    'Expected resources' comment names."""
    from raysys.config import load_config
    from raysys.runtime import pool_gpu_need, train_gpu_need

    cfg = load_config(path)
    text = path.read_text()
    needs = []
    if cfg.train.enabled and cfg.train.scaling.use_gpu and "train" in cfg.stages:
        needs.append(train_gpu_need(cfg.train.scaling))
    for stage, name, pool in (
        ("encode", "encode.pool", cfg.encode.pool),
        ("rerank", "reranker.pool", cfg.reranker.pool),
    ):
        if stage in cfg.stages and pool.use_gpu:
            needs.append(pool_gpu_need(pool, name))
    if not needs:
        return
    said = _expected_gpus(text)
    assert said is not None, f"{path.name}: GPU recipe without 'Expected resources: N GPUs'"
    for need, how in needs:
        assert need <= said, f"{path.name}: {how} needs {need:g} GPUs, the comment says {said}"


# -- fault 5: the DeepSpeed floor ------------------------------------------------------


def _pyproject_floor() -> str:
    text = (REPO / "pyproject.toml").read_text()
    found = re.findall(r'"deepspeed>=([0-9][0-9.]*)"', text)
    assert len(found) == 1, found
    return found[0]


def test_deepspeed_floor_is_pyprojects_and_the_engine_refuses_older(monkeypatch, tmp_path):
    """pyproject's floor is the engine's, the installed DeepSpeed meets it,
    and a DeepSpeed below it stops the engine's start in one line (0.19.2:
    LoRA + ZeRO-3 + non-reentrant checkpointing fails at the first backward,
    fixed by PR #8148, first released in 0.19.3)."""
    from importlib.metadata import version

    from packaging.version import Version

    from raysys.errors import UserError
    from raysys.train import engine

    floor = _pyproject_floor()
    assert floor == engine.MIN_DEEPSPEED
    assert Version(floor) >= Version("0.19.3")
    assert Version(version("deepspeed")) >= Version(floor)
    pins = re.findall(r"^deepspeed==(\S+)", (REPO / "constraints-gpu.txt").read_text(), re.M)
    assert pins and all(Version(p) >= Version(floor) for p in pins), pins

    started: list[str] = []
    fake = types.ModuleType("deepspeed")
    fake.init_distributed = lambda: started.append(fake.__version__)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    fake.__version__ = "0.19.2"  # type: ignore[attr-defined]
    with pytest.raises(UserError) as e:
        engine.init_deepspeed_comm(use_gpu=True)
    msg = str(e.value)
    assert "\n" not in msg and "0.19.2" in msg and f"deepspeed>={floor}" in msg, msg
    assert started == []
    fake.__version__ = floor  # type: ignore[attr-defined]
    engine.init_deepspeed_comm(use_gpu=True)
    assert started == [floor]


# -- fault 6: inference pools in bf16 on GPUs that have it -----------------------------


@pytest.mark.parametrize(
    ("bf16_gpu", "pool", "want"),
    [
        (True, {}, "bf16"),  # the default on an Ampere+ GPU
        (False, {}, "fp32"),  # V100/T4: bf16 emulated only
        (True, {"precision": "fp32"}, "fp32"),  # asked for: kept
        (True, {"precision": "fp16"}, "fp16"),
    ],
)
def test_gpu_pools_default_to_bf16_where_the_gpu_supports_it(monkeypatch, bf16_gpu, pool, want):
    from raysys.config import PoolConfig
    from raysys.models.inference import InferenceSettings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # A V100/T4 "supports" bf16 by emulation only (torch's default answer).
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: bf16_gpu or including_emulation,
    )
    opts = dataclasses.asdict(PoolConfig(use_gpu=True, **pool))
    s = InferenceSettings.from_opts(opts, "encode actor")
    assert s.device == "cuda" and s.precision == want
    assert s.load_kwargs()["dtype"] == {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        want, torch.float16
    )


def test_cpu_pools_stay_fp32_by_default(monkeypatch):
    from raysys.config import PoolConfig
    from raysys.models.inference import InferenceSettings

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    s = InferenceSettings.from_opts(dataclasses.asdict(PoolConfig()), "encode actor")
    assert (s.device, s.precision) == ("cpu", "fp32")
    assert not isinstance(s.autocast(), torch.autocast)
    # The older switch still turns CPU bf16 autocast on.
    old = InferenceSettings.from_opts(dataclasses.asdict(PoolConfig(bf16=True)), "x")
    assert old.precision == "bf16" and isinstance(old.autocast(), torch.autocast)


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_gpu_recipe_runs_its_pools_in_bf16_with_a_token_budget(path):
    """A recipe that uses GPUs runs each pool its stages use (encode, rerank)
    on the GPUs, in bf16, with micro-batches cut at a token budget."""
    from raysys.config import load_config

    cfg = load_config(path)
    pools = {"encode": cfg.encode.pool, "rerank": cfg.reranker.pool}
    gpu = cfg.train.scaling.use_gpu or any(p.use_gpu for p in pools.values())
    if not gpu:
        return
    for stage, pool in pools.items():
        if stage not in cfg.stages:
            continue
        assert pool.use_gpu, f"{path.name}: the {stage} pool runs on CPUs"
        assert pool.precision == "bf16", f"{path.name}: {stage} pool in {pool.precision}"
        assert pool.micro_tokens > 0, f"{path.name}: {stage} pool has no token budget"


# -- fault 7: ZeRO-3 keeps LoRA adapters whole -----------------------------------------

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_the_zero3_threshold_covers_every_llama2_7b_adapter():
    """Two Llama-2-7B layers on the meta device with the recipes' r=32
    adapters: each of the 14 per layer (448 in 32 layers) is above DeepSpeed's
    default threshold of 1e5 elements; the threshold raysys sets keeps them all."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    from raysys.config import load_config
    from raysys.train.engine import (
        DS_PERSISTENCE_DEFAULT,
        deepspeed_config,
        lora_persistence_threshold,
    )

    with torch.device("meta"):
        model = LlamaModel(LlamaConfig(num_hidden_layers=2, **LLAMA2_7B))
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=ALL_LINEAR))
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    assert len(sizes) == 2 * 14 and min(sizes) == 131_072 and max(sizes) == 352_256
    assert min(sizes) > DS_PERSISTENCE_DEFAULT
    t = load_config(None, ["train.zero_stage=3"]).train
    ds = deepspeed_config(t, 16, lora=True, persist_numel=lora_persistence_threshold(model))
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 352_256
    full = deepspeed_config(t, 16)
    assert full["zero_optimization"]["stage3_param_persistence_threshold"] == 0


def test_the_threshold_never_replicates_a_base_matrix():
    """A trainable parameter as large as a frozen matrix (a hidden x hidden
    head) stays partitioned: raising the threshold to it would keep every
    base matrix of that size whole on every rank too."""
    from torch import nn

    from raysys.train.engine import lora_persistence_threshold

    model = nn.ModuleDict(
        {
            "base": nn.Linear(1024, 1024, bias=False),  # 1,048,576, frozen
            "norm": nn.LayerNorm(1024),  # frozen, small
            "adapter": nn.Linear(1024, 200, bias=False),  # 204,800
            "head": nn.Linear(1024, 1024, bias=False),  # 1,048,576, trainable
        }
    )
    for name in ("base", "norm"):
        model[name].requires_grad_(False)
    assert lora_persistence_threshold(model) == 204_800
    model["base"].requires_grad_(True)  # nothing frozen above 1e5: no ceiling
    assert lora_persistence_threshold(model) == 1_048_576


# -- fault 10: TF32 in training, GradCache's coalesced reduction -----------------------


@contextlib.contextmanager
def _tf32_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("device", ["cuda:0", "cpu"])
def test_the_training_engine_turns_tf32_on_on_a_gpu(monkeypatch, device):
    """``build_engine`` on a CUDA engine enables TF32 matmuls (fp32 jobs and
    the fp32 parts of bf16 ones); on a CPU it leaves them alone."""
    from raysys.config import load_config
    from raysys.train import engine as eng

    class Task:
        head_prefixes = ()

        def uses_lora(self) -> bool:
            return False

        def build(self, tokenizer: Any) -> torch.nn.Module:
            return torch.nn.Linear(2, 2)

    fake_engine = types.SimpleNamespace(device=torch.device(device))
    monkeypatch.setattr(eng, "initialize", lambda *a, **k: (fake_engine, None, "sched"))
    t = load_config(None, ["train.zero_stage=2", "train.precision=fp32"]).train
    with _tf32_restored():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        assert eng.build_engine(Task(), None, t, 1, 10) == (fake_engine, "sched")
        on = device.startswith("cuda")
        assert torch.backends.cuda.matmul.allow_tf32 is on
        assert torch.backends.cudnn.allow_tf32 is on


class _FakeEngine:
    """What GradCacheStep sees of a DeepSpeed engine, recording where each
    backward and step happen relative to ``coalesce_grad_reduction``."""

    def __init__(self, stage: int = 2, gas: int = 1) -> None:
        self.module = torch.nn.Linear(4, 3)
        self.stage, self.gas, self.micro_steps = stage, gas, 0
        self.optimizer = types.SimpleNamespace(_coalesce_grad_reduction=False)
        self._is_gradient_accumulation_boundary: bool | None = None
        self.inside, self.entered, self.events = False, 0, []

    def zero_optimization_stage(self) -> int:
        return self.stage

    def gradient_accumulation_steps(self) -> int:
        return self.gas

    def set_gradient_accumulation_boundary(self, value: bool) -> None:
        self._is_gradient_accumulation_boundary = value

    @contextlib.contextmanager
    def coalesce_grad_reduction(self):
        self.entered += 1
        self.inside = True
        try:
            yield
        finally:
            self.inside = False
            self.events.append("flush")

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.events.append(f"backward:{'in' if self.inside else 'out'}")

    def step(self) -> None:
        assert not self.inside
        self.micro_steps += 1
        self.events.append("step")


class _FakeTask:
    def split(self, batch: torch.Tensor, n: int) -> list[torch.Tensor]:
        return list(batch.split(n))

    def represent(self, engine: Any, chunk: torch.Tensor, device: Any) -> dict[str, torch.Tensor]:
        return {"q": engine.module(chunk)}

    def loss_from_reps(self, reps: list[dict], batch: Any, device: Any) -> Any:
        loss = torch.cat([r["q"] for r in reps]).pow(2).mean()
        return types.SimpleNamespace(loss=loss, value=float(loss.detach()))


@pytest.mark.parametrize(
    ("stage", "gas", "coalesced"),
    [(2, 1, True), (3, 1, True), (1, 1, False), (0, 1, False), (2, 2, False)],
)
def test_grad_cache_reduces_once_per_step_under_zero_2_and_3(stage, gas, coalesced):
    """Every chunk's backward inside one ``coalesce_grad_reduction`` block
    per step, the step after it (ZeRO-2/3, one micro-batch per step); not
    under ZeRO-0/1 or with accumulation (one block must cover a whole step)."""
    from raysys.train.steps import GradCacheStep

    engine = _FakeEngine(stage, gas)
    step = GradCacheStep(2)
    for _ in range(2):
        step(engine, _FakeTask(), torch.randn(6, 4), torch.device("cpu"))
    where = "in" if coalesced else "out"
    one = [f"backward:{where}"] * 3 + (["flush"] if coalesced else []) + ["step"]
    assert engine.events == one * 2
    assert engine.entered == (2 if coalesced else 0)


def test_grad_cache_keeps_per_chunk_reduction_for_a_large_gradient():
    """Coalescing holds the full local gradient until the flush: not for a
    model whose trainable gradient exceeds the cap (a full 7B fine-tune)."""
    from raysys.train.steps import GradCacheStep

    engine = _FakeEngine(3, 1)
    GradCacheStep(2, coalesce_max_bytes=10)(
        engine, _FakeTask(), torch.randn(6, 4), torch.device("cpu")
    )
    assert engine.entered == 0


# -- faults 7 and 10 with DeepSpeed itself (ZeRO-2/3 on one CPU process) ---------------


def _zero_child(args: dict[str, Any]) -> None:
    """In a fresh process: (a) GradCache under ZeRO-2, per-chunk reduction
    against coalesced, counting the optimizer's bucket reductions; (b) a
    LoRA model under ZeRO-3 whose adapters exceed DeepSpeed's default
    persistence threshold, after one step."""
    import collections

    from raysys.config import load_config
    from raysys.models.backbone import load_tokenizer
    from raysys.train.engine import build_engine
    from raysys.train.inprocess import init_single_process, train_steps
    from raysys.train.loop import optimizer_step, plan_steps
    from raysys.train.steps import GradCacheStep, StandardStep
    from raysys.train.tasks import get_task
    from tests.helpers import toy_train_overrides

    cpu = torch.device("cpu")
    out: dict[str, Any] = {}
    counts: collections.Counter[str] = collections.Counter()

    class Counted(GradCacheStep):
        def __call__(self, engine, task, batch, device):  # noqa: ANN001
            opt = engine.optimizer
            if not getattr(opt, "_counted", False):
                inner = opt.reduce_ipg_grads

                def counted(*a: Any, **k: Any) -> Any:
                    counts[self.name] += 1
                    return inner(*a, **k)

                opt.reduce_ipg_grads, opt._counted = counted, True
            return super().__call__(engine, task, batch, device)

    data = Path(args["data"])
    zero2 = load_config(None, toy_train_overrides(args["bert"], data, "train.zero_stage=2"))
    states = {}
    for name in ("per_chunk", "default"):
        try:
            step = Counted(2, coalesce_max_bytes=0) if name == "per_chunk" else Counted(2)
        except TypeError:  # a GradCacheStep that never coalesces
            step = Counted(2)
        step.name = name
        res = train_steps(zero2, 2, cpu, step_fn=step, keep_state=True)
        states[name], out[f"losses_{name}"] = res.state, res.losses
    out["reductions"] = dict(counts)
    out["param_diff"] = max(
        (states["default"][k].float() - states["per_chunk"][k].float()).abs().max().item()
        for k in states["default"]
    )

    lora = load_config(
        None,
        [
            f"model={args['llama']}",
            f"data.groups={data / 'groups.jsonl'}",
            f"data.corpus={data / 'corpus.jsonl'}",
            "model.lora.enabled=true",
            "model.lora.r=128",
            "model.lora.target_modules=[q_proj,k_proj]",
            "contract.pooling=last",
            "contract.append_eos=true",
            "train.per_device_queries=2",
            "train.group_size=2",
            "train.zero_stage=3",
            "train.gradient_checkpointing=true",
        ],
    )
    init_single_process(cpu)
    task = get_task("retrieve")(lora)
    items = task.load_data()
    tok = load_tokenizer(task.model_path())
    micro, total = plan_steps(len(items), lora.train, 1)
    engine, _ = build_engine(task, tok, lora.train, 1, total)
    engine.train()
    optimizer_step(
        engine,
        task,
        StandardStep(),
        task.collator(items, tok),
        len(items),
        lora.train,
        0,
        micro,
        0,
        1,
        cpu,
    )
    adapters = {
        n: (int(p.ds_numel), bool(p.ds_persist), p.ds_status.name)
        for n, p in engine.module.named_parameters()
        if "lora_" in n
    }
    base = {
        n: (int(p.ds_numel), bool(p.ds_persist), p.ds_status.name)
        for n, p in engine.module.named_parameters()
        if n.endswith("q_proj.base_layer.weight")
    }
    out.update(threshold=engine.zero_param_persistence_threshold(), adapters=adapters, base=base)
    Path(args["out"]).write_text(json.dumps(out))


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory, tiny_bert_dir, toy_data) -> dict[str, Any]:
    from tests.helpers import tiny_llama

    tmp = tmp_path_factory.mktemp("zero")
    llama = tiny_llama(tmp / "llama1024", hidden_size=1024)
    args = {"bert": str(tiny_bert_dir), "llama": str(llama), "data": str(toy_data)}
    args["out"] = str(tmp / "out.json")
    dist_env = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist_env}
    env |= {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    code = f"from tests.test_gpu_second_reading import _zero_child; _zero_child({args!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(Path(args["out"]).read_text())


@pytest.mark.slow
def test_grad_cache_under_zero2_reduces_once_per_step_and_exactly(zero_run):
    """3 chunks a micro-batch, 2 steps: 6 bucket reductions per chunk before,
    2 coalesced (one per step), the same weights to the bit and the same
    losses."""
    assert zero_run["reductions"] == {"per_chunk": 6, "default": 2}, zero_run["reductions"]
    assert zero_run["param_diff"] == 0.0
    assert zero_run["losses_default"] == zero_run["losses_per_chunk"]


@pytest.mark.slow
def test_zero3_keeps_every_lora_adapter_whole(zero_run):
    """r=128 on q_proj and k_proj of a 1024-wide Llama: adapters of 65k and
    131k elements, the larger above DeepSpeed's default threshold. Every
    adapter is persistent and still whole after a step (gathered once per
    step, not in every forward, recompute and backward); the base q_proj
    (1M) stays partitioned."""
    adapters = zero_run["adapters"]
    assert len(adapters) == 2 * 2 * 2
    largest = max(n for n, _, _ in adapters.values())
    assert largest == 131_072 and zero_run["threshold"] == largest
    assert all(persist and status == "AVAILABLE" for _, persist, status in adapters.values()), (
        adapters
    )
    assert all(
        n == 1_048_576 and not persist and status == "NOT_AVAILABLE"
        for n, persist, status in zero_run["base"].values()
    ), zero_run["base"]
