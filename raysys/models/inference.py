"""How a model runs for inference on its device: precision, TF32, attention
implementation, token-budget micro-batches, pinned non-blocking copies and
tokenization overlapped with the forward passes.

Encode actors, rerank actors and query encoding share it, so the same pool
settings (:class:`raysys.config.PoolConfig`) mean the same thing everywhere:

- ``precision``: ``auto`` (the pools' default: bf16 on a GPU that supports
  it, i.e. Ampere and later; fp32 on older GPUs and on CPUs); ``fp32``;
  ``bf16`` (GPU: weights in bf16; CPU: bf16 autocast); ``fp16`` (GPU only:
  weights in fp16, for V100/T4). See :func:`resolve_precision`.
- ``tf32``: TF32 matmuls for the fp32 parts on Ampere and later.
- ``attn_implementation``: passed to ``from_pretrained`` (``sdpa``,
  ``flash_attention_2``, ``eager``; empty: the model's default).
- ``micro_batch`` rows and, with ``micro_tokens > 0``, at most that many
  padded tokens per forward pass: short texts go in large batches, long
  ones in small batches, so the GPU sees a steady amount of work.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raysys.runtime import check_worker_device

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: str, legacy_bf16: bool = False) -> str:
    """The precision a pool runs in on ``device``: ``auto`` is bf16 on a CUDA
    device with native bf16 (Ampere and later; V100/T4 only emulate it,
    slowly), else fp32; ``legacy_bf16`` (the older ``bf16: true`` switch)
    turns fp32 and auto into bf16. An explicit fp32/bf16/fp16 is kept."""
    if precision in ("", "auto"):
        if legacy_bf16:
            return "bf16"
        on_gpu = str(device).startswith("cuda") and torch.cuda.is_available()
        native = on_gpu and _native_bf16()
        return "bf16" if native else "fp32"
    if precision == "fp32" and legacy_bf16:
        return "bf16"
    return precision


@dataclass(frozen=True)
class InferenceSettings:
    device: str
    precision: str = "fp32"
    tf32: bool = True
    attn_implementation: str = ""
    micro_batch: int = 32
    micro_tokens: int = 0

    @classmethod
    def from_opts(cls, opts: dict[str, Any], what: str) -> InferenceSettings:
        """Settings from a pool section as a dict; a GPU that was asked for
        but cannot be used is an error here (see ``check_worker_device``)."""
        use_gpu = bool(opts.get("use_gpu"))
        check_worker_device(use_gpu, what)
        return cls.for_device("cuda" if use_gpu else "cpu", opts)

    @classmethod
    def for_device(cls, device: str, opts: dict[str, Any]) -> InferenceSettings:
        """Settings on a given device from a pool section as a dict (its
        ``precision`` resolved by :func:`resolve_precision`; a dict without
        one runs fp32)."""
        precision = resolve_precision(
            str(opts.get("precision") or "fp32"), str(device), bool(opts.get("bf16"))
        )
        return cls(
            device=str(device),
            precision=precision,
            tf32=bool(opts.get("tf32", True)),
            attn_implementation=str(opts.get("attn_implementation") or ""),
            micro_batch=int(opts.get("micro_batch", 32)),
            micro_tokens=int(opts.get("micro_tokens", 0)),
        )

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def load_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments: the weights' dtype (half
        precision on a GPU when asked, else fp32), the attention
        implementation when one is named."""
        # Always explicit: transformers otherwise keeps the checkpoint's dtype
        # (a bf16 checkpoint would run "fp32" in bf16, and crawl on a CPU).
        kw: dict[str, Any] = {"dtype": _DTYPES[self.precision] if self.on_gpu else torch.float32}
        if self.attn_implementation:
            kw["attn_implementation"] = self.attn_implementation
        return kw

    def prepare(self) -> None:
        """Process-wide settings for this device (TF32 matmuls on GPUs)."""
        if self.on_gpu:
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on CPU (GPU weights are already in their dtype)."""
        if self.device == "cpu" and self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Micro-batches (lists of indices, in order) of texts of ``lengths``."""
        return token_budget_batches(lengths, self.micro_batch, self.micro_tokens)


def token_budget_batches(
    lengths: Sequence[int], max_rows: int, max_tokens: int = 0
) -> list[list[int]]:
    """Consecutive indices cut into batches of at most ``max_rows`` rows and
    (when ``max_tokens > 0``) at most ``max_tokens`` padded tokens, i.e. rows
    x the longest row; a row longer than the budget goes alone. Sort by
    length first for little padding."""
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        grown = max(longest, n)
        full = len(cur) >= max_rows or (max_tokens > 0 and grown * (len(cur) + 1) > max_tokens)
        if cur and full:
            out.append(cur)
            cur, grown = [], n
        cur.append(i)
        longest = grown
    if cur:
        out.append(cur)
    return out


def pin(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """Host tensors in pinned memory when they are bound for a GPU (done by
    the producer thread, off the forward pass's path)."""
    if not device.startswith("cuda"):
        return batch
    return {k: v.pin_memory() for k, v in batch.items()}


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """Tensors on ``device``; from pinned memory the copies do not block,
    so they overlap the previous forward pass."""
    if not device.startswith("cuda"):
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """The items of ``items``, produced ``depth`` ahead in a thread.

    Tokenizing and padding the next micro-batches overlaps the current
    forward pass (fast tokenizers release the GIL). An error while producing
    is raised here, in order.
    """
    q: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done, failed = 0, 1

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((2, item))
        except BaseException as e:  # handed to the consumer
            q.put((failed, e))
            return
        q.put((done, None))

    t = threading.Thread(target=work, name="raysys-prefetch", daemon=True)
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == done:
                return
            if kind == failed:
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)


def _native_bf16() -> bool:
    """Whether the current GPU has bf16 in hardware (Ampere and later); torch
    before 2.5 has no ``including_emulation`` and answers from the compute
    capability alone."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:
        return torch.cuda.get_device_capability()[0] >= 8
