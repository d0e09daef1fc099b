"""Storage locations: local paths and s3:// URIs behave alike, against a real
S3-compatible server (moto) on 127.0.0.1 configured only through the AWS
environment variables."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from raysys.storage import Location, resolve


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


class _HalfThenFail:
    """An output stream that writes half of what it is given, then fails (a
    full disk, a killed process): what is on disk is a torn file."""

    def __init__(self, inner):
        self.inner = inner

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()

    def write(self, data):
        self.inner.write(data[: len(data) // 2])
        self.inner.flush()
        raise OSError("disk full (injected half-way through a write)")


class _TornLocalFS(pafs.LocalFileSystem):
    def open_output_stream(self, path, *args, **kwargs):
        return _HalfThenFail(super().open_output_stream(path, *args, **kwargs))


def test_an_interrupted_local_write_keeps_the_old_file_whole(tmp_path):
    """A text/bytes write that fails half-way leaves the old file as it was (a
    new one: no file), and no side file behind."""
    run = tmp_path / "run"
    resolve(run / "metrics.json").write_text('{"nDCG@10": 0.5}')

    def torn(name):
        path = str(run / name)
        return Location(_TornLocalFS(), path, path)

    with pytest.raises(OSError, match="injected"):
        torn("metrics.json").write_text('{"nDCG@10": 0.7, "MRR@10": 0.6}')
    with pytest.raises(OSError, match="injected"):
        torn("new.bin").write_bytes(b"0123456789" * 100)
    assert (run / "metrics.json").read_text() == '{"nDCG@10": 0.5}'
    assert os.listdir(run) == ["metrics.json"]


def test_s3_uri_through_the_aws_environment(aws_env):
    loc = _roundtrip("s3://raysys-test/prefix")
    assert loc.is_remote and str(loc.join("run")) == "s3://raysys-test/prefix/run"


def test_parquet_and_upload_roundtrip(aws_env, tmp_path):
    import pyarrow as pa

    loc = resolve("s3://raysys-test/pq")
    table = pa.table({"id": ["a", "b"], "x": [1, 2]})
    loc.join("t.parquet").write_parquet(table)
    assert loc.join("t.parquet").parquet_rows() == 2
    assert loc.join("t.parquet").read_parquet(columns=["id"]).column("id").to_pylist() == ["a", "b"]
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.txt").write_text("B")
    loc.join("tree").upload(src)
    assert loc.join("tree").listdir() == ["a.txt", "sub"]


def test_local_copy_of_a_model_uri_is_fetched_once_per_change(aws_env, tmp_path, monkeypatch):
    import raysys.storage as storage
    from raysys.models.hub import resolve_model

    monkeypatch.setattr(storage, "CACHE_ROOT", tmp_path / "cache")
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"v": 1}')
    uri = "s3://raysys-test/models/m"
    resolve(uri).upload(src)
    local = resolve_model(uri)
    assert (tmp_path / "cache") in Path(local).parents
    assert (Path(local) / "config.json").read_text() == '{"v": 1}'
    resolve(uri).join("config.json").write_text('{"v": 22}')  # changed: fetched again
    assert (Path(resolve_model(uri)) / "config.json").read_text() == '{"v": 22}'


def test_corpus_on_s3_is_prepared_into_s3_and_reused(aws_env):
    from raysys.data.readers import DataError
    from raysys.index.encode import prepare_corpus

    lines = [f'{{"_id": "d{i}", "title": "", "text": "passage {i}"}}' for i in range(25)]
    corpus = resolve("s3://raysys-test/data/corpus.jsonl")
    corpus.write_text("\n".join(lines + ["{not json"]) + "\n")
    with pytest.raises(DataError, match=r"s3://raysys-test/data/corpus\.jsonl:26: malformed"):
        prepare_corpus(corpus.uri, "s3://raysys-test/prep", 10)
    corpus.write_text("\n".join(lines) + "\n")
    meta = prepare_corpus(corpus.uri, "s3://raysys-test/prep", 10)
    assert meta["rows"] == 25 and [s["rows"] for s in meta["shards"]] == [10, 10, 5]
    shards = resolve("s3://raysys-test/prep/corpus")
    assert shards.join("part-00002.parquet").parquet_rows() == 5
    assert prepare_corpus(corpus.uri, "s3://raysys-test/prep", 10) == meta  # reused


def test_a_remote_out_gets_the_runs_log(aws_env, tmp_path, monkeypatch):
    import logging

    from raysys import cli

    monkeypatch.setattr(cli, "CACHE_ROOT", tmp_path / "cache" / "remote")
    with cli._session("s3://raysys-test/logs/run"):
        logging.getLogger("raysys.test").warning("hello from the run")
    log = resolve("s3://raysys-test/logs/run/raysys.log").read_text()
    assert "hello from the run" in log
