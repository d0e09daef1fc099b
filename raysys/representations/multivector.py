"""Multi-vector token representations (BGE-M3's multi-vector head, ColBERT's
late interaction).

Every token state (the first token, CLS or BOS, excepted) is projected and
L2-normalised. A query scores a passage by MaxSim: the mean, over the
query's tokens, of each token's maximum inner product with the passage's
tokens.

- **Encode output:** per passage its token vectors in float16 (column
  ``mv``: a list of fixed-size vectors). Bytes per passage are
  ``tokens x dim x 2``; nothing is truncated or quantised.
- **Store ("index"):** each embedding shard becomes, in its own Ray task, one
  memory-mappable float16 token matrix plus row offsets. Rows are global row
  numbers in shard order, the same as the dense and sparse indexes of the
  same embeddings, so the hybrid search scores a row in each.
- **Scorer:** MaxSim, exact, over given rows (candidates) or by brute force
  over the whole store (``search``: costs one pass over every token; at scale
  use the hybrid mode, whose candidates come from the dense and sparse
  indexes). A torch version serves training: :func:`maxsim`, a block of
  passages at a time, so the ``(Bq, Np, Lq, Lp)`` similarities (8.6 GB in
  fp32 at jobs/m3_msmarco.yaml's batch) never exist at once.
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

COLUMN = "mv"
IDS_FILE = "ids.parquet"
TOKEN_BLOCK = 8192  # passage tokens scored at once in a brute-force search
QUERY_BLOCK = 64
MAXSIM_BLOCK = 1 << 26  # training MaxSim: similarities held at once (256 MiB in fp32)


@dataclass
class TokenVectors:
    """A batch's token vectors ``(B, L, d)`` (normalised) and which of them
    count, ``mask`` ``(B, L)``."""

    vectors: torch.Tensor
    mask: torch.Tensor


class _BlockMax(torch.autograd.Function):
    """Per query token, its best inner product with each passage's counted
    tokens, computed a block of passages at a time, forward and backward.

    ``flat_q`` ``(R, d)`` (query tokens), ``pv`` ``(Np, Lp, d)``, ``pad``
    ``(1, Np * Lp)`` (True: a padded passage token) -> ``(R, Np)``. Backward
    keeps only the argmax indices, and writes each block's passage gradient
    into place, so no tensor larger than a block (or than the inputs) exists.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, flat_q: torch.Tensor, pv: torch.Tensor, pad: torch.Tensor, per: int
    ) -> torch.Tensor:
        n_p, lp, d = pv.shape
        rows = flat_q.shape[0]
        top = flat_q.new_empty(rows, n_p)
        idx = torch.empty(rows, n_p, dtype=torch.long, device=flat_q.device)
        for a in range(0, n_p, per):
            n = min(per, n_p - a)
            sim = flat_q @ pv[a : a + n].reshape(n * lp, d).T  # (R, n Lp)
            # Padding never wins (sim's own lowest: under autocast it is not fp32).
            sim.masked_fill_(pad[:, a * lp : (a + n) * lp], torch.finfo(sim.dtype).min)
            best = sim.view(rows, n, lp).max(dim=-1)
            top[:, a : a + n] = best.values
            idx[:, a : a + n] = best.indices
        ctx.save_for_backward(flat_q, pv, pad, idx)
        ctx.per = per
        return top

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        flat_q, pv, pad, idx = ctx.saved_tensors
        n_p, lp, d = pv.shape
        rows = flat_q.shape[0]
        gq = torch.zeros_like(flat_q) if ctx.needs_input_grad[0] else None
        gp = torch.empty_like(pv) if ctx.needs_input_grad[1] else None
        for a in range(0, n_p, ctx.per):
            n = min(ctx.per, n_p - a)
            # The max's gradient: to the winning token only; none to padding
            # (a passage with no counted token gets none, as masked_fill's).
            g = grad.new_zeros(rows, n, lp)
            g.scatter_(2, idx[:, a : a + n, None], grad[:, a : a + n, None])
            g = g.view(rows, n * lp).masked_fill_(pad[:, a * lp : (a + n) * lp], 0)
            if gq is not None:
                gq.addmm_(g, pv[a : a + n].reshape(n * lp, d))
            if gp is not None:
                torch.mm(g.T, flat_q, out=gp[a : a + n].view(n * lp, d))
        return gq, gp, None, None


def maxsim(q: TokenVectors, p: TokenVectors, block: int = MAXSIM_BLOCK) -> torch.Tensor:
    """``(Bq, Np)`` MaxSim scores of every query against every passage (fp32).

    Passages are scored ``block // (Bq * Lq * Lp)`` at a time (at least one),
    so at most about ``block`` similarities exist at once, in the forward
    pass and in the backward pass, never the whole ``(Bq, Np, Lq, Lp)``.
    """
    qv, pv = q.vectors.float(), p.vectors.float().contiguous()
    bq, lq, d = qv.shape
    n_p, lp = pv.shape[:2]
    pad = ~p.mask.bool().reshape(1, n_p * lp)
    per = max(1, block // max(1, bq * lq * lp))
    top = _BlockMax.apply(qv.reshape(bq * lq, d), pv, pad, per).view(bq, lq, n_p)
    qm = q.mask.to(top.dtype)
    return (top * qm[:, :, None]).sum(1) / qm.sum(-1).clamp(min=1)[:, None]


def batch_vectors(tv: TokenVectors) -> list[np.ndarray]:
    """Per row of a batch, its counted token vectors (float16, on the CPU)."""
    return parts_vectors([tv])


def parts_vectors(parts: list[TokenVectors | list[np.ndarray]]) -> list[np.ndarray]:
    """Per row of every part in order, its counted token vectors (float16). A
    part is a micro-batch's :class:`TokenVectors` (all such parts reach the
    host in one :func:`to_host` call) or a list of rows already on the host."""
    dev = [p for p in parts if isinstance(p, TokenVectors)]
    host = iter(
        to_host(
            [t for p in dev for t in (p.vectors.detach().to(torch.float16), p.mask.detach().bool())]
        )
    )
    out: list[np.ndarray] = []
    for part in parts:
        if not isinstance(part, TokenVectors):
            out += part
            continue
        vec, mask = next(host).numpy(), next(host).numpy()
        out += [v[m] for v, m in zip(vec, mask, strict=True)]
    return out


def maxsim_np(query: np.ndarray, passages: list[np.ndarray]) -> np.ndarray:
    """MaxSim of one query's token vectors ``(Lq, d)`` against each passage's."""
    q = np.asarray(query, np.float32)
    out = np.empty(len(passages), np.float32)
    for i, p in enumerate(passages):
        if len(p) == 0 or len(q) == 0:
            out[i] = 0.0
            continue
        out[i] = float((q @ np.asarray(p, np.float32).T).max(axis=1).mean())
    return out


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _shard_store(emb_dir: str, shard: str, out_dir: str, stem: str) -> dict[str, Any]:
    """Ray task: one shard's token vectors as a float16 matrix
    (``<stem>.tokens.npy``) and its row offsets (``<stem>.offsets.npy``),
    plain ``.npy`` files so that search memory-maps them."""
    t = resolve(emb_dir).join(shard).read_parquet(columns=["id", COLUMN])
    col = t.column(COLUMN).combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    vecs = col.flatten()
    dim = vecs.type.list_size
    tokens = vecs.flatten().to_numpy(zero_copy_only=False).astype(np.float16).reshape(-1, dim)
    out = resolve(out_dir)
    out.join(f"{stem}.tokens.npy").write_bytes(_npy_bytes(tokens))
    out.join(f"{stem}.offsets.npy").write_bytes(_npy_bytes(offsets))
    return {"ids": pa.array(t.column("id").to_pylist(), pa.string()), "tokens": len(tokens)}


class MultiVectorIndex:
    """An opened token store: per shard a token matrix, memory-mapped (only
    the blocks being scored are read into memory), and its row offsets."""

    def __init__(self, index_dir: str | Path | Location) -> None:
        self.manifest = read_manifest(index_dir)
        d = local_copy(index_dir)
        self.ids: list[str] = resolve(d / IDS_FILE).read_parquet().column("id").to_pylist()
        self.tokens: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        self.starts: list[int] = []
        row = 0
        for part in self.manifest["parts"]:
            self.tokens.append(np.load(d / f"{part['stem']}.tokens.npy", mmap_mode="r"))
            self.offsets.append(np.load(d / f"{part['stem']}.offsets.npy"))
            self.starts.append(row)
            row += len(self.offsets[-1]) - 1

    def _locate(self, row: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.starts, row, side="right")) - 1
        return s, row - self.starts[s]

    def row_vectors(self, row: int) -> np.ndarray:
        s, r = self._locate(row)
        off = self.offsets[s]
        return np.asarray(self.tokens[s][off[r] : off[r + 1]])

    def score_rows(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact MaxSim of one query against the given rows."""
        return maxsim_np(query, [self.row_vectors(int(r)) for r in rows])

    def _block_scores(self, queries: list[np.ndarray], s: int, a: int, b: int) -> np.ndarray:
        """``(len(queries), b - a)`` MaxSim against rows ``a:b`` of shard ``s``."""
        off = self.offsets[s]
        tok = self.tokens[s][off[a] : off[b]].astype(np.float32)
        q = np.concatenate(queries).astype(np.float32)
        per_row = np.zeros((len(q), b - a), np.float32)  # a passage without tokens: 0
        has = off[a + 1 : b + 1] > off[a:b]
        if has.any():
            sim = q @ tok.T  # (sum Lq, tokens of the block)
            starts = (off[a:b][has] - off[a]).astype(np.int64)
            per_row[:, has] = np.maximum.reduceat(sim, starts, axis=1)  # max per passage
        lens = np.array([len(x) for x in queries])
        qstarts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        return np.add.reduceat(per_row, qstarts, axis=0) / np.maximum(lens, 1)[:, None]

    def search(
        self, queries: list[np.ndarray], k: int, nprobe: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force exact MaxSim top ``k`` over every row."""
        k = min(k, len(self.ids))
        out_s = np.full((len(queries), k), -np.inf, np.float32)
        out_r = np.full((len(queries), k), -1, np.int64)
        for qi in range(0, len(queries), QUERY_BLOCK):
            qs = [np.asarray(x, np.float32) for x in queries[qi : qi + QUERY_BLOCK]]
            best_s = np.full((len(qs), 0), -np.inf, np.float32)
            best_r = np.zeros((len(qs), 0), np.int64)
            for s, off in enumerate(self.offsets):
                n = len(off) - 1
                a = 0
                while a < n:
                    b = int(np.searchsorted(off, off[a] + TOKEN_BLOCK, side="right")) - 1
                    b = min(max(b, a + 1), n)
                    sc = self._block_scores(qs, s, a, b)
                    rows = np.arange(self.starts[s] + a, self.starts[s] + b)
                    cs = np.concatenate([best_s, sc], 1)
                    cr = np.concatenate([best_r, np.broadcast_to(rows, sc.shape)], 1)
                    order = np.lexsort((cr, -cs), axis=1)[:, :k]
                    best_s, best_r = (
                        np.take_along_axis(cs, order, 1),
                        np.take_along_axis(cr, order, 1),
                    )
                    a = b
            out_s[qi : qi + len(qs), : best_s.shape[1]] = best_s
            out_r[qi : qi + len(qs), : best_r.shape[1]] = best_r
        return out_s, out_r

    def sweep_points(self, candidates: list[int]) -> list[int]:
        return []


class MultiVectorRepresentation(Representation):
    name: ClassVar[str] = "multivector"

    def collect(self, output: Any, dtype: str) -> TokenVectors:
        """The micro-batch's token vectors (float16) and mask, left on the device."""
        return TokenVectors(output.vectors.detach().to(torch.float16), output.mask.detach().bool())

    def flush(self, parts: list[Any]) -> list[Any]:
        """One host list of the rows so far (``combine`` accepts it as a part)."""
        return [self.combine(parts)]

    def combine(self, parts: list[Any]) -> list[np.ndarray]:
        return parts_vectors(parts)

    def to_columns(self, parts: list[Any], dtype: str) -> dict[str, pa.Array]:
        rows = self.combine(parts)
        dim = int(rows[0].shape[1]) if rows else 0
        offsets = pa.array(np.cumsum([0] + [len(v) for v in rows]), pa.int64())
        flat = np.concatenate(rows).astype(np.float16) if rows else np.zeros((0, dim), np.float16)
        vecs = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), dim)
        return {COLUMN: pa.LargeListArray.from_arrays(offsets, vecs)}

    def build_index(
        self,
        emb_dir: str | Path | Location,
        out_dir: str | Path | Location,
        icfg: Any,
        tune_queries: Any = None,
    ) -> dict[str, Any]:
        """One token matrix per shard, each in its own Ray task."""
        t0 = time.perf_counter()
        emb_dir, out = resolve(emb_dir), resolve(out_dir)
        emb = self.embedding_manifest(emb_dir)
        stems = [f"part-{i:05d}" for i in range(len(emb["shards"]))]
        results = self.map_shards(
            emb_dir,
            emb,
            icfg,
            _shard_store,
            lambda i: (out.portable, stems[i]),
            "multi-vector store",
        )
        ids = (
            pa.concat_arrays([r["ids"] for r in results]) if results else pa.array([], pa.string())
        )
        out.join(IDS_FILE).write_parquet(pa.table({"id": ids}))
        n, tokens = len(ids), sum(r["tokens"] for r in results)
        dim = int(emb.get("multivector_dim") or 0)
        manifest = {
            "representation": self.name,
            "contract": emb["contract"],
            "factory": "token store (exact MaxSim)",
            "count": n,
            "dim": dim,
            "tokens": tokens,
            "tokens_per_passage": round(tokens / max(n, 1), 2),
            "bytes_per_passage": round(tokens * dim * 2 / max(n, 1), 1),
            "parts": [
                {"stem": stem, "rows": len(r["ids"]), "tokens": r["tokens"]}
                for stem, r in zip(stems, results, strict=True)
            ],
            "embeddings": emb_dir.portable,
            "corpus": emb["corpus"],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_manifest(out, manifest)
        return manifest

    def open_index(self, index_dir: str | Path | Location) -> MultiVectorIndex:
        return MultiVectorIndex(index_dir)

    def score(self, query: np.ndarray, passages: list[np.ndarray]) -> np.ndarray:
        return maxsim_np(query, passages)
