"""Encode a corpus into Parquet embedding shards with Ray Data.

1. **Prepare.** The corpus (BEIR ``corpus.jsonl``, JSONL or Parquet with
   id/title/text) is validated and split once into Parquet shards of
   ``shard_size`` rows, each sorted by text length; malformed lines stop the
   run with file and line (or are counted), duplicate ids and empty texts are
   counted and skipped. A rerun on the same source reuses the shards.
2. **Encode.** Ray Data hands each pending shard, whole, to an actor of a
   pool (1 GPU per actor when GPUs are used). The actor reads the prepared
   shard, tokenizes it, encodes it in micro-batches and writes the columns of
   every representation the model produces (:mod:`raysys.representations`;
   dense: ``emb``, a float32 or float16 vector) as one embedding shard,
   atomically, where it runs. The driver only receives a small row per shard
   (its name and row count) and records it in the manifest, so its memory
   does not grow with the corpus. Actors report rows as they go through a
   progress channel, for the bar.
3. **Resume.** A rerun skips shards already written (recorded, or complete
   on disk with the expected rows); a shard is written whole or not at all,
   so no id is ever written twice or dropped.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from raysys.console import Progress
from raysys.contract import ContractError, EncodingContract
from raysys.data.readers import CORPUS_SCHEMA, DataError, Report, iter_corpus
from raysys.index.manifest import read_manifest, write_manifest
from raysys.models.backbone import cached_tokenizer
from raysys.models.hub import resolve_model
from raysys.representations import base as rep_base
from raysys.representations import get_representation
from raysys.representations.dense import COLUMN
from raysys.runtime import ensure_ray, set_actor_threads
from raysys.storage import Location, is_uri, resolve

log = logging.getLogger(__name__)

# Fault-injection knob for tests: sleep this long in each actor call.
THROTTLE_S = float(os.environ.get("RAYSYS_ENCODE_THROTTLE_S", "0") or 0)
CORPUS_DIR = "corpus"
EMB_DIR = "embeddings"


def _source_fingerprint(src: Location, shard_size: int, max_docs: int) -> dict[str, Any]:
    info = src.info()
    if info.type != pafs.FileType.File:
        raise DataError(f"no such corpus file: {src}")
    return {
        "path": src.portable,
        "size": info.size,
        "mtime_ns": info.mtime_ns,
        "shard_size": shard_size,
        "max_docs": max_docs,
        "layout": 2,  # 2: rows sorted by text length inside each shard
    }


def prepare_corpus(
    src: str | Path | Location,
    work: str | Path | Location,
    shard_size: int,
    *,
    on_bad_line: str = "error",
    max_docs: int = 0,
) -> dict[str, Any]:
    """Validate the corpus and split it into Parquet shards under ``work/corpus``
    (both may be local paths or storage URIs)."""
    src = resolve(src)
    if src.is_dir():
        src = src.join("corpus.jsonl")
    out = resolve(work).join(CORPUS_DIR)
    meta_path = out.join("prepared.json")
    fp = _source_fingerprint(src, shard_size, max_docs)
    if meta_path.is_file():
        meta = meta_path.read_json()
        if meta.get("source") == fp:
            return meta
        log.info("corpus source changed since it was prepared; preparing again")
    for name in out.listdir():
        out.join(name).delete()
    out.mkdir()
    report = Report()
    shards: list[dict[str, Any]] = []
    buf: list[tuple[str, str, str]] = []

    def flush() -> None:
        name = f"part-{len(shards):05d}.parquet"
        # Longest first inside the shard: consecutive rows (one micro-batch)
        # then have similar lengths, so padding wastes little compute.
        buf.sort(key=lambda r: -(len(r[1]) + len(r[2])))
        cols = list(zip(*buf, strict=True))
        table = pa.table([pa.array(c, pa.string()) for c in cols], schema=CORPUS_SCHEMA)
        out.join(name).write_parquet(table)
        shards.append({"name": name, "rows": len(buf)})
        buf.clear()

    total = 0
    for row in iter_corpus(src, report, on_bad_line):
        buf.append(row)
        total += 1
        if len(buf) >= shard_size:
            flush()
        if max_docs and total >= max_docs:
            break
    if buf:
        flush()
    if total == 0:
        raise DataError(f"{src}: no usable corpus records ({report.summary()})")
    if report.counts:
        log.warning("corpus %s: %s", src, report.summary())
    meta = {"source": fp, "rows": total, "shards": shards, **report.to_dict()}
    meta_path.write_json(meta)
    return meta


class EncodeShardActor:
    """Ray Data actor: holds the model; each call encodes whole prepared
    shards and writes their embedding shards (see the module docstring)."""

    def __init__(
        self,
        model_path: str,
        contract: dict[str, Any],
        representations: list[str],
        dtype: str,
        emb_dir: str,
        opts: dict[str, Any],
        progress: Any = None,
    ) -> None:
        from raysys.models.embedder import load_embedder
        from raysys.models.inference import InferenceSettings
        from raysys.models.quantize import maybe_quantize

        set_actor_threads(opts)
        self.settings = InferenceSettings.from_opts(opts, "encode actor")
        self.settings.prepare()
        self.device = self.settings.device
        self.contract = EncodingContract.from_dict(contract)
        model_path = resolve_model(model_path)  # a URI: copied to this node once
        model, self.tok = load_embedder(
            model_path, self.device, self.contract, **self.settings.load_kwargs()
        )
        self.model = maybe_quantize(model, opts, self.device)
        self.model_path = model_path
        self.reps = [get_representation(r) for r in representations]
        self.dtype = dtype
        self.emb_dir = resolve(emb_dir)
        self.progress = progress
        self.node = _node_id()

    def _micro_batches(self, texts: list[str]) -> Any:
        """(rows, padded pinned batch) per forward pass: tokenized a chunk at
        a time, cut by the row and token budgets (rows are longest first)."""
        from raysys.models.inference import pin

        tok = cached_tokenizer(self.model_path)
        chunk = max(256, 4 * self.settings.micro_batch)
        for start in range(0, len(texts), chunk):
            ids = self.contract.token_ids(tok, texts[start : start + chunk], "passage")
            for b in self.settings.batches([len(x) for x in ids]):
                enc = EncodingContract.pad(self.tok, [ids[i] for i in b])
                yield len(b), pin(dict(enc), self.device)

    def encode_shard(self, source: str) -> pa.Table:
        """id plus the representation columns of one prepared shard.

        Tokenizing runs a few micro-batches ahead in a thread; outputs stay
        on the device (in the shard's dtype) until the shard is done, so the
        forward passes never wait for a device-to-host copy.
        """
        import torch

        from raysys.models.inference import prefetch, to_device

        shard = resolve(source).read_parquet()
        texts = [
            self.contract.format_passage(t, ti)
            for t, ti in zip(
                shard.column("text").to_pylist(), shard.column("title").to_pylist(), strict=True
            )
        ]
        outs: dict[str, list[Any]] = defaultdict(list)
        held = 0  # bytes of collected output on the device, of kinds that flush
        # Kinds whose flush copies to the host (dense keeps its small output).
        flushable = {
            r.name for r in self.reps if type(r).flush is not rep_base.Representation.flush
        }
        with torch.inference_mode(), self.settings.autocast():
            for rows, enc in prefetch(self._micro_batches(texts)):
                if THROTTLE_S:
                    time.sleep(THROTTLE_S)
                enc = to_device(enc, self.device)
                rep = self.model.represent(enc["input_ids"], enc["attention_mask"])
                for r in self.reps:
                    part = r.collect(rep[r.name], self.dtype)
                    if r.name in flushable:
                        held += rep_base.device_bytes(part)
                    outs[r.name].append(part)
                if held > rep_base.DEVICE_HOLD_BYTES:
                    for r in self.reps:
                        outs[r.name] = r.flush(outs[r.name])
                    held = 0
                if self.progress is not None:
                    self.progress.put.remote({"rows": rows})
        cols: dict[str, Any] = {"id": shard.column("id")}
        for r in self.reps:
            cols.update(r.to_columns(outs[r.name], self.dtype))
        return pa.table(cols)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, rows, dims = [], [], []
        for name, source in zip(batch["name"], batch["source"], strict=True):
            table = self.encode_shard(str(source))
            write_shard_file(self.emb_dir, str(name), table)
            names.append(str(name))
            rows.append(table.num_rows)
            dims.append(
                table.schema.field(COLUMN).type.list_size if COLUMN in table.column_names else 0
            )
        return {
            "name": np.array(names),
            "rows": np.array(rows),
            "dim": np.array(dims),
            "node": np.array([self.node] * len(names)),
        }


def _node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return ""


def encode_corpus(
    corpus: str | Path | Location,
    out_dir: str | Path | Location,
    model: str,
    contract: EncodingContract | None,
    enc: Any,
    *,
    on_bad_line: str = "error",
) -> dict[str, Any]:
    """Encode ``corpus`` into ``out_dir/embeddings``; returns the manifest.

    ``enc`` is a :class:`raysys.config.EncodeConfig`. ``model`` is a raysys
    export (its contract is used) or a Hugging Face model with ``contract``.
    ``corpus`` and ``out_dir`` may be local paths or storage URIs; with a URI
    the actors read and write the shards there, so no disk is shared.
    """
    import ray

    from raysys.models.embedder import resolve_contract

    out = resolve(out_dir)
    out.mkdir()
    model_path, contract = resolve_contract(model, contract)
    prepared = prepare_corpus(
        corpus, out, enc.shard_size, on_bad_line=on_bad_line, max_docs=enc.max_docs
    )
    emb_dir = out.join(EMB_DIR)
    emb_dir.mkdir()
    manifest = _resume_manifest(
        emb_dir, contract, prepared, enc.dtype, list(contract.representations)
    )
    if "sparse" in manifest["representations"]:
        manifest["vocab_size"] = len(cached_tokenizer(model_path))
    if "multivector" in manifest["representations"]:
        manifest["multivector_dim"] = contract.multivector_dim
    done = set(manifest["done"])
    for name in emb_dir.listdir():
        if ".tmp" in name:
            emb_dir.join(name).delete()
    pending = [s for s in prepared["shards"] if s["name"] not in done]
    if pending:
        ensure_ray()
        _run_encode(ray, model, out, emb_dir, model_path, contract, enc, pending, manifest)
    manifest["complete"] = True
    write_manifest(emb_dir, manifest)
    return manifest


def _resume_manifest(
    emb_dir: Location,
    contract: EncodingContract,
    prepared: dict[str, Any],
    dtype: str,
    representations: list[str],
) -> dict[str, Any]:
    fresh = {
        "contract": contract.to_dict(),
        "representations": representations,
        "dtype": dtype,
        "dim": None,
        "corpus": {k: prepared[k] for k in ("source", "rows", "skipped", "examples")},
        "shards": prepared["shards"],
        "done": [],
        "nodes": {},
        "complete": False,
    }
    try:
        old = read_manifest(emb_dir)
    except FileNotFoundError:
        return fresh
    if old.get("corpus", {}).get("source") != prepared["source"]:
        log.info("corpus changed: encoding all shards again")
        for name in emb_dir.listdir():
            if name.startswith("part-"):
                emb_dir.join(name).delete()
        return fresh
    if old.get("contract") != contract.to_dict() or old.get("dtype") != dtype:
        raise ContractError(
            f"{emb_dir} holds embeddings of another model/contract or dtype; "
            "use a new output folder or delete it"
        )
    old.setdefault("representations", ["dense"])  # manifests before representations
    old.setdefault("nodes", {})
    present = set(emb_dir.listdir())
    old["done"] = [n for n in old.get("done", []) if n in present]
    # An actor writes its shard (atomically) before the driver records it: a
    # run killed in between leaves complete shards that are not yet recorded.
    for s in old["shards"]:
        if s["name"] not in old["done"] and s["name"] in present:
            if emb_dir.join(s["name"]).parquet_rows() == s["rows"]:
                old["done"].append(s["name"])
    if old["done"]:
        log.info("resuming: %d of %d shards already encoded", len(old["done"]), len(old["shards"]))
    return old


def _run_encode(
    ray: Any,
    model: str,
    out: Location,
    emb_dir: Location,
    model_path: str,
    contract: EncodingContract,
    enc: Any,
    pending: list[dict[str, Any]],
    manifest: dict[str, Any],
) -> None:
    import dataclasses

    from raysys.runtime import (
        follow_progress,
        pool_strategy,
        progress_channel,
        surface_user_errors,
    )

    expected = {s["name"]: s["rows"] for s in pending}
    items = [
        {"name": s["name"], "source": out.join(CORPUS_DIR, s["name"]).portable} for s in pending
    ]
    strategy, cpus, n_actors = pool_strategy(ray, enc.pool, "encode (encode.pool.use_gpu)")
    channel = progress_channel()
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        EncodeShardActor,
        compute=ray.data.ActorPoolStrategy(**strategy),
        batch_size=1,
        batch_format="numpy",
        fn_constructor_kwargs={
            # A URI goes as it is: each node copies the model from storage.
            "model_path": model if is_uri(model) else model_path,
            "contract": contract.to_dict(),
            "representations": manifest["representations"],
            "dtype": enc.dtype,
            "emb_dir": emb_dir.portable,
            "opts": {**dataclasses.asdict(enc.pool), "actors": n_actors},
            "progress": channel,
        },
        num_cpus=cpus,
        num_gpus=enc.pool.gpus_per_actor if enc.pool.use_gpu else 0,
        **({"resources": dict(enc.pool.resources)} if enc.pool.resources else {}),
    )
    n_shards = len(manifest["shards"])
    bar = Progress("encode", sum(expected.values()), "passages")
    with surface_user_errors(), follow_progress(channel, lambda r: bar.update(r["rows"])):
        for row in ds.iter_rows():
            name, rows = str(row["name"]), int(row["rows"])
            if rows != expected[name]:
                raise RuntimeError(f"shard {name}: encoded {rows} rows, expected {expected[name]}")
            if manifest["dim"] is None and int(row["dim"]):
                manifest["dim"] = int(row["dim"])
            manifest["done"].append(name)
            node = str(row["node"])
            manifest["nodes"][node] = manifest["nodes"].get(node, 0) + 1
            write_manifest(emb_dir, manifest)
            bar.update(0, shards=f"{len(manifest['done'])}/{n_shards}")
    bar.close()
    missing = sorted(set(expected) - set(manifest["done"]))
    if missing:
        raise RuntimeError(f"encode ended with shards not written: {missing}")
    log.info(
        "encoded %d passages in %.1f s (%.0f/s)", bar.n, bar.elapsed, bar.n / max(bar.elapsed, 1e-9)
    )


def _as_fixed_list(col: pa.ChunkedArray | pa.Array) -> pa.FixedSizeListArray:
    """Vectors as a plain Arrow fixed-size list (Ray may hand back its tensor type)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        return col
    arr = (
        np.stack(col.to_numpy(zero_copy_only=False)) if col.type.num_fields == 0 else col.to_numpy()
    )
    arr = np.asarray(arr)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), arr.shape[1])


def write_shard_file(emb_dir: str | Path | Location, name: str, table: pa.Table) -> None:
    """Write one embedding shard atomically (readers see all of it or nothing)."""
    if COLUMN in table.column_names:
        # Ray may hand dense vectors back as its tensor type: store plain Arrow.
        i = table.schema.get_field_index(COLUMN)
        table = table.set_column(i, COLUMN, _as_fixed_list(table.column(COLUMN)))
    resolve(emb_dir).join(name).write_parquet(table)


def read_embeddings(emb_dir: str | Path | Location, shard: str) -> tuple[list[str], np.ndarray]:
    """(ids, float32 matrix) of one embedding shard."""
    table = resolve(emb_dir).join(shard).read_parquet(columns=["id", COLUMN])
    col = table.column(COLUMN).combine_chunks()
    dim = col.type.list_size
    vecs = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
    return table.column("id").to_pylist(), vecs
