"""A user's bad input ends as one `raysys: error:` line naming the file (and
line), with a non-zero exit and no traceback; `--debug` shows the traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raysys.index.encode import prepare_corpus


def _raysys(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysys.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [x for x in proc.stderr.splitlines() if x.startswith("raysys: error:")]
    assert len(errors) == 1, proc.stderr
    for frag in fragments:
        assert frag in errors[0], errors[0]
    return errors[0]


def _encode(tiny_bert_dir, corpus, out, *extra):
    return _raysys(
        "encode", "-", f"model={tiny_bert_dir}", f"--corpus={corpus}", f"--out={out}", *extra
    )


def test_missing_corpus_file(tiny_bert_dir, tmp_path):
    missing = tmp_path / "nope.jsonl"
    _one_error_line(
        _encode(tiny_bert_dir, missing, tmp_path / "o"), f"no such corpus file: {missing}"
    )


def test_empty_corpus(tiny_bert_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n\n")
    _one_error_line(_encode(tiny_bert_dir, corpus, tmp_path / "o"), str(corpus), "no usable corpus")


def test_non_utf8_corpus_line_is_a_bad_line(tiny_bert_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(
        b'{"_id": "a", "text": "fine"}\n{"_id": "b", "text": "caf\xe9"}\n{"_id": "c", "text": "ok"}\n'
    )
    _one_error_line(
        _encode(tiny_bert_dir, corpus, tmp_path / "o"), f"{corpus}:2:", "not valid UTF-8"
    )
    # Under on_bad_line=skip it is counted, and the rest is kept.
    meta = prepare_corpus(corpus, tmp_path / "skip", 10, on_bad_line="skip")
    assert meta["rows"] == 2 and meta["skipped"] == {"malformed lines": 1}, meta


def test_malformed_run_file_in_evaluate(tmp_path):
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    run = tmp_path / "run.trec"
    run.write_text("q1 Q0 d1 1 0.9 x\nq1 Q0 d2 2 oops\n")
    proc = _raysys("evaluate", f"--qrels={qrels}", f"--run={run}")
    _one_error_line(proc, f"{run}:2:", "6 fields")
    run.write_text("q1 Q0 d1 1 high x\n")
    _one_error_line(_raysys("evaluate", f"--qrels={qrels}", f"--run={run}"), f"{run}:1:", "high")
    missing = tmp_path / "none.trec"
    _one_error_line(
        _raysys("evaluate", f"--qrels={qrels}", f"--run={missing}"), f"no such run file: {missing}"
    )


def test_debug_shows_the_traceback(tmp_path):
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("q1\td1\t1\n")
    proc = _raysys("--debug", "evaluate", f"--qrels={qrels}", f"--run={tmp_path / 'none.trec'}")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_config_errors_are_one_line_too(tmp_path):
    _one_error_line(_raysys("train", "-", "train.lrr=1"), "train.lrr", "train.optim.lr")
    _one_error_line(_raysys("train", str(tmp_path / "none.yaml")), "config file not found")


@pytest.mark.parametrize("verb", ["index", "search"])
def test_a_folder_that_is_not_an_output_is_named(verb, tmp_path):
    args = {
        "index": ["index", "-", f"--embeddings={tmp_path}", f"--out={tmp_path / 'i'}"],
        "search": [
            "search",
            "-",
            f"--index={tmp_path}",
            f"--queries={tmp_path / 'q.jsonl'}",
            f"--run={tmp_path / 'r'}",
        ],
    }[verb]
    (tmp_path / "q.jsonl").write_text('{"_id": "q", "text": "x"}\n')
    _one_error_line(_raysys(*args), str(tmp_path), "manifest.json")


@pytest.mark.slow
def test_a_worker_out_of_memory_is_one_line_with_a_hint(tiny_lm_dir, toy_data, tmp_path):
    """A real allocation failure in a Ray Train worker (an embedding of 2^42
    rows built there) ends as one line saying what to lower.

    2^42 x 32 floats is 512 TiB, more than a 47-bit address space holds, so
    the allocation fails at once under every ``vm.overcommit_memory`` mode; a
    smaller one (2^36 rows, 8 TiB) is granted lazily where overcommit is 1
    and the worker then thrashes instead of failing."""
    import json
    import shutil

    model = tmp_path / "huge-vocab"
    shutil.copytree(tiny_lm_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 2**42}))
    proc = _raysys(
        "train",
        "-",
        f"model={model}",
        "model.random_init=true",
        f"data.corpus={toy_data / 'corpus.jsonl'}",
        "train.task=mntp",
        "contract.bidirectional=true",
        "contract.pooling=mean",
        "train.mntp.mask_token=w0",
        "train.max_steps=1",
        "train.scaling.num_workers=1",
        f"train.checkpoint.storage_path={tmp_path / 'ray'}",
        f"--out={tmp_path / 'out'}",
    )
    _one_error_line(proc, "ran out of memory", "train.per_device_queries")


def test_out_of_memory_is_told_from_other_worker_errors():
    from ray.exceptions import OutOfMemoryError
    from ray.train import WorkerGroupError

    from raysys.train.launch import out_of_memory

    monitor = OutOfMemoryError("Task was killed due to the node running low on memory.")
    cuda = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert out_of_memory(WorkerGroupError("1 worker failed", {0: monitor}))
    assert out_of_memory(WorkerGroupError("1 worker failed", {1: cuda}))
    assert out_of_memory(MemoryError())
    assert not out_of_memory(WorkerGroupError("1 worker failed", {0: ValueError("bad shape")}))
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = ValueError("labels must be int64")
    assert not out_of_memory(wrapped)
