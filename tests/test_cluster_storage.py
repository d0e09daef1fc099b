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
    # No dashboard: its fixed port may belong to another Ray on this machine.
    head = {"num_cpus": 0, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    worker = cluster.add_node(num_cpus=4)
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
    assert (
        index["factory"].startswith("IVF")
        and index["embedding_passes"] <= 2
        and index["embedding_shard_reads"]["add"] == 5
    )
    for name in ("report.md", "metrics.json", "nprobe.png", "config.json"):
        assert out.join(name).is_file(), name
    assert out.join("index", "index.faiss").is_file() and not out.join("index", "parts").exists()


def test_training_checkpoints_resume_and_export_on_s3(two_nodes, tiny_bert_dir, toy_data):
    """Ray Train keeps its checkpoints under an s3:// --out; a run resumes from
    a checkpoint URI; the export lands in the bucket and loads from there."""
    from raysys.models.embedder import load_embedder
    from raysys.train.launch import run_training

    def cfg(*extra: str):
        return load_config(
            None,
            [
                f"model={tiny_bert_dir}",
                f"data.groups={toy_data / 'groups.jsonl'}",
                f"data.corpus={toy_data / 'corpus.jsonl'}",
                "contract.pooling=mean",
                "contract.query_max_len=16",
                "contract.passage_max_len=24",
                "train.per_device_queries=4",
                "train.group_size=2",
                "train.zero_stage=2",
                "train.max_steps=4",
                "train.checkpoint.save_steps=2",
                "train.log_steps=1",
                *extra,
            ],
        )

    cut = run_training(
        cfg("train.checkpoint.run_name=cut", "train.checkpoint.stop_after=2"),
        "s3://raysys-test/train/cut",
    )
    assert cut.stopped_at == 2 and cut.model_dir is None
    assert cut.checkpoint_path and "train/cut/ray_storage" in cut.checkpoint_path
    resumed = run_training(
        cfg(
            "train.checkpoint.run_name=resumed",
            f"train.checkpoint.resume_from=s3://{cut.checkpoint_path}",
        ),
        "s3://raysys-test/train/resumed",
    )
    assert resumed.started_at == 2 and resumed.finished
    assert resumed.model_dir == "s3://raysys-test/train/resumed/model"
    out = resolve("s3://raysys-test/train/resumed")
    assert out.join("model", "raysys_contract.json").is_file()
    assert out.join("loss.png").is_file() and out.join("tensorboard").listdir()
    embedder, tok = load_embedder(resumed.model_dir)
    assert embedder.encode_texts(tok, ["a query"], "query", 1).shape[0] == 1
