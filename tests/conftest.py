from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import import_or_skip, skip_or_fail

pytest_plugins = ["pytester"]  # tests/test_test_rules.py runs the guard below in a child

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"

# -- the quick subset (-m "not slow") starts no Ray and no DeepSpeed -------------------

_SLOW_HINT = "mark it @pytest.mark.slow (README: the quick subset starts no Ray, no DeepSpeed)"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A quick test that asks for ``ray_local`` is an error before Ray starts."""
    if item.get_closest_marker("slow") is None and "ray_local" in item.fixturenames:
        pytest.fail(f"{item.nodeid} uses the ray_local fixture (a Ray cluster): {_SLOW_HINT}")


@pytest.fixture(autouse=True)
def _quick_tests_start_no_ray_or_deepspeed(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test not marked slow that starts Ray (here or in a subprocess:
    Ray's session folder lands under a private ``RAY_TMPDIR``) or imports
    DeepSpeed. What an earlier slow test already started is not seen."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    ray_tmp = tempfile.mkdtemp(prefix="rq", dir="/tmp")  # short: Ray's socket paths
    old_tmp = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = ray_tmp
    had_deepspeed = "deepspeed" in sys.modules
    ray = sys.modules.get("ray")
    ray_was_up = ray is not None and ray.is_initialized()
    try:
        yield
    finally:
        if old_tmp is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmp
    started = []
    ray = sys.modules.get("ray")
    if ray is not None and not ray_was_up and ray.is_initialized():
        ray.shutdown()
        started.append("Ray (in the test process)")
    if list(Path(ray_tmp).glob("ray/session_*")):
        started.append("a Ray cluster (in a subprocess)")
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if not had_deepspeed and "deepspeed" in sys.modules:
        started.append("DeepSpeed (imported)")
    if started:
        pytest.fail(f"{request.node.nodeid} started {' and '.join(started)}: {_SLOW_HINT}")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (4 logical CPUs on the 2-core box)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from tests.helpers import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved with its (tied) LM head: the adaptation tasks' model."""
    from tests.helpers import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("models") / "tiny-lm", causal_lm=True)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from tests.helpers import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    from tests.helpers import toy_groups

    return toy_groups(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="session")
def scifact() -> Path:
    """BEIR SciFact at ``../shared/data/scifact`` (a skip, or under CI a failure)."""
    if not (SCIFACT / "corpus.jsonl").is_file():
        skip_or_fail(
            f"BEIR SciFact not found at {SCIFACT} (corpus.jsonl, queries.jsonl, qrels/): "
            "put the data set there"
        )
    return SCIFACT


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1, bucket raysys-test."""
    moto_server = import_or_skip("moto.server", "pip install 'moto[server]>=5' (in raysys[dev])")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket="raysys-test")
    yield endpoint
    server.stop()


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    """The AWS environment variables pointing at :func:`s3_server`."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
