"""A training worker killed by its pid mid-run does not lose the run: Ray Train
(FailureConfig) restarts the worker group, it restores the latest checkpoint
and finishes at the planned step count. Checkpoints go through a pyarrow
filesystem URI (file://, the code path of s3:// and gs://)."""

import json
import os
import signal
import threading
import time

import psutil
import pytest

from raysys.config import load_config
from raysys.train.launch import run_training

pytestmark = pytest.mark.slow


def _train_worker_pids() -> list[int]:
    """Pids of this cluster's training workers: children of its raylet (other
    Ray clusters on the host are left alone)."""
    import ray

    node = ray._private.worker._global_node
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    pids = []
    for p in raylet.children(recursive=True):
        try:
            if p.cmdline()[0].startswith("ray::RayTrainWorker"):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return sorted(pids)


def _gone(proc: psutil.Process, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``proc`` to exit (a zombie counts: its
    parent, the raylet, has yet to reap it; a reused pid is another process)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_killed_worker_resumes_from_checkpoint(
    ray_local, tiny_llama_dir, toy_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("RAYSYS_TRAIN_THROTTLE_S", "1.0")
    storage = tmp_path / "storage"
    cfg = load_config(
        None,
        [
            f"model={tiny_llama_dir}",
            f"data.groups={toy_data / 'groups.jsonl'}",
            f"data.corpus={toy_data / 'corpus.jsonl'}",
            "contract.pooling=last",
            "contract.append_eos=true",
            "contract.query_max_len=16",
            "contract.passage_max_len=24",
            "train.per_device_queries=4",
            "train.group_size=4",
            "train.zero_stage=2",
            "train.max_steps=16",
            "train.checkpoint.save_steps=4",
            "train.checkpoint.max_failures=2",
            "train.checkpoint.run_name=killed",
            f"train.checkpoint.storage_path=file://{storage}",
        ],
    )
    result: dict = {}

    def run() -> None:
        try:
            result["outcome"] = run_training(cfg, tmp_path / "out")
        except BaseException as e:  # surfaced below
            result["error"] = e

    th = threading.Thread(target=run)
    th.start()
    # Wait until two checkpoints exist (steps 4 and 8: the first is surely
    # registered with the controller by then), then kill one worker.
    deadline = time.time() + 300
    killed_pid, old_pids = None, []
    while time.time() < deadline and th.is_alive():
        if len(list(storage.glob("killed/checkpoint_*"))) >= 2:
            old_pids = _train_worker_pids()
            if old_pids:
                killed_pid = old_pids[-1]
                break
        time.sleep(0.5)
    assert killed_pid is not None, "no checkpoint or no worker to kill"
    victim = psutil.Process(killed_pid)
    os.kill(killed_pid, signal.SIGKILL)
    assert _gone(victim, 30), f"worker {killed_pid} still running 30 s after SIGKILL"
    # Ray Train replaces the whole worker group: new workers, none of the old.
    new_pids: list[int] = []
    while time.time() < deadline + 300 and th.is_alive() and not new_pids:
        pids = _train_worker_pids()
        if pids and not set(pids) & set(old_pids):
            new_pids = pids
        time.sleep(0.2)
    assert new_pids, f"no new worker group replaced {old_pids}"
    th.join(timeout=600)
    assert not th.is_alive()
    assert "error" not in result, result.get("error")
    outcome = result["outcome"]
    assert outcome.finished and outcome.stopped_at == outcome.total_steps == 16
    assert outcome.started_at in (4, 8, 12), outcome.started_at  # restored, not from 0
    assert [h["step"] for h in outcome.history] == list(range(1, 17))
    assert outcome.model_dir is not None
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["stopped_at"] == 16
