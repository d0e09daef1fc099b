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
    """A query encoder, loaded once on first use (nprobe tuning, then search).

    With a GPU pool (``pool.use_gpu``, a :class:`raysys.config.PoolConfig`:
    ``encode.pool``) the model runs in one Ray actor on a GPU, under the
    pool's precision settings; otherwise on the driver's CPU. Use it as a
    context manager: leaving the block gives the GPU back.
    """

    def __init__(
        self, model: str, contract: EncodingContract | None, pool: Any | None = None
    ) -> None:
        self.model, self.contract, self.pool = model, contract, pool
        self._loaded: tuple[Any, Any] | None = None
        self._actor: Any = None

    @property
    def remote(self) -> bool:
        return bool(self.pool is not None and self.pool.use_gpu)

    def get(self) -> tuple[Any, Any]:
        """``(embedder, tokenizer)`` on the driver."""
        if self._loaded is None:
            from raysys.models.embedder import load_embedder

            self._loaded = load_embedder(self.model, "cpu", self.contract)
        return self._loaded

    def _get_actor(self) -> Any:
        if self._actor is None:
            import dataclasses

            import ray

            from raysys.runtime import ensure_ray, require_gpus

            ensure_ray()
            require_gpus(ray, "query encoding (encode.pool.use_gpu)")
            cls = ray.remote(num_gpus=self.pool.gpus_per_actor, num_cpus=1)(QueryEncodeActor)
            contract = self.contract.to_dict() if self.contract is not None else None
            self._actor = cls.remote(self.model, contract, dataclasses.asdict(self.pool))
        return self._actor

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        if self.remote:
            import ray

            from raysys.runtime import surface_user_errors

            with surface_user_errors():
                return ray.get(self._get_actor().encode.remote(texts, batch_size))
        embedder, tok = self.get()
        return embedder.encode_texts(tok, texts, "query", batch_size).numpy()

    def close(self) -> None:
        """Release the GPU actor, if any (a rerank pool may want its GPU)."""
        if self._actor is not None:
            import ray

            ray.kill(self._actor)
            self._actor = None

    def __enter__(self) -> QueryEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QueryEncodeActor:
    """Ray actor: the query encoder on a GPU (see :class:`QueryEncoder`)."""

    def __init__(self, model: str, contract: dict[str, Any] | None, opts: dict[str, Any]) -> None:
        from raysys.models.embedder import load_embedder
        from raysys.models.inference import InferenceSettings

        self.settings = InferenceSettings.from_opts(opts, "query encoder")
        self.settings.prepare()
        c = EncodingContract.from_dict(contract) if contract is not None else None
        self.embedder, self.tok = load_embedder(
            model, self.settings.device, c, **self.settings.load_kwargs()
        )

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        with self.settings.autocast():
            return self.embedder.encode_texts(self.tok, texts, "query", batch_size).numpy()

    def device(self) -> str:
        return str(next(self.embedder.parameters()).device)


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
