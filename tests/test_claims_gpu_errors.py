"""README "A GPU that is not there" (issue #33, item 7): ``use_gpu=true`` on a
Ray cluster with no GPU ends training and query encoding in one
``raysys: error:`` line within seconds; ``RAYSYS_GPU_WAIT_S`` waits that
long for a GPU first, and returns as soon as one joins."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from raysys.cli import main
from tests.test_claims_search import write_dense


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("raysys: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("wait_s", ["0", "2"])
def test_training_with_use_gpu_and_no_gpu_is_one_line(
    ray_local, tiny_bert_dir, toy_data, tmp_path, capsys, monkeypatch, wait_s
) -> None:
    """``raysys train ... train.scaling.use_gpu=true``: the error comes before
    the data load, at once, or after ``RAYSYS_GPU_WAIT_S`` seconds."""
    monkeypatch.setenv("RAYSYS_GPU_WAIT_S", wait_s)
    t0 = time.perf_counter()
    rc = main(
        [
            "train",
            "-",
            f"model={tiny_bert_dir}",
            f"data.groups={toy_data / 'groups.jsonl'}",
            f"data.corpus={toy_data / 'corpus.jsonl'}",
            "train.scaling.use_gpu=true",
            f"train.checkpoint.storage_path={tmp_path / 'ray'}",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    took = time.perf_counter() - t0
    line = _one_error_line(capsys)
    assert rc == 2
    assert "training (train.scaling.use_gpu): use_gpu=true but the Ray cluster has no GPU" in line
    if wait_s == "0":
        assert took < 15 and "waiting" not in line, (took, line)
    else:
        assert 2 <= took < 30 and "after waiting 2 s" in line, (took, line)


@pytest.mark.slow
def test_query_encoding_with_use_gpu_and_no_gpu_is_one_line(
    ray_local, tiny_bert_dir, tmp_path, capsys
) -> None:
    """``raysys search ... encode.pool.use_gpu=true``: the query encoder's GPU
    actor is refused before it is asked for."""
    import numpy as np

    from raysys.config import load_config
    from raysys.search.retrieve import QueryEncoder

    overrides = [f"model={tiny_bert_dir}", "contract.pooling=mean"]
    cfg = load_config(None, overrides)
    embedder, _ = QueryEncoder(cfg.model.path, cfg.encoding_contract()).get()
    vecs = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    write_dense(tmp_path / "index", [f"d{i}" for i in range(5)], vecs)
    # The hand-written index carries this encoder's contract.
    manifest = tmp_path / "index" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "contract": embedder.contract.to_dict()}))
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"_id": "q1", "text": "topic w1"}\n')
    t0 = time.perf_counter()
    rc = main(
        [
            "search",
            "-",
            *overrides,
            "encode.pool.use_gpu=true",
            "--index",
            str(tmp_path / "index"),
            "--queries",
            str(queries),
            "--run",
            str(tmp_path / "run.trec"),
        ]
    )
    took = time.perf_counter() - t0
    line = _one_error_line(capsys)
    assert rc == 2 and took < 15, (rc, took)
    assert "query encoding (encode.pool.use_gpu): use_gpu=true but the Ray cluster has no GPU" in (
        line
    )
    assert not (tmp_path / "run.trec").exists()


class _GpuJoinsLater:
    """A stand-in for the ``ray`` module: a GPU node joins at the third look."""

    def __init__(self) -> None:
        self.looks = 0

    def cluster_resources(self) -> dict[str, Any]:
        self.looks += 1
        return {"CPU": 4, "GPU": 1} if self.looks >= 3 else {"CPU": 4}


def test_gpu_wait_returns_once_a_gpu_joins(monkeypatch) -> None:
    """With ``RAYSYS_GPU_WAIT_S=60`` a GPU that joins during the wait is
    used at once (polled every 2 s), not after the whole wait."""
    from raysys import runtime

    monkeypatch.setenv("RAYSYS_GPU_WAIT_S", "60")
    monkeypatch.setattr(runtime, "autoscaler_max_gpus", lambda ray: None)
    fake = _GpuJoinsLater()
    t0 = time.perf_counter()
    assert runtime.require_gpus(fake, "training") == 1.0
    assert fake.looks == 3 and time.perf_counter() - t0 < 20


def test_gpu_wait_ends_in_the_error_after_that_long(monkeypatch) -> None:
    from raysys import runtime
    from raysys.errors import GPUUnavailable, UserError

    monkeypatch.setenv("RAYSYS_GPU_WAIT_S", "1.5")
    monkeypatch.setattr(runtime, "autoscaler_max_gpus", lambda ray: None)
    fake = _GpuJoinsLater()
    fake.looks = -(10**6)  # never joins
    t0 = time.perf_counter()
    with pytest.raises(GPUUnavailable, match="after waiting 1.5 s") as e:
        runtime.require_gpus(fake, "training")
    assert 1.5 <= time.perf_counter() - t0 < 15 and isinstance(e.value, UserError)
