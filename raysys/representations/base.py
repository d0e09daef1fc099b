"""The representation seam: what a model writes per passage, how it is
indexed, and how a query is scored against it.

A representation (``dense`` today; ``sparse`` lexical weights and
``multivector`` token vectors are the kinds this seam leaves room for) owns:

- its **encode output**: the Arrow columns one passage's output becomes in an
  embedding shard (:meth:`Representation.to_columns`);
- its **index backend**: building an index from the shards and opening it for
  search (:meth:`Representation.build_index`, :meth:`Representation.open_index`);
- its **scorer**: exact scores of a query against given passages
  (:meth:`Representation.score`), for reranking candidates and for tests.

Models say which representations they produce (``model.represent`` returns a
dict keyed by name); embedding manifests and index manifests record them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa

from raysys.storage import Location


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

    @abstractmethod
    def to_columns(self, output: Any, dtype: str) -> dict[str, pa.Array]:
        """Shard columns for a batch of model outputs (one row per passage)."""

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

    def query_output(self, outputs: dict[str, Any]) -> Any:
        """This representation's part of a model's ``represent`` output."""
        return outputs[self.name]
