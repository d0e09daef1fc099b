"""README claims about search, each checked against an independent computation
(issue #33, item 7): ``search.drop_self_hits``, RRF in hybrid search
(``search.fusion=rrf``) and hybrid candidates as the union of the dense and
sparse candidates (``search.hybrid_candidates`` from each).

The index folders are written by hand (no Ray, no model): a FAISS ``Flat``
dense index, a sparse inverted index and a multi-vector token store in the
layouts :mod:`raysys.representations` opens; the query encoder is a stand-in
that only carries the index's contract."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysys.config import Config, load_config
from raysys.contract import EncodingContract
from raysys.search.retrieve import Searcher
from raysys.stages import search_stage

CONTRACT = EncodingContract(model="hand-written-index").to_dict()
N_DOCS, DIM, VOCAB, MV_DIM = 12, 8, 30, 4


def _write_meta(folder: Path, ids: list[str], manifest: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, pa.string())}), folder / "ids.parquet")
    (folder / "manifest.json").write_text(json.dumps({"contract": CONTRACT, **manifest}))


def write_dense(folder: Path, ids: list[str], vecs: np.ndarray) -> None:
    """A FAISS exact inner-product index (rows = positions), as ``raysys index`` saves it."""
    import faiss

    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs, np.float32))
    _write_meta(folder, ids, {"representation": "dense", "nprobe": 0, "dim": vecs.shape[1]})
    faiss.write_index(index, str(folder / "index.faiss"))


def write_sparse(folder: Path, ids: list[str], weights: np.ndarray) -> None:
    """An inverted index (term-major CSR) over a passages x vocabulary weight matrix."""
    from scipy import sparse

    buf = io.BytesIO()
    sparse.save_npz(buf, sparse.csr_matrix(weights.T.astype(np.float32)), compressed=False)
    _write_meta(folder, ids, {"representation": "sparse"})
    (folder / "postings.npz").write_bytes(buf.getvalue())


def write_multivector(folder: Path, ids: list[str], tokens: list[np.ndarray]) -> None:
    """A one-part float16 token store with its row offsets."""
    _write_meta(folder, ids, {"representation": "multivector", "parts": [{"stem": "p0"}]})
    np.save(folder / "p0.tokens.npy", np.concatenate(tokens).astype(np.float16))
    np.save(folder / "p0.offsets.npy", np.cumsum([0] + [len(t) for t in tokens]).astype(np.int64))


class FakeEncoder:
    """Stands in for :class:`raysys.search.retrieve.QueryEncoder`: the
    searcher only asks it for the contract and the representations."""

    def __init__(self, representations: tuple[str, ...] = ("dense",)) -> None:
        embedder = SimpleNamespace(
            contract=EncodingContract.from_dict(CONTRACT), representations=representations
        )
        self._got = (embedder, None)

    def get(self) -> tuple[Any, Any]:
        return self._got


def _cfg(*overrides: str) -> Config:
    return load_config(None, list(overrides))


# -- search.drop_self_hits -----------------------------------------------------


def test_drop_self_hits_drops_the_query_id_and_false_keeps_it(tmp_path: Path) -> None:
    """A query whose id is a passage id, with that passage's own vector: by
    default its top hit (itself) is dropped and the rest move up, still
    ``topk`` hits; with ``search.drop_self_hits=false`` it stays first. A
    query whose id names no passage is the same either way."""
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((N_DOCS, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"d{i}" for i in range(N_DOCS)]
    write_dense(tmp_path / "index", ids, vecs)
    qids = ["d3", "q1"]  # search_stage sorts query ids: this order
    qvecs = np.stack([vecs[3], vecs[5]])
    exact = [[ids[j] for j in np.argsort(-(vecs @ q))] for q in qvecs]
    assert exact[0][0] == "d3" and exact[1][0] == "d5"

    runs = {}
    for drop in ("true", "false"):
        cfg = _cfg("search.topk=3", f"search.drop_self_hits={drop}")
        res = search_stage(
            cfg, tmp_path / "index", {q: "" for q in qids}, FakeEncoder(), qreps=qvecs
        )
        runs[drop] = {q: list(res.run[q]) for q in qids}
        assert res.at_nprobe(0) == res.run  # re-searches (sweeps) keep the setting
    assert runs["true"]["d3"] == exact[0][1:4]
    assert runs["false"]["d3"] == exact[0][:3]
    assert runs["true"]["q1"] == runs["false"]["q1"] == exact[1][:3]


@pytest.mark.slow
def test_drop_self_hits_in_exact_search(ray_local, tmp_path: Path) -> None:
    """Mining's exact search (Ray tasks over embedding shards) follows the
    same convention."""
    from raysys.index.manifest import write_manifest
    from raysys.search.exact import exact_search

    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((N_DOCS, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"d{i}" for i in range(N_DOCS)]
    shards = []
    for s, (a, b) in enumerate([(0, 7), (7, N_DOCS)]):
        name = f"part-{s:05d}.parquet"
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs[a:b].ravel()), DIM)
        pq.write_table(pa.table({"id": ids[a:b], "emb": emb}), tmp_path / name)
        shards.append({"name": name, "rows": b - a})
    write_manifest(tmp_path, {"dim": DIM, "shards": shards, "complete": True})
    exact = [ids[j] for j in np.argsort(-(vecs @ vecs[9]))]
    assert exact[0] == "d9"
    kept = exact_search(tmp_path, ["d9"], vecs[9:10], topk=3, drop_self_hits=False)
    dropped = exact_search(tmp_path, ["d9"], vecs[9:10], topk=3)
    assert list(kept["d9"]) == exact[:3]
    assert list(dropped["d9"]) == exact[1:4]


# -- hybrid search ---------------------------------------------------------------


@pytest.fixture(scope="module")
def m3_index(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An M3-style index folder (dense at the root, ``sparse/``,
    ``multivector/``) over random passages, and one query's representations."""
    root = tmp_path_factory.mktemp("m3") / "index"
    rng = np.random.default_rng(7)
    ids = [f"p{i:02d}" for i in range(N_DOCS)]
    dense = rng.standard_normal((N_DOCS, DIM)).astype(np.float32)
    lex = np.zeros((N_DOCS, VOCAB), np.float32)
    for i in range(N_DOCS):
        lex[i, rng.choice(VOCAB, 5, replace=False)] = rng.uniform(0.1, 1.0, 5)
    tokens = [
        rng.standard_normal((int(rng.integers(2, 6)), MV_DIM)).astype(np.float16)
        for _ in range(N_DOCS)
    ]
    write_dense(root, ids, dense)
    write_sparse(root / "sparse", ids, lex)
    write_multivector(root / "multivector", ids, tokens)
    q_terms = np.sort(rng.choice(VOCAB, 18, replace=False)).astype(np.int32)
    query = {
        "dense": rng.standard_normal((1, DIM)).astype(np.float32),
        "sparse": [(q_terms, rng.uniform(0.1, 1.0, len(q_terms)).astype(np.float32))],
        "multivector": [rng.standard_normal((3, MV_DIM)).astype(np.float32)],
    }
    # Each head's exact score of every passage, computed here, not by raysys.
    q_lex = np.zeros(VOCAB, np.float32)
    q_lex[query["sparse"][0][0]] = query["sparse"][0][1]
    q_mv = query["multivector"][0]
    scores = {
        "dense": dense @ query["dense"][0],
        "sparse": lex @ q_lex,
        "multivector": np.array(
            [(q_mv @ t.astype(np.float32).T).max(axis=1).mean() for t in tokens]
        ),
    }
    return {"root": root, "ids": ids, "query": query, "scores": scores}


def _top(scores: np.ndarray, c: int) -> set[int]:
    """The ``c`` best rows; the data must leave no tie at the boundary (and
    no zero score in them: the sparse head's zeros are all tied)."""
    order = np.argsort(-scores)
    assert scores[order[c - 1]] > max(scores[order[c]], 0)
    return set(order[:c].tolist())


def _hybrid(m3: dict[str, Any], *overrides: str) -> dict[str, float]:
    cfg = _cfg("search.mode=hybrid", *overrides)
    searcher = Searcher(
        m3["root"], FakeEncoder(("dense", "sparse", "multivector")), "hybrid", cfg.search
    )
    assert searcher.modes == ["dense", "sparse", "multivector", "hybrid"]
    run = searcher.search(["q"], m3["query"], topk=N_DOCS, drop_self_hits=False)
    return run["q"]


def test_hybrid_candidates_are_the_union_of_dense_and_sparse(m3_index: dict[str, Any]) -> None:
    """``search.hybrid_candidates=3``: the dense top 3 and the sparse top 3
    (exact), one passage found only by dense and one only by sparse; asked
    for every passage, the hybrid returns exactly their union."""
    s = m3_index["scores"]
    dense, sparse = _top(s["dense"], 3), _top(s["sparse"], 3)
    assert dense - sparse and sparse - dense  # the data exercises both sides
    for fusion in ("weighted", "rrf"):
        got = _hybrid(m3_index, "search.hybrid_candidates=3", f"search.fusion={fusion}")
        assert set(got) == {m3_index["ids"][r] for r in dense | sparse}, fusion


def test_hybrid_rrf_equals_rrf_by_hand_over_each_heads_ranking(m3_index: dict[str, Any]) -> None:
    """``search.fusion=rrf``: each candidate's fused score is
    ``sum_h w_h / (rrf_k + rank_h)``, ``rank_h`` its rank (from 1) among the
    candidates by head ``h``'s exact score, with ``search.weights`` and
    ``search.rrf_k``; the hybrid's ranking is by that score."""
    s, ids = m3_index["scores"], m3_index["ids"]
    weights = {"dense": 1.0, "sparse": 0.5, "multivector": 2.0}
    rrf_k = 5
    cand = sorted(_top(s["dense"], 4) | _top(s["sparse"], 4))
    want: dict[str, float] = {ids[r]: 0.0 for r in cand}
    for head, w in weights.items():
        ranked = sorted(cand, key=lambda r: -s[head][r])
        assert len({round(float(s[head][r]), 4) for r in cand}) == len(cand)  # no ties
        for rank, r in enumerate(ranked, start=1):
            want[ids[r]] += w / (rrf_k + rank)
    got = _hybrid(
        m3_index,
        "search.hybrid_candidates=4",
        "search.fusion=rrf",
        f"search.rrf_k={rrf_k}",
        "search.weights={dense: 1.0, sparse: 0.5, multivector: 2.0}",
    )
    assert list(got) == sorted(want, key=lambda d: -want[d])
    assert got == pytest.approx(want, rel=1e-6)
    # The same candidates under the weighted sum rank differently: the test
    # tells the two fusions apart.
    weighted = _hybrid(
        m3_index,
        "search.hybrid_candidates=4",
        "search.weights={dense: 1.0, sparse: 0.5, multivector: 2.0}",
    )
    assert set(weighted) == set(got) and list(weighted) != list(got)
