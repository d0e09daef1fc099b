"""Dense vectors: one fixed-size vector per passage, searched by inner product
in a FAISS index (exact ``Flat`` or IVF-PQ, see :mod:`raysys.index.build`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

from raysys.representations.base import Representation
from raysys.storage import Location

COLUMN = "emb"


class DenseIndex:
    """A loaded FAISS index with its row -> id list and manifest."""

    def __init__(self, index_dir: str | Path | Location) -> None:
        from raysys.index.build import load_index

        self.index, self.ids, self.manifest = load_index(index_dir)
        self.default_nprobe = int(self.manifest.get("nprobe") or 0)
        self._direct_map = False

    @property
    def nlist(self) -> int:
        from raysys.index.faiss_lib import load_faiss

        faiss = load_faiss()

        try:
            return int(faiss.extract_index_ivf(self.index).nlist)
        except RuntimeError:
            return 0

    def search(self, queries: Any, k: int, nprobe: int = 0) -> tuple[np.ndarray, np.ndarray]:
        from raysys.index.faiss_lib import load_faiss

        faiss = load_faiss()

        nprobe = nprobe or self.default_nprobe
        if nprobe and self.nlist:
            faiss.ParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
        k = min(k, self.index.ntotal)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def score_rows(self, query: Any, rows: np.ndarray) -> np.ndarray:
        """Inner products of one query with the given rows' vectors as the
        index stores them (decoded PQ codes for IVF-PQ)."""
        from raysys.index.faiss_lib import load_faiss

        faiss = load_faiss()
        if not self._direct_map:
            try:
                faiss.extract_index_ivf(self.index).make_direct_map()
            except RuntimeError:
                pass  # not IVF: Flat and IDMap2 reconstruct as they are
            self._direct_map = True
        rows = np.asarray(rows, np.int64)
        vecs = np.stack([self.index.reconstruct(int(r)) for r in rows]) if len(rows) else None
        if vecs is None:
            return np.zeros(0, np.float32)
        return vecs @ np.asarray(query, np.float32)

    def sweep_points(self, candidates: list[int]) -> list[int]:
        nlist = self.nlist
        if not nlist:
            return []
        return sorted({p for p in candidates if p <= nlist} | {self.default_nprobe})


class DenseRepresentation(Representation):
    name: ClassVar[str] = "dense"

    def collect(self, output: Any, dtype: str) -> Any:
        return output.to(torch.float16 if dtype == "float16" else torch.float32)

    def combine(self, parts: list[Any]) -> np.ndarray:
        return torch.cat(parts).float().cpu().numpy() if parts else np.zeros((0, 0), np.float32)

    def to_columns(self, parts: list[Any], dtype: str) -> dict[str, pa.Array]:
        emb = self.combine(parts).astype(np.float16 if dtype == "float16" else np.float32)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])
        return {COLUMN: vec}

    def build_index(
        self,
        emb_dir: str | Path | Location,
        out_dir: str | Path | Location,
        icfg: Any,
        tune_queries: Any = None,
    ) -> dict[str, Any]:
        from raysys.index.build import build_index

        return build_index(emb_dir, out_dir, icfg, tune_queries=tune_queries)

    def open_index(self, index_dir: str | Path | Location) -> DenseIndex:
        return DenseIndex(index_dir)

    def score(self, query: Any, passages: Any) -> np.ndarray:
        return np.asarray(passages, dtype=np.float32) @ np.asarray(query, dtype=np.float32)
