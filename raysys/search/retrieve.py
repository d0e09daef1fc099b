"""Encode queries under the index's contract and search the FAISS index."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from raysys.contract import EncodingContract, check_compatible
from raysys.index.build import load_index
from raysys.search.runfile import Run

log = logging.getLogger(__name__)


class Searcher:
    """A loaded index plus the query encoder whose contract matches it."""

    def __init__(
        self,
        index_dir: str | Path,
        model: str,
        contract: EncodingContract | None = None,
        *,
        loaded: tuple[Any, Any] | None = None,
    ) -> None:
        """``loaded``: an already loaded ``(embedder, tokenizer)`` of ``model``."""
        from raysys.models.embedder import load_embedder

        self.index, self.ids, self.manifest = load_index(index_dir)
        self.model, self.tokenizer = loaded or load_embedder(model, "cpu", contract)
        check_compatible(EncodingContract.from_dict(self.manifest["contract"]), self.model.contract)

    def encode(self, queries: list[str], batch_size: int = 256) -> np.ndarray:
        return self.model.encode_texts(self.tokenizer, queries, "query", batch_size).numpy()

    def search(
        self,
        qids: list[str],
        qvecs: np.ndarray,
        *,
        topk: int = 1000,
        nprobe: int = 0,
        drop_self_hits: bool = True,
    ) -> Run:
        nprobe = nprobe or int(self.manifest.get("nprobe") or 0)
        if nprobe:
            faiss.ParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
        k = min(topk + (1 if drop_self_hits else 0), self.index.ntotal)
        scores, rows = self.index.search(np.ascontiguousarray(qvecs, dtype=np.float32), k)
        run: Run = {}
        for qid, srow, rrow in zip(qids, scores, rows, strict=True):
            hits = {}
            for s, r in zip(srow, rrow, strict=True):
                if r < 0:
                    continue
                did = self.ids[r]
                if drop_self_hits and did == qid:
                    continue
                hits[did] = float(s)
            run[qid] = dict(list(hits.items())[:topk])
        return run
