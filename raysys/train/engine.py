"""DeepSpeed configuration and initialisation for a raysys training run."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

# The first DeepSpeed with PR #8148 (ZeRO-3 keeps frozen parameters whole
# through a non-reentrant checkpoint's recompute): before it, LoRA + ZeRO-3
# + gradient checkpointing fails at the first backward ("CheckpointError ...
# saved [4096] vs recomputed [0]"). The same floor as pyproject.toml's.
MIN_DEEPSPEED = "0.19.3"
# DeepSpeed's default stage3_param_persistence_threshold (elements): a
# parameter this small or smaller stays whole on every rank under ZeRO-3.
DS_PERSISTENCE_DEFAULT = 100_000


def check_deepspeed_version(version: str) -> None:
    """A one-line :class:`raysys.errors.UserError` when ``version`` is below
    :data:`MIN_DEEPSPEED`."""
    from packaging.version import InvalidVersion, Version

    from raysys.errors import UserError

    try:
        old = Version(version) < Version(MIN_DEEPSPEED)
    except InvalidVersion:
        return  # a local build with an odd version string: let it run
    if old:
        raise UserError(
            f"DeepSpeed {version} is older than {MIN_DEEPSPEED}, the first with the fix for "
            "LoRA + ZeRO-3 + gradient checkpointing (DeepSpeed PR #8148; before it the first "
            f"backward fails); pip install 'deepspeed>={MIN_DEEPSPEED}'"
        )


def setup_accelerator_env(use_gpu: bool) -> None:
    """Select DeepSpeed's accelerator before deepspeed is imported (CPU: gloo)."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR",
        os.path.join(os.path.expanduser("~"), ".cache", "raysys", "torch_extensions"),
    )


def init_deepspeed_comm(use_gpu: bool) -> None:
    """Set the accelerator env, then let DeepSpeed adopt the process group
    already set up (Ray Train's, or a single-process one).

    On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory
    all-reduce op (``deepspeed_shm_comm``) that only ``inference_all_reduce``
    uses, which raysys never calls. The build needs a C++ toolchain, takes
    about a minute per new environment, and a build killed half-way leaves a
    lock file in ``TORCH_EXTENSIONS_DIR`` on which every later run waits
    forever. So the op is not built on CPU.
    """
    setup_accelerator_env(use_gpu)
    import importlib

    import deepspeed  # after the accelerator env is set

    check_deepspeed_version(deepspeed.__version__)
    if not use_gpu:
        # By module name: the attribute ``deepspeed.comm.torch`` is torch itself.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed()


def deepspeed_config(
    train: Any, world_size: int, lora: bool = False, persist_numel: int = 0
) -> dict[str, Any]:
    """Build the DeepSpeed config dict from a :class:`raysys.config.TrainConfig`
    (``lora``: the task trains LoRA adapters; ``persist_numel``: under
    ZeRO-3 + LoRA, the size in elements up to which parameters stay whole,
    from :func:`lora_persistence_threshold`)."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if not lora:
            # Full fine-tuning: partition every parameter, small ones too.
            zero["stage3_param_persistence_threshold"] = 0
        else:
            # LoRA: every adapter stays whole on every rank (gathered once
            # per optimizer step, not in each forward, recompute and backward
            # pass). DeepSpeed's default threshold (1e5 elements) is too small
            # for that: r=32 adapters on Llama-2-7B hold 131k-352k each.
            zero["stage3_param_persistence_threshold"] = max(
                DS_PERSISTENCE_DEFAULT, int(persist_numel)
            )
    return {
        "train_micro_batch_size_per_gpu": train.per_device_queries,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.per_device_queries * train.grad_accum * world_size,
        "gradient_clipping": train.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        # Dynamic loss scaling for fp16 (GPUs without bf16: V100, T4).
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def warmup_linear(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up, then linear decay to zero at ``total_steps``."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return f


def param_groups(
    model: nn.Module, optim: Any, head_prefixes: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """AdamW groups: decayed matrices, undecayed vectors, and fresh heads.

    ``optim`` is a :class:`raysys.config.OptimConfig`. With ``optim.head_lr >
    0`` the parameters under ``head_prefixes`` (a task's freshly initialised
    heads, e.g. a reranker's ``head.``) get their own learning rate (they may
    learn faster than the pretrained body); the schedule scales every group
    alike.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head_lr = optim.head_lr
    is_head = [head_lr > 0 and n.startswith(head_prefixes) for n, _ in named]
    body = [p for (_, p), h in zip(named, is_head, strict=True) if not h]
    groups = [
        {"params": [p for p in body if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in body if p.ndim < 2], "weight_decay": 0.0},
        {
            "params": [p for (_, p), h in zip(named, is_head, strict=True) if h],
            "weight_decay": 0.0,
            "lr": head_lr,
        },
    ]
    return groups


def initialize(
    model: nn.Module,
    train: Any,
    ds_config: dict[str, Any],
    total_steps: int,
    head_prefixes: tuple[str, ...] = (),
):
    """``deepspeed.initialize`` with a client AdamW (no compiled optimizer op) and schedule.

    The model goes to DeepSpeed directly: Ray's ``prepare_model`` must not wrap
    it first (double all-reduce under ZeRO-2, crash under ZeRO-3).
    """
    import deepspeed

    groups = param_groups(model, train.optim, head_prefixes)
    # DeepSpeed drops empty groups, which would desynchronise the scheduler.
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=train.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear(total_steps, train.optim.warmup_ratio)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler


def lora_persistence_threshold(model: nn.Module) -> int:
    """The ZeRO-3 persistence threshold that keeps the trainable parameters of
    ``model`` (LoRA adapters, small heads) whole without replicating a base
    matrix: the largest trainable parameter smaller than every frozen one
    that DeepSpeed's default threshold partitions.

    DeepSpeed keeps every parameter of at most the threshold's size (in
    elements; ``ds_numel`` for one already partitioned) whole on every rank,
    frozen or not. A trainable parameter as large as a base matrix (a
    hidden x hidden head) stays partitioned. Llama-2-7B, r=32: 352,256 (its
    smallest frozen matrix holds 16.8M).
    """

    def numel(p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    frozen = [numel(p) for p in model.parameters() if not p.requires_grad]
    ceiling = min((n for n in frozen if n > DS_PERSISTENCE_DEFAULT), default=None)
    sizes = [numel(p) for p in model.parameters() if p.requires_grad]
    return max((n for n in sizes if ceiling is None or n < ceiling), default=0)


def enable_tf32(device: torch.device | str, on: bool = True) -> bool:
    """TF32 matmuls and convolutions for the fp32 parts of training on a
    CUDA device (Ampere and later; fp32 master weights, ``precision: fp32``
    jobs); a no-op elsewhere. Returns whether it applied."""
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return True


def build_engine(task: Any, tokenizer: Any, train: Any, world_size: int, total_steps: int):
    """The task's module under DeepSpeed: ``(engine, scheduler)``.

    Under ZeRO-3 the module is built inside partitioned construction, so the
    weights are sharded while they load; under LoRA the persistence
    threshold is then set from the adapters' sizes (they are created after
    the base loads, and DeepSpeed reads the threshold in ``initialize``). The
    seed is the same on every rank and every run: LoRA A matrices (and
    random_init weights) must not depend on the process. On a CUDA engine
    TF32 is switched on (off where the config has ``train.tf32: false``).
    """
    lora = task.uses_lora()
    ds_config = deepspeed_config(train, world_size, lora=lora)
    hf_ds = None
    if train.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(train.seed)
    model = task.build(tokenizer)
    if train.zero_stage == 3 and lora:
        ds_config = deepspeed_config(
            train, world_size, lora=True, persist_numel=lora_persistence_threshold(model)
        )
    engine, _, scheduler = initialize(model, train, ds_config, total_steps, task.head_prefixes)
    del hf_ds
    enable_tf32(getattr(engine, "device", "cpu"), bool(getattr(train, "tf32", True)))
    return engine, scheduler
