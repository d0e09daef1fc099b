"""A real cluster: `ray start --head` on free ports in a temporary directory,
`ray job submit` of the quickstart pipeline (made small), wait for SUCCEEDED,
check its metrics.json, stop the cluster."""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _kill_cluster(temp_dir: str) -> None:
    """Stop only this cluster's processes (`ray stop` would stop every Ray on the host)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(temp_dir in a for a in p.info["cmdline"] or []):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()


@pytest.fixture
def head_node():
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rsj")  # short: Ray's socket paths
    gcs, dash, agent, agent_grpc, rt_env, metrics, om, nm = _free_ports(8)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        # Token auth, as on a real cluster: the job API refuses requests without it.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={gcs}",
        "--node-ip-address=127.0.0.1",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_env}",
        f"--metrics-export-port={metrics}",
        f"--object-manager-port={om}",
        f"--node-manager-port={nm}",
        "--num-cpus=4",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_job(env: dict, *args: str) -> str:
    out = subprocess.run(
        [str(BIN / "ray"), "job", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_quickstart_job_on_a_real_cluster(head_node, tmp_path):
    address, env = head_node
    data = tmp_path / "demo"
    subprocess.run(
        [str(BIN / "raysys"), "demo-data", "--size=small", "--max-pairs=600", str(data)],
        check=True,
        env=env,
    )
    out = tmp_path / "run"
    runtime_env = {
        "env_vars": {
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "RAYSYS_CACHE": os.environ.get("RAYSYS_CACHE", str(Path.home() / ".cache" / "raysys")),
        }
    }
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            f"--address={address}",
            "--working-dir=.",
            f"--runtime-env-json={json.dumps(runtime_env)}",
            "--no-wait",
            "--",
            "raysys",
            "pipeline",
            "jobs/quickstart.yaml",
            f"data={data}",
            "train.max_steps=3",
            "baseline=false",
            f"train.checkpoint.storage_path={tmp_path / 'ray_results'}",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert submit.returncode == 0, submit.stderr[-3000:]
    job_id = next(
        w.strip("'\"")
        for line in submit.stdout.splitlines()
        for w in line.split()
        if "raysubmit_" in w
    )
    deadline = time.time() + 900
    while True:
        text = _ray_job(env, "status", f"--address={address}", job_id)
        end = re.search(r"Job '\S+' (succeeded|failed|was stopped)", text)
        if end:
            break
        assert time.time() < deadline, f"job did not finish in 15 minutes: {text[-2000:]}"
        time.sleep(5)
    logs = _ray_job(env, "logs", f"--address={address}", job_id)
    assert end.group(1) == "succeeded", logs[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"nDCG@10", "MRR@10", "Recall@100", "Recall@1000"}
    assert 0.2 < metrics["nDCG@10"] <= 1.0  # the demo is easy; random would be ~0.01
    # The job's console shows the stage summaries; the workers' lines went
    # to the run's log file.
    assert "train (retrieve): 3/3 steps" in logs, logs[-3000:]
    assert "[raysys] step 3/3" in (out / "raysys.log").read_text()
