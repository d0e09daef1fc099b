"""GradCache (raysys.train.steps.GradCacheStep): the config contract, the task
seam it uses, and exactness on 2 Ray Train workers under ZeRO 0-3, LoRA,
gradient checkpointing and bf16, dropout on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raysys.config import ConfigError, load_config
from raysys.train.steps import GradCacheStep, StandardStep, StepStrategy, make_step
from tests.helpers import toy_train_overrides
from tests.record import record

_overrides = toy_train_overrides


class ChunkedFullGraph(StepStrategy):
    """The reference GradCache must equal under dropout: the same chunks,
    encoded in the same order from the same RNG state, but one graph over the
    whole micro-batch and one backward through it (what an unbounded memory
    would allow)."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size

    def __call__(self, engine, task, batch, device) -> float:  # noqa: ANN001
        reps = [task.represent(engine, c, device) for c in task.split(batch, self.chunk_size)]
        out = task.loss_from_reps(reps, batch, device)
        engine.backward(out.loss)
        engine.step()
        return out.value


# -- the contract and the seam (fast) ------------------------------------------------


def test_chunk_size_override_turns_grad_cache_on(tiny_bert_dir, toy_data):
    cfg = load_config(None, _overrides(tiny_bert_dir, toy_data, "train.grad_cache.chunk_size=2"))
    step = make_step(cfg.train)
    assert isinstance(step, GradCacheStep) and step.chunk_size == 2
    off = load_config(None, _overrides(tiny_bert_dir, toy_data))
    assert off.train.grad_cache.chunk_size == 0 and isinstance(make_step(off.train), StandardStep)


def test_bad_grad_cache_settings_fail_in_one_line(tiny_bert_dir, toy_data):
    with pytest.raises(ConfigError, match=r"chunk_size must be >= 0"):
        load_config(None, _overrides(tiny_bert_dir, toy_data, "train.grad_cache.chunk_size=-1"))
    with pytest.raises(ConfigError, match=r"expected an integer"):
        load_config(None, _overrides(tiny_bert_dir, toy_data, "train.grad_cache.chunk_size=big"))
    # The reranker's loss is per group: GradCache would buy nothing there.
    with pytest.raises(ConfigError, match=r"train.grad_cache: the rerank task.*grad_accum"):
        load_config(
            None,
            _overrides(
                tiny_bert_dir,
                toy_data,
                "train.task=rerank",
                f"reranker.path={tiny_bert_dir}",
                "train.grad_cache.chunk_size=2",
            ),
        )


def test_the_cli_reports_a_task_that_cannot_chunk(tiny_bert_dir, toy_data, tmp_path):
    args = [
        sys.executable,
        "-m",
        "raysys.cli",
        "train",
        "-",
        *_overrides(tiny_bert_dir, toy_data),
        "train.task=rerank",
        f"reranker.path={tiny_bert_dir}",
        "train.grad_cache.chunk_size=2",
        "--out",
        str(tmp_path / "out"),
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "train.grad_cache: the rerank task" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("side", ["right", "left"])
def test_split_keeps_each_query_with_its_passages(tiny_bert_dir, toy_data, side):
    from raysys.models.backbone import load_tokenizer
    from raysys.train.tasks.retrieve import RetrieveTask

    cfg = load_config(None, _overrides(tiny_bert_dir, toy_data, "train.group_size=3"))
    task = RetrieveTask(cfg)
    data = task.load_data()
    tok = load_tokenizer(str(tiny_bert_dir))
    tok.padding_side = side
    batch = task.collator(data, tok)(list(range(7)), 0)
    chunks = task.split(batch, 3)
    assert [len(c.query_positive_ids) for c in chunks] == [3, 3, 1]
    assert [c.passages["input_ids"].shape[0] for c in chunks] == [9, 9, 3]
    assert sum((c.passage_ids for c in chunks), []) == batch.passage_ids
    for c, start in zip(chunks, (0, 3, 6), strict=True):
        # Each chunk keeps every real token of its rows and drops all-padding columns.
        for key, big in (("queries", batch.queries), ("passages", batch.passages)):
            small = getattr(c, key)
            g = 1 if key == "queries" else 3
            rows = slice(start * g, start * g + small["input_ids"].shape[0])
            real = big["attention_mask"][rows].bool()
            assert small["attention_mask"].shape[1] == int(real.any(0).sum())
            assert small["attention_mask"].all(0).any()  # no all-padding column left
            for i in range(real.shape[0]):
                got = small["input_ids"][i][small["attention_mask"][i].bool()]
                assert torch.equal(got, big["input_ids"][rows][i][real[i]])


# -- exactness on 2 Ray Train workers (slow) -------------------------------------------

CHUNK = 4  # per-worker batch 6: a chunk of 4 and a remainder of 2


def _exactness_worker(config: dict) -> None:
    """Inside each of 2 Ray Train workers: every variant twice (GradCache and
    its reference) through raysys's own engine and optimizer steps."""
    import torch.distributed as dist

    from raysys.config import load_config
    from raysys.train.inprocess import train_steps
    from raysys.train.steps import GradCacheStep, StandardStep

    results = {}
    for name, overrides, ref_kind in config["variants"]:
        cfg = load_config(None, overrides)
        runs = {
            "grad_cache": GradCacheStep(CHUNK),
            "reference": ChunkedFullGraph(CHUNK) if ref_kind == "chunked" else StandardStep(),
        }
        if config["no_replay"] and name == "zero0":
            runs["no_replay"] = GradCacheStep(CHUNK, replay_rng=False)
        out = {}
        for run, step in runs.items():
            res = train_steps(cfg, 5, torch.device("cpu"), step_fn=step, keep_state=True)
            out[run] = res
        if dist.get_rank() == 0:
            gc = out["grad_cache"]
            entry = {"losses": {k: v.losses for k, v in out.items()}}
            for other in [k for k in out if k != "grad_cache"]:
                entry[f"param_diff_{other}"] = max(
                    (gc.state[k].float() - out[other].state[k].float()).abs().max().item()
                    for k in gc.state
                )
            results[name] = entry
    if dist.get_rank() == 0:
        Path(config["out"]).write_text(json.dumps(results))


def _run_workers(variants: list, out: Path, no_replay: bool = False) -> dict:
    import ray.cloudpickle
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    # The worker function comes from the test module: pickle it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        _exactness_worker,
        train_loop_config={"variants": variants, "out": str(out), "no_replay": no_replay},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
    )
    trainer.fit()
    return json.loads(out.read_text())


@pytest.mark.slow
def test_grad_cache_is_exact_under_every_zero_stage(ray_local, tiny_bert_dir, toy_data, tmp_path):
    """Evidence 1: 2 workers, negatives gathered across them, dropout 0.1:
    GradCache equals one graph over the same chunks to 1e-5 (loss curve over 5
    steps and every trained weight), ZeRO 0, 1, 2 and 3; without the RNG
    replay it does not."""
    variants = [
        (f"zero{s}", _overrides(tiny_bert_dir, toy_data, f"train.zero_stage={s}"), "chunked")
        for s in (0, 1, 2, 3)
    ]
    got = _run_workers(variants, tmp_path / "exact.json", no_replay=True)
    record("every_zero_stage", got)
    for name, entry in got.items():
        gc, ref = entry["losses"]["grad_cache"], entry["losses"]["reference"]
        assert gc == pytest.approx(ref, abs=1e-5), (name, gc, ref)
        assert entry["param_diff_reference"] < 1e-5, (name, entry)
        assert len(set(gc)) == 5  # the weights moved: 5 different losses
    # The same chunks without restoring the RNG: other dropout masks, other gradients.
    assert got["zero0"]["param_diff_no_replay"] > 1e-4, got["zero0"]


@pytest.mark.slow
def test_grad_cache_is_exact_with_lora_checkpointing_accumulation_and_bf16(
    ray_local, tiny_llama_dir, tiny_bert_dir, toy_data, tmp_path
):
    """LoRA (adapter dropout 0.1) with gradient checkpointing and 2 accumulated
    micro-batches under ZeRO-3; bf16 under ZeRO-2; without dropout GradCache
    equals the standard one-pass step itself."""
    from tests.helpers import tiny_bert

    no_dropout = tiny_bert(tmp_path / "bert-no-dropout", dropout=0.0)
    lora = [
        "model.lora.enabled=true",
        "model.lora.r=8",
        "model.lora.dropout=0.1",
        "model.lora.target_modules=[q_proj,v_proj]",
        "contract.pooling=last",
        "contract.append_eos=true",
        "train.gradient_checkpointing=true",
        "train.grad_accum=2",
        "train.zero_stage=3",
    ]
    # grad_accum 1: the chunks' backward passes run inside DeepSpeed's
    # coalesce_grad_reduction() (one reduction per step, #34 fault 10).
    lora_coalesced = [o for o in lora if o != "train.grad_accum=2"]
    variants = [
        ("lora_ckpt_accum_zero3", _overrides(tiny_llama_dir, toy_data, *lora), "chunked"),
        (
            "lora_ckpt_coalesced_zero3",
            _overrides(tiny_llama_dir, toy_data, *lora_coalesced),
            "chunked",
        ),
        (
            "bf16_zero2",
            _overrides(tiny_bert_dir, toy_data, "train.precision=bf16", "train.zero_stage=2"),
            "chunked",
        ),
        (
            "no_dropout_standard_zero3",
            _overrides(no_dropout, toy_data, "train.zero_stage=3"),
            "standard",
        ),
    ]
    got = _run_workers(variants, tmp_path / "exact.json")
    record("lora_checkpointing_accumulation_bf16", got)
    entry = got["lora_ckpt_accum_zero3"]
    gc, ref = entry["losses"]["grad_cache"], entry["losses"]["reference"]
    assert gc == pytest.approx(ref, abs=1e-5), (gc, ref)
    assert entry["param_diff_reference"] < 1e-5, entry
    entry = got["lora_ckpt_coalesced_zero3"]
    gc, ref = entry["losses"]["grad_cache"], entry["losses"]["reference"]
    assert gc == pytest.approx(ref, abs=1e-5), (gc, ref)
    assert entry["param_diff_reference"] < 1e-5, entry
    # Against the one-pass step the chunks are shorter (no padding to the
    # batch's longest text), so sums run in another order: the loss curve
    # agrees to 2e-6; the weights to float noise amplified by Adam on
    # near-zero gradients (m / sqrt(v) of a 1e-9 gradient is O(1)): 2e-4.
    # Measured here: 9.5e-7 and 9.8e-5 (grad_cache_exactness.json); the bounds
    # leave room for one more float32 rounding step on another CPU.
    # The README's figures; measured on a 2-core CPU box, the same on every
    # run: loss 9.5e-7 (4 float32 ulps at 3.9), weights 9.76e-5.
    entry = got["no_dropout_standard_zero3"]
    gc, ref = entry["losses"]["grad_cache"], entry["losses"]["reference"]
    assert gc == pytest.approx(ref, rel=0, abs=2e-6), (gc, ref)
    assert entry["param_diff_reference"] < 2e-4, entry
    # bf16: the same computation in bf16 (accumulation order differs): close, not bitwise.
    entry = got["bf16_zero2"]
    gc, ref = entry["losses"]["grad_cache"], entry["losses"]["reference"]
    assert gc == pytest.approx(ref, abs=3e-3), (gc, ref)
    assert entry["param_diff_reference"] < 5e-3, entry


@pytest.mark.slow
def test_the_training_loop_runs_grad_cache_from_the_override(ray_local, toy_data, tmp_path):
    """The command contract through Ray Train's loop: ``train.grad_cache.chunk_size=2``
    gives the loss curve of the standard step (dropout off) and an export."""
    from raysys.train.launch import run_training
    from tests.helpers import tiny_bert

    model = tiny_bert(tmp_path / "bert", dropout=0.0)
    curves = {}
    for chunk in (0, 2):
        cfg = load_config(
            None,
            _overrides(
                model,
                toy_data,
                "train.zero_stage=2",
                "train.max_steps=4",
                "train.log_steps=1",
                f"train.grad_cache.chunk_size={chunk}",
                f"train.checkpoint.storage_path={tmp_path / 'ray'}",
                f"train.checkpoint.run_name=gc{chunk}",
            ),
        )
        outcome = run_training(cfg, tmp_path / f"out{chunk}")
        assert outcome.finished and outcome.model_dir is not None
        curves[chunk] = [h["loss"] for h in outcome.history]
    assert curves[2] == pytest.approx(curves[0], abs=1e-5), curves
