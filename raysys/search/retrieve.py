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
from raysys.storage import Location, resolve

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

    def represent(self, texts: list[str], batch_size: int = 256) -> dict[str, Any]:
        """Every representation of the model for ``texts`` (queries), by name."""
        if self.remote:
            import ray

            from raysys.runtime import surface_user_errors

            with surface_user_errors():
                return ray.get(self._get_actor().represent.remote(texts, batch_size))
        embedder, tok = self.get()
        return embedder.represent_texts(tok, texts, "query", batch_size)

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

    def represent(self, texts: list[str], batch_size: int) -> dict[str, Any]:
        with self.settings.autocast():
            return self.embedder.represent_texts(self.tok, texts, "query", batch_size)

    def device(self) -> str:
        return str(next(self.embedder.parameters()).device)


MODES = ("dense", "sparse", "multivector", "hybrid")


class Searcher:
    """A loaded index plus the query encoder whose contract matches it.

    ``index_dir`` is the dense index; an M3 model's index folder also holds
    ``sparse/`` and ``multivector/`` (:func:`raysys.stages.index_stage`).
    ``mode`` picks which ranks (``search.mode``); :attr:`modes` lists what
    the folder supports. ``options`` is the ``search`` config section (the
    hybrid's candidates, fusion and weights).
    """

    def __init__(
        self,
        index_dir: str | Path | Location,
        encoder: QueryEncoder,
        mode: str = "dense",
        options: Any = None,
    ) -> None:
        from raysys.errors import UserError

        root = resolve(index_dir)
        manifest = read_manifest(root)
        heads = [manifest.get("representation", "dense")]
        heads += [r for r in ("sparse", "multivector") if root.join(r, "manifest.json").is_file()]
        self.modes = [*heads, "hybrid"] if len(heads) > 1 else heads
        if mode not in self.modes:
            raise UserError(
                f"search.mode={mode}: the index at {index_dir} supports {', '.join(self.modes)}"
            )
        self.mode, self.options = mode, options
        needed = heads if mode == "hybrid" else [mode]
        self.indexes: dict[str, Any] = {}
        for h in needed:
            where = root if h == heads[0] else root.join(h)
            self.indexes[h] = get_representation(h).open_index(where)
        counts = {h: len(x.ids) for h, x in self.indexes.items()}
        if len(set(counts.values())) > 1:
            raise UserError(f"{index_dir}: its indexes hold different passages {counts}")
        self.index = self.indexes[needed[0]]
        self.representation = get_representation(needed[0])
        self.manifest = self.index.manifest
        self.encoder = encoder
        embedder, _ = encoder.get()
        check_compatible(EncodingContract.from_dict(manifest["contract"]), embedder.contract)
        lacking = [h for h in needed if h not in embedder.representations]
        if lacking:
            raise UserError(
                f"search.mode={mode} needs the {', '.join(lacking)} representation, which the "
                f"query encoder ({embedder.contract.model}) does not produce"
            )

    def encode(self, queries: list[str], batch_size: int = 256) -> Any:
        """Query representations: a matrix in dense mode, else a dict by name."""
        if self.mode == "dense":
            return self.encoder.encode(queries, batch_size)
        return self.encoder.represent(queries, batch_size)

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
        from raysys.search.hybrid import hybrid_search

        k = topk + (1 if drop_self_hits else 0)
        if self.mode == "hybrid":
            o = self.options
            scores, rows = hybrid_search(
                self.indexes,
                qvecs,
                k,
                nprobe=nprobe,
                **(
                    {
                        "candidates": o.hybrid_candidates,
                        "weights": o.weights,
                        "method": o.fusion,
                        "rrf_k": o.rrf_k,
                    }
                    if o is not None
                    else {}
                ),
            )
        else:
            q = qvecs[self.mode] if isinstance(qvecs, dict) else qvecs
            scores, rows = self.index.search(q, k, nprobe)
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
