"""Build a FAISS index from embedding shards, in two passes over them.

- The factory string is any FAISS ``index_factory`` string, or ``auto``: IVF-PQ
  with ``nlist`` and the PQ code size chosen from the vector count and
  dimension (the choice is logged and saved in the manifest).
- **Pass 1** draws a seeded sample: the training vectors, and the corpus
  vectors that stand in as tuning queries when no real (held-out) query
  vectors are given. The index is trained on it (a sample below 39 x nlist is
  warned about; centroid training runs on the GPU when faiss-gpu sees one).
- **Pass 2**: each shard is added in its own Ray task into a copy of the
  trained empty index (ids are global row numbers); the same task finds the
  tuning queries' exact top 10 in its shard and returns its ids, so neither
  tuning nor the id list reads the embeddings again. Parts are written next
  to the index (any storage URI) and merged: in memory (``merge_from``) or
  into on-disk inverted lists for large corpora. No step holds more than one
  shard's vectors, so peak memory is one shard plus the codes.
- **Tuning** the default nprobe has a bounded cost: nprobe doubles while
  recall@10 against exact search still gains, and never scans more than
  ``index.tune_max_scan`` of the lists.
- Saved: ``index.faiss`` (plus ``lists.ivfdata`` on disk), ``ids.parquet``
  (row number -> document id) and ``manifest.json`` (contract, factory
  string, counts, default nprobe, tuning cost, passes over the embeddings,
  and the ``device`` each step ran on).
- ``index.use_gpu``: training and each add run on GPU tasks, the index
  cloned to the GPU with the options its PQ needs (:func:`gpu_cloner_options`).
  An index GPU FAISS cannot hold runs on the CPU instead, with a warning on
  the console and the reason in the manifest's ``device``.
- FAISS is imported on first use, not at import: this module (and
  :func:`auto_factory`) loads where FAISS is missing.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from raysys.config import ConfigError
from raysys.console import Progress
from raysys.errors import UserError
from raysys.index.encode import read_embeddings
from raysys.index.faiss_lib import load_faiss
from raysys.index.manifest import read_manifest, write_manifest
from raysys.runtime import surface_user_errors
from raysys.storage import Location, local_copy, resolve

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    """``raysys.index.build.faiss``: the FAISS module, imported on first use."""
    if name == "faiss":
        return load_faiss()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
LISTS_FILE = "lists.ivfdata"
PARTS_DIR = "parts"
ONDISK_AUTO_THRESHOLD = 5_000_000
TUNE_K = 10


# Sub-quantiser counts GPU IVF-PQ supports (IVFPQ::isSupportedPQCodeLength,
# faiss/gpu/impl/IVFPQ.cu); 56, 64 and 96 only with float16 lookup tables.
GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
# ... and the dimensions per sub-quantiser its specialised code-distance
# kernel has (others take a slower matrix-multiply path).
GPU_PQ_SUBDIMS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)
# GPU IVF-PQ holds a query's lookup table (M x 2^nbits distances) in one
# thread block's shared memory (GpuIndexIVFPQ::verifyPQSettings_): at most
# cudaDeviceProp::sharedMemPerBlock, 48 KiB on every CUDA GPU (H100/H200 too).
GPU_SHARED_MEM_PER_BLOCK = 48 * 1024
# CPU: at most this many code bytes per vector (a 4096-d decoder embedding
# gets 256 B, not dim/2 = 2 KB).
CPU_MAX_PQ_M = 256


def auto_factory(n: int, dim: int, gpu: bool = False) -> tuple[str, dict[str, Any]]:
    """IVF-PQ sized from the data: nlist ~ 4 sqrt(n) (power of two, at least
    39 training points per list), PQ with ``dim/2`` sub-quantisers of 8 bits
    up to :data:`CPU_MAX_PQ_M` (fewer bits when the corpus cannot train 256
    centroids per sub-space); with ``gpu`` the largest count GPU IVF-PQ
    supports (:data:`GPU_PQ_M`) that divides ``dim``, always 8 bits (the
    only width GPU IVF-PQ takes; over 48 sub-quantisers it needs float16
    lookup tables, see :func:`gpu_cloner_options`). Tiny corpora get an
    exact ``Flat`` index."""
    if n < 1000:
        return "Flat", {"reason": f"{n} vectors: exact search is cheaper than IVF"}
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    # Two dimensions per sub-quantiser (8x smaller than float32): coarser codes
    # cost SciFact over 0.01 nDCG@10 whatever the nprobe.
    if gpu:
        m = max(m for m in GPU_PQ_M if dim % m == 0 and m <= max(1, dim // 2))
        if dim // m not in GPU_PQ_SUBDIMS:
            # Too wide for GPU codes (a 4096-d decoder embedding): an OPQ
            # rotation down to 4 dimensions per sub-quantiser first.
            m = max(x for x in GPU_PQ_M if 4 * x <= dim)
            nbits = 8  # GpuIndexIVFPQ::copyFrom: "only pq.nbits == 8 is supported"
            return f"OPQ{m}_{4 * m},IVF{nlist},PQ{m}x{nbits}np", {
                "nlist": nlist,
                "pq_m": m,
                "pq_nbits": nbits,
                "opq_dim": 4 * m,
            }
        nbits = 8  # as above; n >= 1000 is enough points for 256 centroids
    else:
        m = max(m for m in range(1, max(1, min(dim // 2, CPU_MAX_PQ_M)) + 1) if dim % m == 0)
        nbits = 8 if n >= 256 * 4 else max(4, int(math.log2(n / 4)))
    # `np`: no polysemous training (FAISS's default for IVFPQ, 17x slower to
    # train here and not used by our search).
    return f"IVF{nlist},PQ{m}x{nbits}np", {"nlist": nlist, "pq_m": m, "pq_nbits": nbits}


def exact_topk(
    queries: np.ndarray, vecs: np.ndarray, start: int, k: int = TUNE_K
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top ``k`` (scores, global row numbers) within one shard."""
    scores = queries @ vecs.T
    kk = min(k, scores.shape[1])
    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    return np.take_along_axis(scores, top, 1), top.astype(np.int64) + start


def merge_topk(
    best: tuple[np.ndarray, np.ndarray], part: tuple[np.ndarray, np.ndarray], k: int = TUNE_K
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of two per-query candidate lists."""
    cand_s = np.concatenate([best[0], part[0]], axis=1)
    cand_i = np.concatenate([best[1], part[1]], axis=1)
    order = np.argsort(-cand_s, axis=1)[:, :k]
    return np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)


def tune_nprobe(
    index: faiss.Index,
    queries: np.ndarray,
    exact: np.ndarray,
    *,
    target: float = 0.99,
    max_scan: float = 0.25,
    plateau: float = 0.002,
    k: int = TUNE_K,
) -> tuple[int, dict[str, float], dict[str, Any]]:
    """Smallest nprobe whose recall@k against the ``exact`` neighbours reaches
    ``target`` times the best recall seen (the codes cap recall whatever the
    nprobe).

    nprobe doubles from 1 and stops once recall gains at most ``plateau``, at
    recall 1, or before scanning more than ``max_scan`` of the lists: the cost
    is bounded by a few searches of ``max_scan`` of the codes. Returns
    (nprobe, recall by nprobe, how tuning went).
    """
    ivf = _ivf(index)
    if ivf is None:
        return 0, {}, {}
    faiss = load_faiss()
    t0 = time.perf_counter()
    cap = max(1, min(ivf.nlist, int(max_scan * ivf.nlist)))
    recalls: dict[str, float] = {}
    nprobe, prev, stop = 1, -1.0, "cap"
    while True:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        _, got = index.search(queries, k)
        hit = [len(set(g) & set(e)) / k for g, e in zip(got, exact, strict=True)]
        r = float(np.mean(hit))
        recalls[str(nprobe)] = r
        if r >= 1.0:
            stop = "recall 1"
            break
        if prev >= 0 and r - prev <= plateau:
            stop = "plateau"
            break
        if nprobe >= cap:
            stop = "all lists" if cap == ivf.nlist else "scan cap"
            break
        prev, nprobe = r, min(cap, nprobe * 2)
    ceiling = max(recalls.values())
    chosen = next(int(p) for p, r in recalls.items() if r >= target * ceiling)
    if ceiling < 0.9:
        log.warning("recall@%d against exact search is at most %.3f: codes too coarse?", k, ceiling)
    info = {
        "seconds": round(time.perf_counter() - t0, 3),
        "queries": len(queries),
        "stopped_by": stop,
        "max_nprobe": cap,
        "max_scan_share": round(cap / ivf.nlist, 4),
    }
    return chosen, recalls, info


def _ivf(index: faiss.Index) -> Any:
    try:
        return load_faiss().extract_index_ivf(index)
    except RuntimeError:
        return None


def _sample(emb_dir: Any, shards: list[dict[str, Any]], size: int, seed: int) -> np.ndarray:
    """``size`` vectors drawn with ``seed`` (one pass; shards with no drawn row are skipped)."""
    return _draw(emb_dir, shards, [(size, seed)])[0][0]


def _draw(
    emb_dir: Any, shards: list[dict[str, Any]], wanted: list[tuple[int, int]]
) -> tuple[list[np.ndarray], int]:
    """Seeded samples of the vectors, one per ``(size, seed)``, in one pass;
    and how many shards it read."""
    total = sum(s["rows"] for s in shards)
    picks = [
        np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
        for size, seed in wanted
    ]
    take = np.unique(np.concatenate(picks)) if picks else np.zeros(0, np.int64)
    parts: list[np.ndarray] = []  # the vectors of `take`, in its (sorted) order
    start = reads = 0
    for s in shards:
        local = take[(take >= start) & (take < start + s["rows"])]
        if len(local):
            _, vecs = read_embeddings(emb_dir, s["name"])
            parts.append(vecs[local - start])
            reads += 1
        start += s["rows"]
    found = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    samples = [found[np.searchsorted(take, p)] for p in picks]
    return samples, reads


def require_faiss_gpu(what: str) -> Any:
    """GPU resources of this process's FAISS, or a clear error (faiss-cpu,
    or no GPU visible to this worker)."""
    import socket

    from raysys.errors import GPUUnavailable
    from raysys.index.faiss_lib import faiss_distributions

    faiss = load_faiss()
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        raise GPUUnavailable(
            f"{what} on {socket.gethostname()}: index.use_gpu=true but FAISS "
            f"({', '.join(faiss_distributions()) or 'unknown build'}) sees no GPU; install "
            "raysys[gpu] (faiss-gpu-cu12) on the GPU nodes, or set index.use_gpu=false"
        )
    return faiss.StandardGpuResources()


def gpu_needs_float16_lookup(m: int, nbits: int = 8) -> bool:
    """Whether GPU IVF-PQ with ``m`` sub-quantisers of ``nbits`` needs float16
    lookup tables: a float32 table (4 B x m x 2^nbits) must fit in
    :data:`GPU_SHARED_MEM_PER_BLOCK`, so at 8 bits m > 48 (56, 64, 96) needs
    float16 (2 B: up to 96)."""
    return 4 * m * 2**nbits > GPU_SHARED_MEM_PER_BLOCK


def gpu_cloner_options(index: faiss.Index) -> Any:
    """``GpuClonerOptions`` for ``index``: float16 lookup tables (``useFloat16``)
    when its IVF-PQ needs them (:func:`gpu_needs_float16_lookup`), FAISS's
    defaults otherwise (a Flat index keeps float32 vectors)."""
    faiss = load_faiss()
    options = faiss.GpuClonerOptions()
    ivf = _ivf(index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        if isinstance(ivf, faiss.IndexIVFPQ) and gpu_needs_float16_lookup(ivf.pq.M, ivf.pq.nbits):
            options.useFloat16 = True
    return options


def _to_gpu(res: Any, index: Any) -> tuple[Any | None, str]:
    """(a GPU copy of ``index``, "") or, for an index GPU FAISS cannot hold,
    (None, FAISS's reason)."""
    faiss = load_faiss()
    try:
        return faiss.index_cpu_to_gpu(res, 0, index, gpu_cloner_options(index)), ""
    except (RuntimeError, AttributeError) as e:
        # FAISS: "Error in <function> at <file>:<line>: Error: '<check>' failed: <message>"
        why = " ".join(str(e).split()).rsplit(" failed: ", 1)[-1]
        return None, why[:400] or type(e).__name__


def train_on_gpu(untrained: bytes, sample: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """Train a serialised index on this process's GPU (a Ray task with a
    GPU, or any process that has one). Returns the trained CPU index,
    serialised, and where it trained: ``{"used": "gpu"}``, or for an index
    GPU FAISS cannot hold ``{"used": "cpu", "why": ...}`` (trained on the
    CPU, its coarse k-means on the GPU; warned about)."""
    faiss = load_faiss()
    res = require_faiss_gpu("index training")
    index = faiss.deserialize_index(np.frombuffer(untrained, dtype=np.uint8))
    gpu, why = _to_gpu(res, index)
    if gpu is not None:
        gpu.train(sample)
        return faiss.serialize_index(faiss.index_gpu_to_cpu(gpu)).tobytes(), {"used": "gpu"}
    log.warning("index training falls back to the CPU (GPU FAISS cannot hold it): %s", why)
    ivf = _ivf(index)
    if ivf is not None:
        flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
        ivf.clustering_index = faiss.index_cpu_to_gpu(res, 0, flat)
    index.train(sample)
    if ivf is not None:
        ivf.clustering_index = None
    return faiss.serialize_index(index).tobytes(), {"used": "cpu", "why": why}


def _node_id() -> str:
    """This Ray worker's node id, or ``local`` outside Ray (or without it)."""
    try:
        import ray
    except ImportError:
        return "local"
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _add_shard(
    trained: bytes,
    emb_dir: str,
    shard: str,
    start: int,
    part: str,
    queries: np.ndarray | None,
    gpu: bool = False,
) -> dict[str, Any]:
    """Ray task: read one shard once; add its vectors (ids = global row
    numbers) to a copy of the trained index (on the task's GPU with
    ``gpu``), written to ``part``; find the tuning queries' exact top k in
    it. Returns the shard's ids, the top k, the task's peak RSS (MiB), its
    node and, with ``gpu``, where the add ran (``device``: ``{"used":
    "gpu"}`` or ``{"used": "cpu", "why": ...}``)."""
    import resource

    faiss = load_faiss()
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    ids, vecs = read_embeddings(emb_dir, shard)
    row_ids = np.arange(start, start + len(vecs), dtype=np.int64)
    device: dict[str, str] | None = None
    if gpu:
        on_gpu, why = _to_gpu(require_faiss_gpu("index add task"), index)
        if on_gpu is not None:
            on_gpu.add_with_ids(vecs, row_ids)
            index = faiss.index_gpu_to_cpu(on_gpu)
            del on_gpu
            device = {"used": "gpu"}
        else:
            log.warning("index add of %s falls back to the CPU: %s", shard, why)
            device = {"used": "cpu", "why": why}
    if device is None or device["used"] == "cpu":
        index.add_with_ids(vecs, row_ids)
    resolve(part).write_bytes(faiss.serialize_index(index).tobytes())
    top = exact_topk(queries, vecs, start) if queries is not None and len(queries) else None
    return {
        "ids": pa.array(ids, pa.string()),
        "top": top,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "node": _node_id(),
        "device": device,
    }


def build_index(
    emb_dir: str | Path | Location,
    out_dir: str | Path | Location,
    icfg: Any,
    *,
    tune_queries: np.ndarray | None = None,
) -> dict[str, Any]:
    """Build, merge and save the index; returns its manifest.

    ``icfg`` is a :class:`raysys.config.IndexConfig`; ``tune_queries`` are
    held-out query vectors for tuning the default nprobe. Both folders may be
    local paths or storage URIs.
    """
    import ray

    from raysys.runtime import ensure_ray, require_gpus

    faiss = load_faiss()
    factory, seed = icfg.factory, icfg.seed
    if icfg.use_gpu:  # before any reading: fail in seconds
        ensure_ray()
        require_gpus(ray, "index (index.use_gpu)")
    emb_dir, out = resolve(emb_dir), resolve(out_dir)
    emb = read_manifest(emb_dir)
    if not emb.get("complete"):
        raise UserError(
            f"{emb_dir}: encoding is not complete; run `raysys encode` again to finish it"
        )
    shards = emb["shards"]
    n, dim = sum(s["rows"] for s in shards), int(emb["dim"])
    chosen: dict[str, Any] = {}
    if factory == "auto":
        factory, chosen = auto_factory(n, dim, gpu=icfg.use_gpu)
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
    ivf = _ivf(index)
    use_ondisk = icfg.ondisk == "true" or (icfg.ondisk == "auto" and n > ONDISK_AUTO_THRESHOLD)
    if use_ondisk and ivf is None:
        raise ConfigError("index.ondisk=true needs an IVF index (index.factory IVF...)")

    # Pass 1: the training sample and, without real queries, corpus vectors
    # as tuning queries (they sit closer to the centroids than real queries,
    # so they under-state the nprobe real queries need).
    # Shard reads, counted where they happen: at most one per shard per pass.
    reads = {"sample": 0, "add": 0}
    nlist = ivf.nlist if ivf is not None else 0
    train_size = 0
    if not index.is_trained:
        train_size = icfg.train_sample or min(n, max(39 * nlist, 10_000))
        if train_size < 39 * nlist:
            log.warning(
                "training sample %d is below 39 x nlist = %d: centroids will be poor",
                train_size,
                39 * nlist,
            )
    train_device: dict[str, str] | None = None  # where a GPU build trained
    kmeans_gpus = 0  # GPUs the CPU build's k-means ran on
    n_tune = 500 if ivf is not None and tune_queries is None else 0
    queries = None if ivf is None else tune_queries
    if train_size or n_tune:
        # Tuning queries drawn apart from the training sample (seed + 1).
        (sample, corpus_queries), reads["sample"] = _draw(
            emb_dir, shards, [(train_size, seed), (n_tune, seed + 1)]
        )
        if n_tune:
            queries = corpus_queries
        if train_size and icfg.use_gpu:
            # The whole index trains on a GPU task (a GPU node), not the driver.
            log.info("training %s on %d vectors on a GPU task", factory, len(sample))
            task = ray.remote(num_gpus=1, num_cpus=1, max_calls=1)(train_on_gpu)
            untrained = faiss.serialize_index(index).tobytes()
            with surface_user_errors():
                trained_bytes, train_device = ray.get(task.remote(untrained, sample))
            if train_device["used"] == "cpu":
                log.warning(
                    "index.use_gpu=true, but GPU FAISS cannot hold %s: it trained on the CPU "
                    "(slower; the manifest's device says why): %s",
                    factory,
                    train_device["why"],
                )
            index = faiss.deserialize_index(np.frombuffer(trained_bytes, dtype=np.uint8))
            ivf = _ivf(index)
        elif train_size:
            if ivf is not None and faiss.get_num_gpus() > 0:
                kmeans_gpus = faiss.get_num_gpus()
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(dim, metric))
                log.info("training IVF centroids on %d GPU(s)", kmeans_gpus)
            log.info("training %s on %d vectors", factory, len(sample))
            index.train(sample)
            if ivf is not None:
                ivf.clustering_index = None
        del sample
    if queries is not None:
        queries = np.ascontiguousarray(queries[:500], dtype=np.float32)
        if not len(queries):
            queries = None

    # Pass 2: add, exact neighbours of the tuning queries, ids.
    out.mkdir()
    parts = out.join(PARTS_DIR)
    parts.delete()
    ensure_ray()
    trained = faiss.serialize_index(index)
    # Merge into a round-tripped copy: the parts come back with the concrete
    # classes FAISS deserialises to (IndexFlatIP, not IndexFlat).
    index = faiss.deserialize_index(trained)
    trained_ref = ray.put(trained.tobytes())
    queries_ref = ray.put(queries)
    # One fresh process per shard: its memory goes back to the OS when done,
    # and its peak RSS is that shard's alone.
    add = ray.remote(
        num_cpus=1,
        num_gpus=icfg.gpus_per_task if icfg.use_gpu else 0,
        max_calls=1,
        resources=dict(icfg.resources) or None,
    )(_add_shard)
    starts = np.cumsum([0] + [s["rows"] for s in shards])[:-1]
    part_locs = [parts.join(f"{i:05d}.faiss") for i in range(len(shards))]
    futures = [
        add.remote(
            trained_ref,
            emb_dir.portable,
            s["name"],
            int(st),
            loc.portable,
            queries_ref,
            icfg.use_gpu,
        )
        for s, st, loc in zip(shards, starts, part_locs, strict=True)
    ]
    bar = Progress("index: add", len(futures), "shards")
    pending = list(futures)
    with surface_user_errors():
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            bar.update(len(ready))
        bar.close()
        results = ray.get(futures)
    reads["add"] = len(results)  # each add task reads its one shard once
    device = _device_record(icfg.use_gpu, train_device, [r.get("device") for r in results])
    if kmeans_gpus:
        device["kmeans_gpus"] = kmeans_gpus
    ids = pa.chunked_array([r["ids"] for r in results], pa.string())
    if len(ids) != n:
        raise RuntimeError(f"the add tasks read {len(ids)} ids, expected {n}")
    exact = None
    if queries is not None:
        exact = (
            np.full((len(queries), TUNE_K), -np.inf, np.float32),
            np.full((len(queries), TUNE_K), -1, np.int64),
        )
        for r in results:
            exact = merge_topk(exact, r["top"])

    with tempfile.TemporaryDirectory(prefix="raysys-index-") as tmp:
        stage = out.local_path or Path(tmp)
        if use_ondisk:
            from faiss.contrib.ondisk import merge_ondisk

            local_parts = local_copy(parts)
            merge_ondisk(
                index, [str(local_parts / loc.name) for loc in part_locs], str(stage / LISTS_FILE)
            )
        else:
            for loc in part_locs:
                part = faiss.deserialize_index(np.frombuffer(loc.read_bytes(), dtype=np.uint8))
                _merge(index, part)
                del part
        if index.ntotal != n:
            raise RuntimeError(f"merged index holds {index.ntotal} vectors, expected {n}")
        nprobe, recalls, tuning = (0, {}, {})
        if exact is not None:
            nprobe, recalls, tuning = tune_nprobe(
                index,
                queries,
                exact[1],
                target=icfg.recall_target,
                max_scan=icfg.tune_max_scan,
                plateau=icfg.tune_plateau,
            )
            log.info(
                "default nprobe %d: recall@10 against exact search %.3f, %.0f%% of the best (%.3f);"
                " tuning took %.1f s (%s)",
                nprobe,
                recalls[str(nprobe)],
                100 * icfg.recall_target,
                max(recalls.values()),
                tuning["seconds"],
                tuning["stopped_by"],
            )
        faiss.write_index(index, str(stage / INDEX_FILE))
        if out.is_remote:
            out.join(INDEX_FILE).upload(stage / INDEX_FILE)
            if use_ondisk:
                out.join(LISTS_FILE).upload(stage / LISTS_FILE)
    parts.delete()
    out.join(IDS_FILE).write_parquet(pa.table({"id": ids}))
    nodes: dict[str, int] = {}
    for r in results:
        nodes[r["node"]] = nodes.get(r["node"], 0) + 1
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
        "nprobe_tuned_on": ("held-out queries" if tune_queries is not None else "corpus vectors"),
        "tuning": tuning,
        "ondisk": use_ondisk,
        "embedding_shard_reads": reads,
        "embedding_passes": round(sum(reads.values()) / len(shards), 3),
        "shard_rows": [len(r["ids"]) for r in results],
        "add_task_peak_rss_mib": round(max(r["rss_mib"] for r in results), 1),
        "add_task_nodes": nodes,
        "device": device,
        "embeddings": emb_dir.portable,
        "corpus": emb["corpus"],
    }
    write_manifest(out, manifest)
    return manifest


def _device_record(
    use_gpu: bool, train: dict[str, str] | None, adds: list[dict[str, str] | None]
) -> dict[str, Any]:
    """The manifest's ``device``: what was asked for, what training and the
    add tasks ran on and, when any fell back to the CPU, FAISS's reason (a
    fallback of the adds is warned about here, one of training on arrival)."""
    if not use_gpu:
        return {"requested": "cpu", "used": "cpu"}
    ran = [a for a in adds if a]
    on_cpu = [a for a in ran if a["used"] == "cpu"]
    if on_cpu:
        log.warning(
            "index.use_gpu=true, but %d of %d shards were added on the CPU (slower; the "
            "manifest's device says why): %s",
            len(on_cpu),
            len(adds),
            on_cpu[0]["why"],
        )
    steps = ([train] if train else []) + ran
    cpu_steps = [s for s in steps if s["used"] == "cpu"]
    used = "gpu" if not cpu_steps else "cpu" if len(cpu_steps) == len(steps) else "gpu and cpu"
    record: dict[str, Any] = {
        "requested": "gpu",
        "used": used,
        "train": train["used"] if train else "none (trained already)",
        "add": {"gpu": len(ran) - len(on_cpu), "cpu": len(on_cpu)},
    }
    if cpu_steps:
        record["why"] = cpu_steps[0]["why"]
    return record


def _supports_ids(index: faiss.Index) -> bool:
    faiss = load_faiss()
    return _ivf(index) is not None or isinstance(index, faiss.IndexIDMap)


def _merge(into: faiss.Index, part: faiss.Index) -> None:
    faiss = load_faiss()
    if isinstance(into, faiss.IndexIDMap2):
        into.merge_from(part, 0)
        return
    ivf_into, ivf_part = _ivf(into), _ivf(part)
    ivf_into.merge_from(ivf_part, 0)
    into.ntotal = ivf_into.ntotal


def load_index(
    index_dir: str | Path | Location,
) -> tuple[faiss.Index, list[str], dict[str, Any]]:
    """(index, row-number -> id list, manifest). A remote index is copied to
    the local cache first (on-disk lists are memory-mapped from there)."""
    faiss = load_faiss()
    manifest = read_manifest(index_dir)
    d = local_copy(index_dir)
    # On-disk lists map lists.ivfdata themselves (found beside index.faiss).
    # IO_FLAG_MMAP is for lists stored inside index.faiss: on an on-disk
    # index the first search segfaults (faiss-cpu 1.15.1).
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if manifest.get("ondisk") else 0
    index = faiss.read_index(str(d / INDEX_FILE), flags)
    ids = resolve(d / IDS_FILE).read_parquet().column("id").to_pylist()
    return index, ids, manifest
