"""Encode, rerank and query encoding on the GPU match the CPU (fp32 within
TF32 rounding, half precision within a cosine/score tolerance); FAISS on the
GPU when faiss-gpu is installed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from raysys.contract import EncodingContract


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from tests.helpers import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("m") / "bert")


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    import random

    from raysys.data.readers import CORPUS_SCHEMA

    rng = random.Random(0)
    rows = [
        (f"d{i}", "", " ".join(f"w{rng.randrange(200)}" for _ in range(rng.randrange(3, 60))))
        for i in range(300)
    ]
    rows.sort(key=lambda r: -len(r[2]))
    path = tmp_path_factory.mktemp("shard") / "part-00000.parquet"
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table([pa.array(c) for c in zip(*rows, strict=True)], schema=CORPUS_SCHEMA), path
    )
    return path


def _encode(bert, shard, tmp_path, opts, dtype="float32"):
    from raysys.index.encode import EncodeShardActor

    contract = EncodingContract(model=str(bert), pooling="mean").to_dict()
    actor = EncodeShardActor(str(bert), contract, ["dense"], dtype, str(tmp_path), opts)
    table = actor.encode_shard(str(shard))
    col = table.column("emb").combine_chunks()
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False)).reshape(len(table), -1)


def test_encode_on_gpu_matches_cpu(bert, shard, tmp_path, device, half):
    gpu = {"use_gpu": device.type == "cuda", "micro_batch": 64, "micro_tokens": 4096}
    cpu = _encode(bert, shard, tmp_path / "cpu", {"micro_batch": 16})
    fp32 = _encode(bert, shard, tmp_path / "g32", {**gpu, "precision": "fp32"})
    assert np.abs(fp32 - cpu).max() < 5e-3  # TF32 matmuls
    lowp = _encode(bert, shard, tmp_path / "g16", {**gpu, "precision": half}, dtype="float16")
    cos = (lowp.astype(np.float32) * cpu).sum(1)
    assert cos.min() > 0.99, cos.min()


def test_rerank_on_gpu_matches_cpu(bert, tmp_path, device, half):
    from raysys.models.backbone import build_backbone, load_tokenizer
    from raysys.models.reranker import RerankContract, Reranker, Scorer, export_reranker

    torch.manual_seed(0)
    model = Reranker(build_backbone(str(bert)), RerankContract())
    export_reranker(model, model.head.state_dict(), load_tokenizer(str(bert)), tmp_path)
    ids = [[2] + [5 + (i * j) % 150 for j in range(3 + i % 40)] + [3] for i in range(200)]
    cpu = np.array(Scorer(tmp_path, "cpu", {}).score_ids(ids))
    dev = str(device)
    fp32 = np.array(Scorer(tmp_path, dev, {"micro_tokens": 2048}).score_ids(ids))
    assert np.abs(fp32 - cpu).max() < 5e-3
    opts = {"precision": half if device.type == "cuda" else "fp32", "micro_tokens": 2048}
    lowp = np.array(Scorer(tmp_path, dev, opts).score_ids(ids))
    assert np.corrcoef(lowp, cpu)[0, 1] > 0.99


def test_queries_are_encoded_on_the_gpu(bert, device):
    from raysys.search.retrieve import QueryEncodeActor, QueryEncoder

    contract = EncodingContract(model=str(bert), pooling="mean")
    actor = QueryEncodeActor(
        str(bert), contract.to_dict(), {"use_gpu": device.type == "cuda", "precision": "fp32"}
    )
    assert actor.device().startswith(device.type)
    texts = [f"topic w{i} about w{i + 1}" for i in range(50)]
    on_dev = actor.encode(texts, 16)
    on_cpu = QueryEncoder(str(bert), contract).encode(texts, 16)
    assert np.abs(on_dev - on_cpu).max() < 5e-3


def _gpu_faiss():
    """This process's FAISS, if it has GPU support and sees a GPU; else a skip
    saying what is missing (the lent GPU image has no FAISS at all)."""
    from raysys.errors import UserError
    from raysys.index.faiss_lib import load_faiss

    try:
        faiss = load_faiss()
    except UserError as e:
        pytest.skip(f"no FAISS here: {e}")
    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("this FAISS has no GPU support (faiss-cpu); pip install 'raysys[gpu]'")
    if faiss.get_num_gpus() == 0:
        pytest.skip("this FAISS (faiss-gpu) sees no GPU")
    return faiss


def test_faiss_ivfpq_on_gpu():
    """The GPU auto factory's IVF-PQ (96 sub-quantisers at 384-d) clones to
    the GPU with the build's cloner options (float16 lookup tables)."""
    faiss = _gpu_faiss()
    from raysys.index.build import auto_factory, gpu_cloner_options

    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    factory, chosen = auto_factory(len(x), 384, gpu=True)
    assert chosen["pq_m"] == 96
    cpu_index = faiss.index_factory(384, factory, faiss.METRIC_INNER_PRODUCT)
    options = gpu_cloner_options(cpu_index)
    assert options.useFloat16
    gpu_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu_index, options)
    gpu_index.train(x)
    gpu_index.add(x)
    faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", 32)
    _, ids = gpu_index.search(x[:100], 10)
    assert (ids[:, 0] == np.arange(100)).mean() > 0.8


def test_index_trains_and_adds_on_the_gpu(tmp_path):
    """train_on_gpu and a GPU add task (called here, outside Ray) run on the
    GPU, not a silent CPU fallback, and give an index as good as the CPU's."""
    faiss = _gpu_faiss()
    from benchmarks.index_memory import write_shards
    from raysys.index.build import _add_shard, auto_factory, train_on_gpu
    from raysys.index.encode import read_embeddings

    write_shards(tmp_path, 20000, 20000)
    _, x = read_embeddings(tmp_path, "part-00000.parquet")
    factory, _ = auto_factory(len(x), x.shape[1], gpu=True)
    untrained = faiss.serialize_index(
        faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ).tobytes()
    trained, device = train_on_gpu(untrained, x[:10000])
    assert device == {"used": "gpu"}
    out = _add_shard(
        trained, str(tmp_path), "part-00000.parquet", 0, str(tmp_path / "p"), x[:100], True
    )
    assert out["device"] == {"used": "gpu"}
    index = faiss.deserialize_index(np.frombuffer((tmp_path / "p").read_bytes(), dtype=np.uint8))
    assert index.ntotal == len(x) and len(out["ids"]) == len(x)
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", 32)
    _, ids = index.search(x[:100], 10)
    assert (ids[:, 0] == np.arange(100)).mean() > 0.8
