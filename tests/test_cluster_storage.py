"""Evidence 3 of #14: the pipeline on a two-node Ray cluster whose nodes share
no disk, with ``--out s3://...`` on a real S3-compatible server (moto) on
127.0.0.1. The head node has no CPUs, so every encode actor and every index
add task runs on the second node; the results equal a local-path run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysys.config import load_config
from raysys.storage import resolve

pytestmark = pytest.mark.slow


@pytest.fixture
def two_nodes(aws_env):
    """A head node with no CPUs and a worker node; Ray restored afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker = cluster.add_node(num_cpus=3)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield worker.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was_up:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)


def _config(data: Path):
    return load_config(
        None,
        [
            f"data={data}",
            "model=all-MiniLM-L6-v2",
            "stages=[encode,index,search,evaluate]",
            "contract.passage_max_len=48",
            "contract.query_max_len=24",
            "encode.shard_size=300",
            "search.topk=100",
            "search.sweep=[1,4]",
        ],
    )


def test_pipeline_on_s3_across_two_nodes_equals_a_local_run(two_nodes, tmp_path):
    from raysys.data.demo import build_demo_beir
    from raysys.pipeline import run_pipeline
    from raysys.search.runfile import read_run

    data = build_demo_beir(tmp_path / "data", max_pairs=1500)
    cfg = _config(data)
    remote = run_pipeline(cfg, "s3://raysys-test/runs/two-nodes")
    local = run_pipeline(cfg, tmp_path / "local")

    out = resolve("s3://raysys-test/runs/two-nodes")
    assert remote == local and remote["nDCG@10"] > 0.3
    assert read_run(out.join("run.trec")) == read_run(tmp_path / "local" / "run.trec")
    emb = json.loads(out.join("encode", "embeddings", "manifest.json").read_text())
    index = json.loads(out.join("index", "manifest.json").read_text())
    # Every shard was encoded, and every add task ran, on the second node.
    assert emb["nodes"] == {two_nodes: len(emb["shards"])} and len(emb["shards"]) == 5
    assert index["add_task_nodes"] == {two_nodes: 5}
    assert index["factory"].startswith("IVF") and index["embedding_passes"] == 2
    for name in ("report.md", "metrics.json", "nprobe.png", "config.json"):
        assert out.join(name).is_file(), name
    assert out.join("index", "index.faiss").is_file() and not out.join("index", "parts").exists()
