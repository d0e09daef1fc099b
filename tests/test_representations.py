"""Sparse and multi-vector representations (#18): scores against hand
computations, and each index's top k against brute force over every passage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysys.index.encode import write_shard_file
from raysys.index.manifest import write_manifest
from raysys.representations import get_representation
from raysys.representations.multivector import (
    MultiVectorRepresentation,
    TokenVectors,
    batch_vectors,
    maxsim,
    maxsim_np,
)
from raysys.representations.sparse import (
    SparseRepresentation,
    TokenWeights,
    batch_terms,
    score_terms,
    terms_of,
)
from raysys.storage import resolve


def test_sparse_terms_take_the_max_over_occurrences_and_drop_zero_weights() -> None:
    ids, w = terms_of(np.array([7, 3, 7, 0, 5]), np.array([0.2, 0.5, 0.9, 0.0, 0.0]))
    assert ids.tolist() == [3, 7]
    assert w.tolist() == pytest.approx([0.5, 0.9])


def test_sparse_score_by_hand() -> None:
    # query: "cat"(4) 0.5, "sat"(9) 1.2 twice -> 1.5 max, "mat"(2) 0.3
    tq = TokenWeights(torch.tensor([[4, 9, 9, 2, 0]]), torch.tensor([[0.5, 1.2, 1.5, 0.3, 0.0]]))
    # passage: "sat" 2.0, "cat" 0.1, "dog"(11) 3.0
    tp = TokenWeights(torch.tensor([[9, 4, 11, 0]]), torch.tensor([[2.0, 0.1, 3.0, 0.0]]))
    hand = 1.5 * 2.0 + 0.5 * 0.1  # shared: sat, cat
    (q,) = batch_terms(tq)
    (p,) = batch_terms(tp)
    assert score_terms(q, p) == pytest.approx(hand)
    assert get_representation("sparse").score(q, [p, (np.zeros(0, np.int32), np.zeros(0))])[
        0
    ] == pytest.approx(hand)
    # Training side: vocabulary vectors, the same score and a gradient.
    tq.weights.requires_grad_(True)
    s = tq.vocab_vectors(16) @ tp.vocab_vectors(16).T
    assert float(s.detach()) == pytest.approx(hand)
    s.sum().backward()
    # Only the max occurrence of "sat" (1.5, not 1.2) gets a gradient.
    assert tq.weights.grad[0].tolist() == pytest.approx([0.1, 0.0, 2.0, 0.0, 0.0])


def test_maxsim_by_hand() -> None:
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])  # 3rd token masked out
    qm = torch.tensor([[1, 1, 0]])
    p = torch.tensor(
        [
            [[0.6, 0.8], [1.0, 0.0], [5.0, 5.0]],  # 3rd (padding) must not win
            [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]],
        ]
    )
    pm = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # passage 0: token 1 -> max(0.6, 1.0) = 1.0, token 2 -> max(0.8, 0) = 0.8 -> 0.9
    # passage 1: token 1 -> 0.0, token 2 -> 1.0 -> 0.5
    s = maxsim(TokenVectors(q, qm), TokenVectors(p, pm))
    assert s.tolist() == [[pytest.approx(0.9), pytest.approx(0.5)]]
    (qv,) = batch_vectors(TokenVectors(q, qm))
    ps = batch_vectors(TokenVectors(p, pm))
    assert [len(x) for x in ps] == [2, 1]
    assert maxsim_np(qv, ps).tolist() == pytest.approx([0.9, 0.5], abs=1e-3)  # float16 storage


def _write_embeddings(root, reps, rows, shard_sizes):  # noqa: ANN001, ANN202
    """An embeddings folder holding ``rows`` (per representation) in shards."""
    emb = resolve(root)
    emb.mkdir()
    shards, start = [], 0
    for i, n in enumerate(shard_sizes):
        name = f"part-{i:05d}.parquet"
        cols = {"id": [f"d{j}" for j in range(start, start + n)]}
        for r in reps:
            cols.update(r.to_columns([rows[r.name][start : start + n]], "float16"))
        import pyarrow as pa

        write_shard_file(emb, name, pa.table(cols))
        shards.append({"name": name, "rows": n})
        start += n
    write_manifest(
        emb,
        {
            "contract": {"model": "toy"},
            "representations": ["dense", *[r.name for r in reps]],
            "vocab_size": 50,
            "multivector_dim": 8,
            "corpus": {"rows": start},
            "shards": shards,
            "done": [s["name"] for s in shards],
            "complete": True,
        },
    )
    return emb


def _random_terms(rng, n, vocab=50):  # noqa: ANN001, ANN202
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 12))
        ids = rng.choice(vocab, size=k, replace=False)
        out.append(terms_of(ids, rng.random(k).astype(np.float32) + 0.01))
    return out


def _random_vectors(rng, n, dim=8):  # noqa: ANN001, ANN202
    out = []
    for _ in range(n):
        v = rng.standard_normal((int(rng.integers(1, 9)), dim)).astype(np.float32)
        out.append((v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16))
    return out


class _Cfg:
    resources: dict = {}  # noqa: RUF012


@pytest.mark.slow
def test_sparse_index_topk_equals_brute_force(ray_local, tmp_path) -> None:
    rng = np.random.default_rng(0)
    rep = SparseRepresentation()
    passages = _random_terms(rng, 230)
    # float16 storage of the weights: compare against what was stored.
    passages = [(i, w.astype(np.float16).astype(np.float32)) for i, w in passages]
    emb = _write_embeddings(tmp_path / "emb", [rep], {"sparse": passages}, [100, 100, 30])
    m = rep.build_index(emb, tmp_path / "sparse", _Cfg())
    assert m["count"] == 230 and m["nnz"] == sum(len(p[0]) for p in passages)
    index = rep.open_index(tmp_path / "sparse")
    assert index.ids == [f"d{j}" for j in range(230)]
    queries = _random_terms(rng, 40, vocab=60)  # ids 50..59: in no passage
    scores, rows = index.search(queries, 10)
    for q, srow, rrow in zip(queries, scores, rows, strict=True):
        brute = rep.score(q, passages)
        order = np.lexsort((np.arange(len(brute)), -brute))[:10]
        np.testing.assert_allclose(srow, brute[order], rtol=1e-5, atol=1e-6)
        assert list(rrow) == list(order)
    np.testing.assert_allclose(
        index.score_rows(queries[0], np.array([5, 150, 229])),
        rep.score(queries[0], [passages[5], passages[150], passages[229]]),
        rtol=1e-5,
    )


@pytest.mark.slow
def test_multivector_store_topk_equals_brute_force(ray_local, tmp_path, monkeypatch) -> None:
    import raysys.representations.multivector as mv

    monkeypatch.setattr(mv, "TOKEN_BLOCK", 37)  # several blocks per shard
    rng = np.random.default_rng(1)
    rep = MultiVectorRepresentation()
    passages = _random_vectors(rng, 150)
    emb = _write_embeddings(tmp_path / "emb", [rep], {"multivector": passages}, [64, 64, 22])
    m = rep.build_index(emb, tmp_path / "mv", _Cfg())
    tokens = sum(len(p) for p in passages)
    assert m["tokens"] == tokens and m["bytes_per_passage"] == pytest.approx(
        tokens * 16 / 150, 0.01
    )
    index = rep.open_index(tmp_path / "mv")
    # Token matrices are memory-mapped, not read into memory whole.
    assert len(index.tokens) == 3 and all(isinstance(t, np.memmap) for t in index.tokens)
    queries = [q.astype(np.float32) for q in _random_vectors(rng, 9)]
    scores, rows = index.search(queries, 7)
    for q, srow, rrow in zip(queries, scores, rows, strict=True):
        brute = rep.score(q, passages)
        order = np.lexsort((np.arange(len(brute)), -brute))[:7]
        np.testing.assert_allclose(srow, brute[order], rtol=1e-4, atol=1e-5)
        assert list(rrow) == list(order)
    np.testing.assert_allclose(
        index.score_rows(queries[0], np.array([0, 63, 64, 149])),
        rep.score(queries[0], [passages[i] for i in (0, 63, 64, 149)]),
        rtol=1e-5,
    )
