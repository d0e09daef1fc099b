"""Encode -> index -> search on a tiny model: sharded build equals a single build,
contracts are enforced, bad corpus lines are reported, resume never duplicates."""

import json
import os
import signal
import subprocess
import sys
import time

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from raysys.config import IndexConfig, load_config
from raysys.contract import ContractError, EncodingContract
from raysys.data.readers import DataError
from raysys.index.build import build_index, load_index
from raysys.index.encode import EMB_DIR, encode_corpus, prepare_corpus, read_embeddings
from raysys.search.retrieve import QueryEncoder, Searcher

N_DOCS = 300


def _corpus(path, n=N_DOCS):
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for k in range(n):
            words = " ".join(f"w{int(x)}" for x in rng.integers(0, 200, size=8))
            f.write(json.dumps({"_id": f"d{k}", "title": "", "text": f"about {words}"}) + "\n")
    return path


def _cfg(model, *extra):
    return load_config(
        None,
        [
            f"model={model}",
            "contract.pooling=mean",
            "contract.passage_max_len=32",
            "encode.shard_size=64",
            "encode.pool.batch_size=32",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def encoded(ray_local, tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("enc")
    corpus = _corpus(tmp / "corpus.jsonl")
    cfg = _cfg(tiny_bert_dir)
    manifest = encode_corpus(
        corpus, tmp / "out", cfg.model.path, cfg.encoding_contract(), cfg.encode
    )
    return tmp, manifest


@pytest.mark.slow
def test_every_id_once(encoded):
    tmp, manifest = encoded
    assert manifest["complete"] and len(manifest["done"]) == 5  # 300 rows / 64
    ids = [
        i for s in manifest["shards"] for i in read_embeddings(tmp / "out" / EMB_DIR, s["name"])[0]
    ]
    assert sorted(ids) == sorted(f"d{k}" for k in range(N_DOCS))


@pytest.mark.slow
def test_sharded_add_and_merge_equals_single_build(encoded):
    tmp, manifest = encoded
    emb = tmp / "out" / EMB_DIR
    m = build_index(emb, tmp / "ivf", IndexConfig(factory="IVF8,PQ8x4", seed=0))
    sharded, ids, _ = load_index(tmp / "ivf")
    assert sharded.ntotal == N_DOCS and m["count"] == N_DOCS
    # Single process: the same trained index, all vectors added at once.
    vecs = np.concatenate([read_embeddings(emb, s["name"])[1] for s in manifest["shards"]])
    single = faiss.index_factory(vecs.shape[1], "IVF8,PQ8x4", faiss.METRIC_INNER_PRODUCT)
    from raysys.index.build import _sample

    single.train(_sample(emb, manifest["shards"], min(N_DOCS, 10_000), 0))
    single.add_with_ids(vecs, np.arange(len(vecs), dtype=np.int64))
    for idx in (sharded, single):
        faiss.ParameterSpace().set_index_parameter(idx, "nprobe", 4)
    d1, i1 = sharded.search(vecs[:50], 10)
    d2, i2 = single.search(vecs[:50], 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-6)


@pytest.mark.slow
def test_flat_search_finds_itself(encoded, tiny_bert_dir):
    tmp, _ = encoded
    build_index(tmp / "out" / EMB_DIR, tmp / "flat", IndexConfig(factory="Flat"))
    cfg = _cfg(tiny_bert_dir)
    s = Searcher(tmp / "flat", QueryEncoder(cfg.model.path, cfg.encoding_contract()))
    _, ids, _ = load_index(tmp / "flat")
    # Passage texts as queries under the passage format: each finds itself first.
    table = pq.read_table(tmp / "out" / "corpus" / "part-00000.parquet")
    model, tok = s.encoder.get()
    vecs = model.encode_texts(tok, table.column("text").to_pylist()[:20], "passage").numpy()
    run = s.search([f"q{k}" for k in range(20)], vecs, topk=5)
    for k, doc in enumerate(table.column("id").to_pylist()[:20]):
        assert max(run[f"q{k}"], key=run[f"q{k}"].get) == doc


@pytest.mark.slow
def test_contract_mismatch_is_refused(encoded, tiny_bert_dir):
    tmp, _ = encoded
    if not (tmp / "flat").is_dir():
        build_index(tmp / "out" / EMB_DIR, tmp / "flat", IndexConfig(factory="Flat"))
    cfg = _cfg(tiny_bert_dir, "contract.pooling=cls")
    with pytest.raises(ContractError, match="pooling: index has 'mean', query encoder has 'cls'"):
        Searcher(tmp / "flat", QueryEncoder(cfg.model.path, cfg.encoding_contract()))
    other = EncodingContract.from_dict(
        {**_cfg(tiny_bert_dir).encoding_contract().to_dict(), "query_prefix": "q: "}
    )
    with pytest.raises(ContractError, match="query_prefix"):
        Searcher(tmp / "flat", QueryEncoder(cfg.model.path, other))


def test_malformed_corpus_line_is_reported(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n{"_id": "a", "text": "dup"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: malformed line"):
        prepare_corpus(p, tmp_path / "w", 10)
    meta = prepare_corpus(p, tmp_path / "w2", 10, on_bad_line="skip")
    assert meta["rows"] == 1
    assert meta["skipped"] == {"malformed lines": 1, "duplicate corpus ids": 1}


def _shard_table(ids):
    import pyarrow as pa

    from raysys.representations.dense import COLUMN

    vecs = np.arange(len(ids) * 4, dtype=np.float32).reshape(-1, 4)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), 4)
    return pa.table({"id": pa.array(ids, pa.string()), COLUMN: emb})


def _tear_parquet_writes(monkeypatch):
    """pyarrow.parquet.write_table writes half of the file, then fails."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    real = pq.write_table

    def torn(table, where, *args, filesystem=None, **kwargs):
        buf = pa.BufferOutputStream()
        real(table, buf)
        data = buf.getvalue().to_pybytes()
        with (filesystem or pafs.LocalFileSystem()).open_output_stream(str(where)) as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full (injected half-way through a Parquet write)")

    monkeypatch.setattr(pq, "write_table", torn)


def test_an_interrupted_shard_write_leaves_the_old_shard_or_none(tmp_path, monkeypatch):
    """A shard write that fails half-way leaves no part-00000.parquet (nor a
    side file a reader or a resume could take for a shard), and an older,
    complete shard at that path reads back whole."""
    from raysys.index.encode import write_shard_file

    old = _shard_table([f"d{k}" for k in range(50)])
    new = _shard_table([f"e{k}" for k in range(80)])
    fresh, emb = tmp_path / "fresh", tmp_path / "emb"
    fresh.mkdir()
    emb.mkdir()
    write_shard_file(emb, "part-00000.parquet", old)
    with monkeypatch.context() as m:
        _tear_parquet_writes(m)
        for where in (fresh, emb):
            with pytest.raises(OSError, match="injected"):
                write_shard_file(where, "part-00000.parquet", new)
    assert os.listdir(fresh) == []
    assert os.listdir(emb) == ["part-00000.parquet"]
    ids, vecs = read_embeddings(emb, "part-00000.parquet")
    assert ids == old.column("id").to_pylist()
    np.testing.assert_array_equal(vecs, np.arange(200, dtype=np.float32).reshape(50, 4))


def test_resume_records_a_written_unrecorded_shard_without_encoding_it(tmp_path, monkeypatch):
    """A run killed between an actor's shard write and the driver's manifest
    update: the rerun finds the shard whole on disk, records it and encodes
    nothing (no Ray started, no shard file rewritten)."""
    import raysys.index.encode as encode
    from raysys.index.manifest import read_manifest, write_manifest

    corpus = _corpus(tmp_path / "corpus.jsonl", n=10)
    model = tmp_path / "model"  # only fingerprinted: the encoding is faked below
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    cfg = _cfg(model, "encode.shard_size=4")
    contract = EncodingContract.from_dict({**cfg.encoding_contract().to_dict(), "dim": 4})
    out, emb = tmp_path / "out", tmp_path / "out" / EMB_DIR

    def fake_run_encode(ray, model, out, emb_dir, model_path, contract, enc, pending, manifest):
        for s in pending:  # what the actors and the driver do, without a model
            table = pq.read_table(out.join("corpus", s["name"]).path, columns=["id"])
            encode.write_shard_file(emb_dir, s["name"], _shard_table(table["id"].to_pylist()))
            manifest["done"].append(s["name"])
            manifest["dim"] = 4
            write_manifest(emb_dir, manifest)

    monkeypatch.setattr(encode, "ensure_ray", lambda: None)
    monkeypatch.setattr(encode, "_run_encode", fake_run_encode)
    first = encode_corpus(corpus, out, cfg.model.path, contract, cfg.encode)
    assert [s["rows"] for s in first["shards"]] == [4, 4, 2] and first["complete"]
    killed = {**first, "done": first["done"][:-1], "complete": False}
    write_manifest(emb, killed)
    stat = {s["name"]: os.stat(emb / s["name"]) for s in first["shards"]}

    def must_not_run(*args, **kwargs):
        raise AssertionError("resume encoded a shard that is already whole on disk")

    monkeypatch.setattr(encode, "ensure_ray", must_not_run)
    monkeypatch.setattr(encode, "_run_encode", must_not_run)
    again = encode_corpus(corpus, out, cfg.model.path, contract, cfg.encode)
    assert again["complete"] and sorted(again["done"]) == sorted(first["done"])
    assert read_manifest(emb) == again
    for name, before in stat.items():
        after = os.stat(emb / name)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name


@pytest.mark.slow
def test_killed_encode_resumes_without_duplicates(tiny_bert_dir, tmp_path):
    """Kill `raysys encode` (the whole process group) after some shards; rerun."""
    corpus = _corpus(tmp_path / "corpus.jsonl", n=2000)
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "raysys.cli",
        "encode",
        "-",
        f"model={tiny_bert_dir}",
        "contract.pooling=mean",
        "contract.passage_max_len=32",
        "encode.shard_size=100",
        "encode.pool.batch_size=20",
        "encode.pool.torch_threads=1",
        f"--corpus={corpus}",
        f"--out={out}",
    ]
    env = {**os.environ, "RAYSYS_ENCODE_THROTTLE_S": "0.2"}
    log = (tmp_path / "encode.log").open("w")
    proc = subprocess.Popen(
        args, start_new_session=True, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    manifest = out / EMB_DIR / "manifest.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if manifest.is_file() and len(json.loads(manifest.read_text())["done"]) >= 3:
            break
        if proc.poll() is not None:
            tail = (tmp_path / "encode.log").read_text()[-4000:]
            pytest.fail(f"encode ended (rc {proc.returncode}) before it could be killed:\n{tail}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = json.loads(manifest.read_text())["done"]
    assert 3 <= len(done_before) < 20
    env.pop("RAYSYS_ENCODE_THROTTLE_S")
    subprocess.run(
        args, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600
    )
    m = json.loads(manifest.read_text())
    assert m["complete"] and len(m["done"]) == 20 and set(done_before) <= set(m["done"])
    ids = [i for s in m["shards"] for i in read_embeddings(out / EMB_DIR, s["name"])[0]]
    assert len(ids) == 2000 and len(set(ids)) == 2000
    build_index(out / EMB_DIR, tmp_path / "index", IndexConfig(factory="Flat"))
    index, index_ids, _ = load_index(tmp_path / "index")
    assert index.ntotal == 2000 and sorted(index_ids) == sorted(f"d{k}" for k in range(2000))


@pytest.mark.parametrize("kind", ["fixed_list", "ray_tensor", "chunked"])
def test_vectors_column_normalised_to_fixed_size_list(kind):
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    from raysys.index.encode import _as_fixed_list

    vecs = np.arange(12, dtype=np.float32).reshape(3, 4)
    col = {
        "fixed_list": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), 4),
        "ray_tensor": ArrowTensorArray.from_numpy(vecs),
        "chunked": pa.chunked_array([ArrowTensorArray.from_numpy(vecs)]),
    }[kind]
    out = _as_fixed_list(col)
    assert pa.types.is_fixed_size_list(out.type) and out.type.list_size == 4
    np.testing.assert_array_equal(out.flatten().to_numpy().reshape(3, 4), vecs)


@pytest.mark.slow
def test_index_command_honours_recall_target(ray_local, tmp_path):
    """`raysys index ... index.recall_target=X` changes the chosen default nprobe."""
    from benchmarks.index_memory import write_shards
    from raysys.cli import main
    from raysys.index.manifest import read_manifest

    (tmp_path / "enc" / EMB_DIR).mkdir(parents=True)
    write_shards(tmp_path / "enc" / EMB_DIR, 4000, 1000)
    chosen = {}
    for target in (0.5, 1.0):
        out = tmp_path / f"index-{target}"
        rc = main(
            [
                "index",
                "-",
                "index.factory=IVF32,Flat",
                f"index.recall_target={target}",
                f"--embeddings={tmp_path / 'enc'}",
                f"--out={out}",
            ]
        )
        assert rc == 0
        m = read_manifest(out)
        chosen[target] = m["nprobe"]
        best = max(m["nprobe_recall_at_10"].values())
        assert m["nprobe_recall_at_10"][str(m["nprobe"])] >= target * best
    assert chosen[0.5] < chosen[1.0], chosen


@pytest.mark.slow
def test_leaving_the_query_encoder_block_releases_its_actor(ray_local):
    """Pipeline, mine and search hold the encoder in a with-block: its GPU actor
    (here a stand-in) is killed on the way out, on an error too."""
    import ray

    @ray.remote(num_cpus=0)
    class Holder:
        def ping(self) -> int:
            return 1

    holder = Holder.remote()
    assert ray.get(holder.ping.remote()) == 1
    with pytest.raises(RuntimeError, match="boom"), QueryEncoder("unused", None) as encoder:
        encoder._actor = holder
        raise RuntimeError("boom")
    assert encoder._actor is None
    # ray.kill is asynchronous: a call sent at once may still be served, so
    # wait (bounded) for the actor to die rather than assume it is instant.
    deadline = time.monotonic() + 60
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray.get(holder.ping.remote(), timeout=30)
            time.sleep(0.2)
