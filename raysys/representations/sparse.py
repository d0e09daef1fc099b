"""Sparse lexical weights (BGE-M3's lexical matching).

Each token of a text gets a weight ``w = ReLU(W_lex h_i)``; a term's weight in
the text is the **maximum** over its occurrences, and special tokens get none.
The score of a query against a passage is the sum, over the terms they share,
of ``w_q(t) * w_p(t)``.

- **Encode output:** per passage the sorted unique token ids and their
  weights (columns ``sparse_ids``, ``sparse_weights``).
- **Index:** an inverted index over token ids with impact scores, i.e. the
  passages x vocabulary matrix stored term-major (``scipy.sparse`` CSR of its
  transpose: one row of postings per term). Each embedding shard becomes a
  part in its own Ray task; the driver stacks the parts in shard order (rows
  are global row numbers, as in the dense index). Search is exact: the
  query's term weights times the postings, then the top k.
- **Scorer:** the same sum of products, on the CPU for search and in torch
  (over vocabulary-sized vectors, so gradients flow) for training.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

from raysys.index.manifest import read_manifest, write_manifest
from raysys.representations.base import Representation, to_host
from raysys.storage import Location, local_copy, resolve

IDS_COLUMN = "sparse_ids"
WEIGHTS_COLUMN = "sparse_weights"
POSTINGS_FILE = "postings.npz"
IDS_FILE = "ids.parquet"
PARTS_DIR = "parts"
QUERY_BLOCK = 32  # queries scored at once (a block holds QUERY_BLOCK x N scores)


@dataclass
class TokenWeights:
    """A batch's per-token lexical weights: ``ids`` and ``weights`` are
    ``(B, L)``; a weight of 0 (padding, special tokens) is no term."""

    ids: torch.Tensor
    weights: torch.Tensor

    def vocab_vectors(self, vocab_size: int) -> torch.Tensor:
        """``(B, vocab_size)``: each term's maximum weight over its occurrences
        (differentiable; weights are >= 0, so absent terms stay 0)."""
        w = self.weights.float()
        out = torch.zeros(w.shape[0], vocab_size, dtype=w.dtype, device=w.device)
        return out.scatter_reduce(1, self.ids.long(), w, reduce="amax", include_self=True)


Terms = tuple[np.ndarray, np.ndarray]
"""One text's terms: sorted unique token ids (int32) and their weights (float32)."""


def terms_of(ids: np.ndarray, weights: np.ndarray) -> Terms:
    """Unique token ids with their maximum weight, zero weights dropped."""
    keep = weights > 0
    ids, weights = ids[keep].astype(np.int64), weights[keep].astype(np.float32)
    if not len(ids):
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    uniq, inv = np.unique(ids, return_inverse=True)
    best = np.zeros(len(uniq), np.float32)
    np.maximum.at(best, inv, weights)
    return uniq.astype(np.int32), best


def batch_terms(tw: TokenWeights) -> list[Terms]:
    """Per row of a batch, its terms (on the CPU)."""
    return parts_terms([tw])


def parts_terms(parts: list[TokenWeights | list[Terms]]) -> list[Terms]:
    """Per row of every part in order, its terms. A part is a micro-batch's
    :class:`TokenWeights` (all such parts reach the host in one
    :func:`to_host` call) or a list of terms already on the host."""
    dev = [p for p in parts if isinstance(p, TokenWeights)]
    host = iter(to_host([t for p in dev for t in (p.ids.detach(), p.weights.detach().float())]))
    out: list[Terms] = []
    for part in parts:
        if not isinstance(part, TokenWeights):
            out += part
            continue
        ids, w = next(host).numpy(), next(host).numpy()
        out += [terms_of(i, x) for i, x in zip(ids, w, strict=True)]
    return out


def score_terms(query: Terms, passage: Terms) -> float:
    """Sum over shared terms of the query's and the passage's weights."""
    qi, qw = query
    pi, pw = passage
    _, a, b = np.intersect1d(qi, pi, assume_unique=True, return_indices=True)
    return float(np.dot(qw[a].astype(np.float64), pw[b].astype(np.float64)))


def terms_matrix(rows: list[Terms], vocab_size: int) -> Any:
    """``(len(rows), vocab_size)`` CSR of term weights (ids >= vocab_size,
    which no passage has, are dropped)."""
    from scipy import sparse

    indptr = np.zeros(len(rows) + 1, np.int64)
    idx, val = [], []
    for i, (ti, tw) in enumerate(rows):
        keep = ti < vocab_size
        idx.append(ti[keep])
        val.append(tw[keep])
        indptr[i + 1] = indptr[i] + int(keep.sum())
    cat_i = np.concatenate(idx) if idx else np.zeros(0, np.int32)
    cat_v = np.concatenate(val) if val else np.zeros(0, np.float32)
    return sparse.csr_matrix((cat_v, cat_i, indptr), shape=(len(rows), vocab_size))


def read_terms(emb_dir: str | Path | Location, shard: str) -> tuple[list[str], list[Terms]]:
    """(ids, terms per passage) of one embedding shard."""
    t = resolve(emb_dir).join(shard).read_parquet(columns=["id", IDS_COLUMN, WEIGHTS_COLUMN])
    ids_col = t.column(IDS_COLUMN).combine_chunks()
    w_col = t.column(WEIGHTS_COLUMN).combine_chunks()
    flat_i = ids_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    flat_w = w_col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    off = ids_col.offsets.to_numpy()
    terms = [(flat_i[a:b], flat_w[a:b]) for a, b in zip(off[:-1], off[1:], strict=True)]
    return t.column("id").to_pylist(), terms


def _shard_part(emb_dir: str, shard: str, part: str, vocab_size: int) -> dict[str, Any]:
    """Ray task: one shard's passages x vocabulary CSR, written to ``part``."""
    from scipy import sparse

    ids, terms = read_terms(emb_dir, shard)
    buf = io.BytesIO()
    sparse.save_npz(buf, terms_matrix(terms, vocab_size), compressed=False)
    resolve(part).write_bytes(buf.getvalue())
    return {"ids": pa.array(ids, pa.string()), "nnz": int(sum(len(t[0]) for t in terms))}


class SparseIndex:
    """A loaded inverted index (term-major CSR) with its ids and manifest."""

    def __init__(self, index_dir: str | Path | Location) -> None:
        from scipy import sparse

        self.manifest = read_manifest(index_dir)
        d = local_copy(index_dir)
        self.postings = sparse.load_npz(str(d / POSTINGS_FILE)).tocsr()  # (V, N)
        self.ids: list[str] = resolve(d / IDS_FILE).read_parquet().column("id").to_pylist()
        self.vocab_size = int(self.postings.shape[0])

    def scores(self, queries: list[Terms]) -> np.ndarray:
        """``(len(queries), N)`` exact scores against every passage."""
        q = terms_matrix(queries, self.vocab_size)
        return np.asarray((q @ self.postings).todense(), dtype=np.float32)

    def search(
        self, queries: list[Terms], k: int, nprobe: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.ids)
        k = min(k, n)
        out_s = np.full((len(queries), k), -np.inf, np.float32)
        out_r = np.full((len(queries), k), -1, np.int64)
        for i in range(0, len(queries), QUERY_BLOCK):
            s = self.scores(queries[i : i + QUERY_BLOCK])
            top = (
                np.argpartition(-s, k - 1, axis=1)[:, :k]
                if k < n
                else np.tile(np.arange(n), (len(s), 1))
            )
            ts = np.take_along_axis(s, top, 1)
            order = np.lexsort((top, -ts), axis=1)
            out_s[i : i + len(s)] = np.take_along_axis(ts, order, 1)
            out_r[i : i + len(s)] = np.take_along_axis(top, order, 1)
        return out_s, out_r

    def score_rows(self, query: Terms, rows: np.ndarray) -> np.ndarray:
        """Exact scores of one query against the given rows."""
        return self.scores([query])[0][np.asarray(rows, np.int64)]

    def sweep_points(self, candidates: list[int]) -> list[int]:
        return []


class SparseRepresentation(Representation):
    name: ClassVar[str] = "sparse"

    def collect(self, output: Any, dtype: str) -> TokenWeights:
        """The micro-batch's token ids and weights, left on the device."""
        return TokenWeights(output.ids.detach(), output.weights.detach())

    def flush(self, parts: list[Any]) -> list[Any]:
        """One host list of the rows so far (``combine`` accepts it as a part)."""
        return [self.combine(parts)]

    def combine(self, parts: list[Any]) -> list[Terms]:
        return parts_terms(parts)

    def to_columns(self, parts: list[Any], dtype: str) -> dict[str, pa.Array]:
        rows = self.combine(parts)
        wtype = pa.float16() if dtype == "float16" else pa.float32()
        offsets = pa.array(np.cumsum([0] + [len(t[0]) for t in rows]), pa.int32())
        flat_i = np.concatenate([t[0] for t in rows]) if rows else np.zeros(0, np.int32)
        flat_w = np.concatenate([t[1] for t in rows]) if rows else np.zeros(0, np.float32)
        return {
            IDS_COLUMN: pa.ListArray.from_arrays(offsets, pa.array(flat_i, pa.int32())),
            WEIGHTS_COLUMN: pa.ListArray.from_arrays(offsets, pa.array(flat_w).cast(wtype)),
        }

    def build_index(
        self,
        emb_dir: str | Path | Location,
        out_dir: str | Path | Location,
        icfg: Any,
        tune_queries: Any = None,
    ) -> dict[str, Any]:
        """Parts shard by shard in Ray tasks, stacked in shard order."""
        from scipy import sparse

        t0 = time.perf_counter()
        emb_dir, out = resolve(emb_dir), resolve(out_dir)
        emb = self.embedding_manifest(emb_dir)
        vocab, shards = int(emb["vocab_size"]), emb["shards"]
        parts = out.join(PARTS_DIR)
        names = [parts.join(f"{i:05d}.npz") for i in range(len(shards))]
        results = self.map_shards(
            emb_dir, emb, icfg, _shard_part, lambda i: (names[i].portable, vocab), "sparse index"
        )
        mats = [sparse.load_npz(io.BytesIO(p.read_bytes())) for p in names]
        docs = sparse.vstack(mats, format="csr") if mats else terms_matrix([], vocab)
        postings = docs.T.tocsr()  # (V, N): one row of (passage, weight) per term
        buf = io.BytesIO()
        sparse.save_npz(buf, postings, compressed=False)
        out.join(POSTINGS_FILE).write_bytes(buf.getvalue())
        ids = (
            pa.concat_arrays([r["ids"] for r in results]) if results else pa.array([], pa.string())
        )
        out.join(IDS_FILE).write_parquet(pa.table({"id": ids}))
        parts.delete()
        n = docs.shape[0]
        manifest = {
            "representation": self.name,
            "contract": emb["contract"],
            "factory": "inverted index (exact)",
            "count": n,
            "vocab_size": vocab,
            "nnz": int(docs.nnz),
            "terms_per_passage": round(docs.nnz / max(n, 1), 2),
            "bytes": len(buf.getvalue()),
            "embedding_shard_reads": {s["name"]: 1 for s in shards},
            "embeddings": emb_dir.portable,
            "corpus": emb["corpus"],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_manifest(out, manifest)
        return manifest

    def open_index(self, index_dir: str | Path | Location) -> SparseIndex:
        return SparseIndex(index_dir)

    def score(self, query: Terms, passages: list[Terms]) -> np.ndarray:
        return np.array([score_terms(query, p) for p in passages], np.float32)
