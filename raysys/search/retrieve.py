"""Encode queries under the index's contract and search the index through
its representation's backend (:mod:`raysys.representations`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from raysys.contract import EncodingContract, check_compatible
from raysys.index.manifest import read_manifest
from raysys.representations import get_representation
from raysys.search.runfile import Run
from raysys.storage import Location

log = logging.getLogger(__name__)


class QueryEncoder:
    """A query encoder, loaded once on first use (nprobe tuning, then search)."""

    def __init__(self, model: str, contract: EncodingContract | None) -> None:
        self.model, self.contract = model, contract
        self._loaded: tuple[Any, Any] | None = None

    def get(self) -> tuple[Any, Any]:
        """``(embedder, tokenizer)``."""
        if self._loaded is None:
            from raysys.models.embedder import load_embedder

            self._loaded = load_embedder(self.model, "cpu", self.contract)
        return self._loaded

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        embedder, tok = self.get()
        return embedder.encode_texts(tok, texts, "query", batch_size).numpy()


class Searcher:
    """A loaded index plus the query encoder whose contract matches it."""

    def __init__(self, index_dir: str | Path | Location, encoder: QueryEncoder) -> None:
        manifest = read_manifest(index_dir)
        self.representation = get_representation(manifest.get("representation", "dense"))
        self.index = self.representation.open_index(index_dir)
        self.manifest = self.index.manifest
        self.encoder = encoder
        embedder, _ = encoder.get()
        check_compatible(EncodingContract.from_dict(self.manifest["contract"]), embedder.contract)

    def encode(self, queries: list[str], batch_size: int = 256) -> np.ndarray:
        return self.encoder.encode(queries, batch_size)

    def search(
        self,
        qids: list[str],
        qvecs: Any,
        *,
        topk: int = 1000,
        nprobe: int = 0,
        drop_self_hits: bool = True,
    ) -> Run:
        """Top ``topk`` hits per query (``nprobe`` 0: the index's default)."""
        k = topk + (1 if drop_self_hits else 0)
        scores, rows = self.index.search(qvecs, k, nprobe)
        ids = self.index.ids
        run: Run = {}
        for qid, srow, rrow in zip(qids, scores, rows, strict=True):
            hits = {}
            for s, r in zip(srow, rrow, strict=True):
                if r < 0:
                    continue
                did = ids[r]
                if drop_self_hits and did == qid:
                    continue
                hits[did] = float(s)
            run[qid] = dict(list(hits.items())[:topk])
        return run
