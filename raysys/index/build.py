"""Build a FAISS index from embedding shards.

- The factory string is any FAISS ``index_factory`` string, or ``auto``: IVF-PQ
  with ``nlist`` and the PQ code size chosen from the vector count and
  dimension (the choice is logged and saved in the manifest).
- The index is trained on a seeded sample; a sample below 39 x nlist is warned
  about. Centroid training runs on the GPU when faiss-gpu sees one.
- Each shard is added in its own Ray task into a copy of the trained empty
  index (ids are global row numbers), written to disk, and merged: in memory
  (``merge_from``) or into on-disk inverted lists for large corpora. No step
  holds more than one shard's vectors, so peak memory is bounded by shard
  size, not corpus size (plus the compressed codes of the final index).
- Saved: ``index.faiss``, ``ids.parquet`` (row number -> document id) and
  ``manifest.json`` (contract, factory string, counts, default nprobe).
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysys.config import ConfigError
from raysys.console import Progress
from raysys.errors import UserError
from raysys.index.encode import read_embeddings
from raysys.index.manifest import read_manifest, write_manifest

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
ONDISK_AUTO_THRESHOLD = 5_000_000


def auto_factory(n: int, dim: int) -> tuple[str, dict[str, Any]]:
    """IVF-PQ sized from the data: nlist ~ 4 sqrt(n) (power of two, at least
    39 training points per list), PQ with ``dim/4`` sub-quantisers of 8 bits
    (fewer bits when the corpus cannot train 256 centroids per sub-space).
    Tiny corpora get an exact ``Flat`` index."""
    if n < 1000:
        return "Flat", {"reason": f"{n} vectors: exact search is cheaper than IVF"}
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    # Two dimensions per sub-quantiser (8x smaller than float32): coarser codes
    # cost SciFact over 0.01 nDCG@10 whatever the nprobe.
    m = next(m for m in (dim // 2, dim // 4, dim // 8, 8, 4, 2, 1) if m >= 1 and dim % m == 0)
    nbits = 8 if n >= 256 * 4 else max(4, int(math.log2(n / 4)))
    # `np`: no polysemous training (FAISS's default for IVFPQ, 17x slower to
    # train here and not used by our search).
    return f"IVF{nlist},PQ{m}x{nbits}np", {"nlist": nlist, "pq_m": m, "pq_nbits": nbits}


def tune_nprobe(
    index: faiss.Index,
    emb_dir: Path,
    shards: list[dict[str, Any]],
    *,
    target: float = 0.99,
    k: int = 10,
    n_queries: int = 500,
    seed: int = 0,
    queries: np.ndarray | None = None,
) -> tuple[int, dict[str, float]]:
    """Smallest nprobe whose recall@k against exact search reaches ``target``
    times the best recall any nprobe reaches (the ceiling the codes allow).

    Queries are real (held-out, e.g. training-split) query vectors when given,
    else a sample of corpus vectors, which sit closer to the centroids and so
    under-state the nprobe real queries need. Their exact neighbours come from
    a pass over the shards (one shard in memory at a time). Returns (nprobe,
    recall by nprobe).
    """
    ivf = _ivf(index)
    if ivf is None:
        return 0, {}
    if queries is None:
        queries = _sample(emb_dir, shards, n_queries, seed + 1)
    queries = np.ascontiguousarray(queries[:n_queries], dtype=np.float32)
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    start = 0
    for s in shards:
        _, vecs = read_embeddings(emb_dir, s["name"])
        scores = queries @ vecs.T
        kk = min(k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + start], axis=1)
        order = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
        start += s["rows"]
    recalls: dict[str, float] = {}
    nprobe = 1
    while True:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        _, got = index.search(queries, k)
        hit = [len(set(g) & set(e)) / k for g, e in zip(got, best_i, strict=True)]
        recalls[str(nprobe)] = float(np.mean(hit))
        if nprobe >= ivf.nlist:
            break
        nprobe = min(ivf.nlist, nprobe * 2)
    # The codes cap recall whatever the nprobe: aim at a share of that ceiling.
    ceiling = max(recalls.values())
    chosen = next(int(p) for p, r in recalls.items() if r >= target * ceiling)
    if ceiling < 0.9:
        log.warning("recall@%d against exact search is at most %.3f: codes too coarse?", k, ceiling)
    return chosen, recalls


def _ivf(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _sample(emb_dir: Path, shards: list[dict[str, Any]], size: int, seed: int) -> np.ndarray:
    total = sum(s["rows"] for s in shards)
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(total, size=min(size, total), replace=False))
    out, start = [], 0
    for s in shards:
        local = take[(take >= start) & (take < start + s["rows"])] - start
        if len(local):
            _, vecs = read_embeddings(emb_dir, s["name"])
            out.append(vecs[local])
        start += s["rows"]
    return np.concatenate(out)


def _add_shard(
    trained: bytes, emb_dir: str, shard: str, start: int, out_path: str
) -> tuple[int, float]:
    """Ray task: add one shard's vectors (ids = global row numbers) to a copy of the
    trained index; returns (rows, peak RSS of the task's process in MiB)."""
    import resource

    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    _, vecs = read_embeddings(emb_dir, shard)
    ids = np.arange(start, start + len(vecs), dtype=np.int64)
    index.add_with_ids(vecs, ids)
    faiss.write_index(index, out_path)
    return len(vecs), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_index(
    emb_dir: str | Path,
    out_dir: str | Path,
    icfg: Any,
    *,
    tune_queries: np.ndarray | None = None,
) -> dict[str, Any]:
    """Build, merge and save the index; returns its manifest.

    ``icfg`` is a :class:`raysys.config.IndexConfig`; ``tune_queries`` are
    held-out query vectors for tuning the default nprobe.
    """
    import ray

    from raysys.runtime import ensure_ray

    factory, train_sample, seed = icfg.factory, icfg.train_sample, icfg.seed
    ondisk, recall_target = icfg.ondisk, icfg.recall_target
    emb_dir, out = Path(emb_dir), Path(out_dir)
    emb = read_manifest(emb_dir)
    if not emb.get("complete"):
        raise UserError(
            f"{emb_dir}: encoding is not complete; run `raysys encode` again to finish it"
        )
    shards = emb["shards"]
    n, dim = sum(s["rows"] for s in shards), int(emb["dim"])
    chosen: dict[str, Any] = {}
    if factory == "auto":
        factory, chosen = auto_factory(n, dim)
        log.info("index auto: %s for %d vectors of dim %d (%s)", factory, n, dim, chosen)
    metric = faiss.METRIC_INNER_PRODUCT
    try:
        index = faiss.index_factory(dim, factory, metric)
    except RuntimeError as e:
        raise ConfigError(
            f"index.factory {factory!r} is not a valid FAISS factory string: {e}"
        ) from e
    if not _supports_ids(index):
        index = faiss.IndexIDMap2(index)

    if not index.is_trained:
        ivf = _ivf(index)
        nlist = ivf.nlist if ivf is not None else 0
        size = train_sample or min(n, max(39 * nlist, 10_000))
        if size < 39 * nlist:
            log.warning(
                "training sample %d is below 39 x nlist = %d: centroids will be poor",
                size,
                39 * nlist,
            )
        sample = _sample(emb_dir, shards, size, seed)
        if ivf is not None and faiss.get_num_gpus() > 0:
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(dim, metric))
            log.info("training IVF centroids on %d GPU(s)", faiss.get_num_gpus())
        log.info("training %s on %d vectors", factory, len(sample))
        index.train(sample)
        if ivf is not None:
            ivf.clustering_index = None

    out.mkdir(parents=True, exist_ok=True)
    parts = out / "parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir()
    ensure_ray()
    trained = faiss.serialize_index(index)
    # Merge into a round-tripped copy: the parts come back from disk with the
    # concrete classes FAISS deserialises to (IndexFlatIP, not IndexFlat).
    index = faiss.deserialize_index(trained)
    trained_ref = ray.put(trained.tobytes())
    # One fresh process per shard: its memory goes back to the OS when done,
    # and its peak RSS is that shard's alone.
    add = ray.remote(num_cpus=1, max_calls=1)(_add_shard)
    starts = np.cumsum([0] + [s["rows"] for s in shards])[:-1]
    futures = [
        add.remote(trained_ref, str(emb_dir), s["name"], int(st), str(parts / f"{i:05d}.faiss"))
        for i, (s, st) in enumerate(zip(shards, starts, strict=True))
    ]
    bar = Progress("index: add", len(futures), "shards")
    pending = list(futures)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        bar.update(len(ready))
    bar.close()
    results = ray.get(futures)
    added = [r[0] for r in results]
    add_peak_mib = max(r[1] for r in results)
    part_files = [str(parts / f"{i:05d}.faiss") for i in range(len(shards))]
    use_ondisk = ondisk == "true" or (ondisk == "auto" and n > ONDISK_AUTO_THRESHOLD)
    if use_ondisk and _ivf(index) is None:
        raise ConfigError("index.ondisk=true needs an IVF index (index.factory IVF...)")
    if use_ondisk:
        from faiss.contrib.ondisk import merge_ondisk

        merge_ondisk(index, part_files, str(out / "lists.ivfdata"))
    else:
        for f in part_files:
            part = faiss.read_index(f)
            _merge(index, part)
            del part
    if index.ntotal != n:
        raise RuntimeError(f"merged index holds {index.ntotal} vectors, expected {n}")
    nprobe, recalls = tune_nprobe(
        index, emb_dir, shards, target=recall_target, seed=seed, queries=tune_queries
    )
    if recalls:
        log.info(
            "default nprobe %d: recall@10 against exact search %.3f, %.0f%% of the best (%.3f)",
            nprobe,
            recalls[str(nprobe)],
            100 * recall_target,
            max(recalls.values()),
        )
    faiss.write_index(index, str(out / INDEX_FILE))
    shutil.rmtree(parts)
    ids = [i for s in shards for i in _read_ids(emb_dir, s["name"])]
    pq.write_table(pa.table({"id": ids}), out / IDS_FILE)
    manifest = {
        "representation": "dense",
        "contract": emb["contract"],
        "factory": factory,
        "auto": chosen,
        "count": n,
        "dim": dim,
        "metric": "inner_product",
        "nprobe": nprobe,
        "nprobe_recall_at_10": recalls,
        "nprobe_tuned_on": "held-out queries" if tune_queries is not None else "corpus vectors",
        "ondisk": use_ondisk,
        "shard_rows": [int(a) for a in added],
        "add_task_peak_rss_mib": round(add_peak_mib, 1),
        "embeddings": str(emb_dir.resolve()),
        "corpus": emb["corpus"],
    }
    write_manifest(out, manifest)
    return manifest


def _read_ids(emb_dir: Path, shard: str) -> list[str]:
    """A shard's ids only (the vectors column is not read)."""
    return pq.read_table(emb_dir / shard, columns=["id"]).column("id").to_pylist()


def _supports_ids(index: faiss.Index) -> bool:
    return _ivf(index) is not None or isinstance(index, faiss.IndexIDMap)


def _merge(into: faiss.Index, part: faiss.Index) -> None:
    if isinstance(into, faiss.IndexIDMap2):
        into.merge_from(part, 0)
        return
    ivf_into, ivf_part = _ivf(into), _ivf(part)
    ivf_into.merge_from(ivf_part, 0)
    into.ntotal = ivf_into.ntotal


def load_index(index_dir: str | Path) -> tuple[faiss.Index, list[str], dict[str, Any]]:
    """(index, row-number -> id list, manifest)."""
    d = Path(index_dir)
    manifest = read_manifest(d)
    flags = faiss.IO_FLAG_MMAP if manifest.get("ondisk") else 0
    index = faiss.read_index(str(d / INDEX_FILE), flags)
    ids = pq.read_table(d / IDS_FILE).column("id").to_pylist()
    return index, ids, manifest
