"""Storage locations: local paths and s3:// URIs behave alike, against a real
S3-compatible server (moto) on 127.0.0.1 configured only through the AWS
environment variables."""

from __future__ import annotations

import pytest

from raysys.storage import resolve


@pytest.fixture(scope="module")
def s3_server():
    moto_server = pytest.importorskip("moto.server")
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
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _roundtrip(root):
    loc = resolve(root)
    run = loc.join("run", "metrics.json")
    assert not run.exists()
    run.write_text('{"nDCG@10": 0.5}')
    run.write_text('{"nDCG@10": 0.7}')  # replaced whole
    loc.join("run", "other.txt").write_bytes(b"x")
    assert run.is_file() and run.read_text() == '{"nDCG@10": 0.7}'
    assert loc.join("run").listdir() == ["metrics.json", "other.txt"]
    assert loc.join("missing").listdir() == []
    run.delete()
    assert not run.exists()
    return loc


def test_local_paths(tmp_path):
    loc = _roundtrip(tmp_path / "out")
    assert not loc.is_remote
    assert not [p for p in (tmp_path / "out" / "run").iterdir() if ".tmp-" in p.name]


def test_s3_uri_through_the_aws_environment(aws_env):
    loc = _roundtrip("s3://raysys-test/prefix")
    assert loc.is_remote and str(loc.join("run")) == "s3://raysys-test/prefix/run"
