"""The representation seam: what a model writes per passage, how it is
indexed, and how a query is scored against it.

A representation (``dense`` vectors, ``sparse`` lexical weights,
``multivector`` token vectors) owns:

- its **encode output**: the Arrow columns one passage's output becomes in an
  embedding shard (:meth:`Representation.collect`, then
  :meth:`Representation.to_columns`);
- its **index backend**: building an index from the shards and opening it for
  search (:meth:`Representation.build_index`, :meth:`Representation.open_index`);
- its **scorer**: exact scores of a query against given passages
  (:meth:`Representation.score`; an opened index's ``score_rows`` scores
  given rows), for hybrid search and for tests.

Models say which representations they produce (``model.represent`` returns a
dict keyed by name); embedding manifests and index manifests record them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa
import torch

from raysys.storage import Location

PIN_BUDGET = 1 << 30  # bytes staged in pinned memory per to_host call; the rest pageable
# Bytes of collected output an encoder may hold on the device before token-level
# kinds copy what they hold to the host (one copy per flush, not per micro-batch):
# a 200k-passage shard of multi-vector output is 30-50 GB, more than a GPU holds.
DEVICE_HOLD_BYTES = 2 << 30


def device_bytes(part: Any) -> int:
    """Bytes of device (non-CPU) tensors in one collected part: a tensor, or a
    dataclass of tensors; host data counts 0."""
    if isinstance(part, torch.Tensor):
        tensors = [part]
    elif hasattr(part, "__dict__"):
        tensors = list(vars(part).values())
    else:
        return 0
    return sum(
        t.numel() * t.element_size()
        for t in tensors
        if isinstance(t, torch.Tensor) and t.device.type != "cpu"
    )


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` on the CPU, copied together, with one wait at the end. The
    encoder calls it once per batch (shard) for all its micro-batches'
    outputs, not once per micro-batch. From a GPU, copies go without blocking
    into pinned memory up to ``PIN_BUDGET`` bytes (torch caches pinned blocks
    for good, so a shard's multi-vector output must not all be pinned), the
    rest into pageable memory."""
    out = []
    pinned = 0
    for t in tensors:
        size = t.numel() * t.element_size()
        if t.device.type == "cuda" and pinned + size <= PIN_BUDGET:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out.append(host.copy_(t, non_blocking=True))
            pinned += size
        else:
            out.append(t.cpu())
    for dev in {t.device for t in tensors if t.device.type == "cuda"}:
        torch.cuda.current_stream(dev).synchronize()
    return out


class SearchIndex(Protocol):
    """An opened index: top-k rows and scores for a batch of query representations."""

    ids: list[str]  # row number -> document id
    manifest: dict[str, Any]

    def search(self, queries: Any, k: int, nprobe: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each ``(n_queries, k)``; a row of -1 is no hit."""
        ...

    def sweep_points(self, candidates: list[int]) -> list[int]:
        """The nprobe values worth sweeping among ``candidates`` ([] when none apply)."""
        ...


class Representation(ABC):
    name: ClassVar[str]

    def collect(self, output: Any, dtype: str) -> Any:
        """What the encoder keeps of one micro-batch's output until its shard
        is done: on the device, detached (no copy to the host, no sync);
        :meth:`combine` copies a shard's parts at once (:func:`to_host`)."""
        return output

    def flush(self, parts: list[Any]) -> list[Any]:
        """``parts`` with what they hold on the device copied to the host, in
        order, for when the encoder's :data:`DEVICE_HOLD_BYTES` is reached.
        Kinds with small outputs (dense) keep them on the device."""
        return parts

    @abstractmethod
    def combine(self, parts: list[Any]) -> Any:
        """Collected micro-batch outputs as one value for search (dense: a
        float32 matrix; token-level kinds: a list with one entry per text)."""

    @abstractmethod
    def to_columns(self, parts: list[Any], dtype: str) -> dict[str, pa.Array]:
        """Shard columns for a shard's collected micro-batch outputs (one row
        per passage, in order)."""

    @abstractmethod
    def build_index(
        self, emb_dir: Location, out_dir: Location, icfg: Any, tune_queries: Any = None
    ) -> dict[str, Any]:
        """Build and save an index from complete embedding shards (local or
        remote locations); returns its manifest."""

    @abstractmethod
    def open_index(self, index_dir: str | Path | Location) -> SearchIndex:
        """Load a saved index for search."""

    @abstractmethod
    def score(self, query: Any, passages: Any) -> np.ndarray:
        """Exact scores of one query's representation against passages'."""

    def embedding_manifest(self, emb_dir: Location) -> dict[str, Any]:
        """The embedding shards' manifest, refused unless they hold this
        representation."""
        from raysys.index.manifest import read_manifest

        emb = read_manifest(emb_dir)
        if self.name not in emb.get("representations", []):
            raise ValueError(f"{emb_dir}: the embeddings hold no {self.name} representation")
        return emb

    def map_shards(
        self,
        emb_dir: Location,
        emb: dict[str, Any],
        icfg: Any,
        fn: Callable[..., Any],
        args: Callable[[int], tuple[Any, ...]],
        label: str,
    ) -> list[Any]:
        """Run ``fn(emb_dir, shard_name, *args(i))`` for every shard ``i`` of
        the embedding manifest ``emb`` as a Ray task (``index.resources``
        apply); returns the results in shard order."""
        import ray

        from raysys.console import Progress
        from raysys.runtime import ensure_ray, surface_user_errors

        ensure_ray()
        task = ray.remote(num_cpus=1, resources=icfg.resources or None)(fn)
        refs = [
            task.remote(emb_dir.portable, s["name"], *args(i)) for i, s in enumerate(emb["shards"])
        ]
        bar = Progress(label, len(refs), "shards")
        results = []
        with surface_user_errors():
            for r in refs:
                results.append(ray.get(r))
                bar.update(1)
        bar.close()
        return results

    def query_output(self, outputs: dict[str, Any]) -> Any:
        """This representation's part of a model's ``represent`` output."""
        return outputs[self.name]
