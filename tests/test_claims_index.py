"""README claims about the index build (issue #33, item 7): nprobe tuning's
bounded cost (``index.tune_plateau``, ``index.tune_max_scan``, the manifest's
``tuning``) and ``index.ondisk`` (on-disk inverted lists search as the
in-memory merge does), locally and under an ``s3://`` ``--out``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysys.config import IndexConfig
from raysys.index.build import exact_topk, faiss, load_index, tune_nprobe

REPO = Path(__file__).resolve().parents[1]
DIM = 16
N_VEC = 2000  # in two shards: the merge joins parts


def write_random_shards(emb_dir: Path, n: int = N_VEC, shard: int = 1000, seed: int = 0) -> None:
    """Embedding shards of Gaussian vectors (no cluster structure, so recall
    keeps rising with nprobe), as ``raysys encode`` writes them."""
    from raysys.index.manifest import write_manifest

    emb_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for i, start in enumerate(range(0, n, shard)):
        rows = min(shard, n - start)
        v = rng.standard_normal((rows, DIM)).astype(np.float32)
        name = f"part-{i:05d}.parquet"
        emb = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), DIM)
        ids = pa.array([f"d{start + j}" for j in range(rows)])
        pq.write_table(pa.table({"id": ids, "emb": emb}), emb_dir / name)
        shards.append({"name": name, "rows": rows})
    write_manifest(
        emb_dir,
        {
            "contract": {"model": "synthetic"},
            "dtype": "float32",
            "dim": DIM,
            "corpus": {"rows": n, "skipped": {}},
            "shards": shards,
            "done": [s["name"] for s in shards],
            "complete": True,
        },
    )


# -- tuning: nprobe doubles from 1, stops on the plateau or the scan cap ------------


@pytest.fixture(scope="module")
def ivfpq() -> tuple[Any, np.ndarray, np.ndarray]:
    """IVF64 with coarse PQ codes over 4,000 Gaussian vectors (their recall
    tops out near 0.27), 200 queries and their exact top 10."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, DIM)).astype(np.float32)
    q = rng.standard_normal((200, DIM)).astype(np.float32)
    index = faiss.index_factory(DIM, "IVF64,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # faster than 2 threads on a shared 2-core box
    try:
        index.train(x)
        index.add(x)
    finally:
        faiss.omp_set_num_threads(threads)
    return index, q, exact_topk(q, x, 0)[1]


def _check_doubling(recalls: dict[str, float], plateau: float) -> list[float]:
    """nprobe went 1, 2, 4, ...; every gain but the last exceeded ``plateau``.
    Returns the recalls in order."""
    probes = [int(p) for p in recalls]
    assert probes == [2**i for i in range(len(probes))], probes
    r = list(recalls.values())
    assert all(b - a > plateau for a, b in zip(r[:-2], r[1:-1], strict=True)), r
    return r


def test_tuning_stops_on_the_recall_plateau(ivfpq) -> None:
    """With every list allowed, tuning stops where recall@10 gains no more
    than ``plateau`` (the codes cap it), far below nlist; a larger plateau
    stops it sooner."""
    index, q, exact = ivfpq
    stops = {}
    for plateau in (0.002, 0.05):
        _, recalls, info = tune_nprobe(index, q, exact, max_scan=1.0, plateau=plateau)
        r = _check_doubling(recalls, plateau)
        assert info["stopped_by"] == "plateau" and r[-1] - r[-2] <= plateau, (plateau, recalls)
        assert info["max_nprobe"] == 64 and max(r) < 1
        stops[plateau] = max(int(p) for p in recalls)
    assert stops[0.05] < stops[0.002] < 64, stops


def test_tuning_never_scans_more_than_max_scan(ivfpq) -> None:
    """``max_scan=0.125`` of 64 lists: nprobe stops at 8 while recall still
    gains, and the cap is recorded."""
    index, q, exact = ivfpq
    _, recalls, info = tune_nprobe(index, q, exact, max_scan=0.125, plateau=0.002)
    r = _check_doubling(recalls, 0.002)
    assert list(recalls) == ["1", "2", "4", "8"] and r[-1] - r[-2] > 0.002
    assert info["stopped_by"] == "scan cap"
    assert info["max_nprobe"] == 8 and info["max_scan_share"] == 0.125


def test_tuning_defaults_are_the_documented_ones() -> None:
    icfg = IndexConfig()
    assert (icfg.tune_plateau, icfg.tune_max_scan, icfg.ondisk) == (0.002, 0.25, "auto")


# -- index.ondisk ----------------------------------------------------------------


def test_ondisk_true_as_the_readme_writes_it() -> None:
    """``index.ondisk=true`` on the command line (YAML reads a bool) is the
    choice ``"true"``, not a config error."""
    from raysys.config import load_config

    assert load_config(None, ["index.ondisk=true"]).index.ondisk == "true"
    assert load_config(None, ["index.ondisk=false"]).index.ondisk == "false"


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory) -> dict[str, Any]:
    """The same embeddings indexed with ``index.ondisk`` false and true
    (IVF16, tuning capped at 2 of its 16 lists)."""
    from raysys.index.build import build_index

    tmp = tmp_path_factory.mktemp("ondisk")
    write_random_shards(tmp / "enc" / "embeddings")
    out = {"tmp": tmp}
    for ondisk in ("false", "true"):
        icfg = IndexConfig(factory="IVF16,Flat", ondisk=ondisk, tune_max_scan=0.125, seed=0)
        out[ondisk] = build_index(tmp / "enc" / "embeddings", tmp / ondisk, icfg)
    return out


def _search(index_dir: Any, queries: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    index, ids, _ = load_index(index_dir)
    assert len(ids) == index.ntotal == N_VEC
    got = {}
    for nprobe in (1, 4, 16):
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        got[nprobe] = index.search(queries, 10)
    return got


def _queries() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((40, DIM)).astype(np.float32)


def _assert_same(a: dict[int, Any], b: dict[int, Any]) -> None:
    for nprobe in a:
        np.testing.assert_array_equal(a[nprobe][1], b[nprobe][1])
        np.testing.assert_allclose(a[nprobe][0], b[nprobe][0], rtol=1e-6)


@pytest.mark.slow
def test_ondisk_merge_searches_as_the_in_memory_merge(built) -> None:
    """``index.ondisk=true``: the lists live in ``lists.ivfdata``, load as
    on-disk lists (memory-mapped), and every nprobe returns the in-memory
    merge's ids and scores. (Loading them with ``IO_FLAG_MMAP``, as before,
    crashed the first search.)"""
    tmp = built["tmp"]
    assert not built["false"]["ondisk"] and built["true"]["ondisk"]
    assert not (tmp / "false" / "lists.ivfdata").exists()
    assert (tmp / "true" / "lists.ivfdata").stat().st_size >= N_VEC * (DIM * 4 + 8)
    disk, _, _ = load_index(tmp / "true")
    invlists = faiss.extract_index_ivf(disk).invlists
    assert isinstance(faiss.downcast_InvertedLists(invlists), faiss.OnDiskInvertedLists)
    _assert_same(_search(tmp / "false", _queries()), _search(tmp / "true", _queries()))


@pytest.mark.slow
def test_the_manifest_records_how_tuning_stopped(built) -> None:
    """``index.tune_max_scan=0.125`` of 16 lists reaches the build: nprobe 2
    at most, and the manifest's ``tuning`` says why it stopped."""
    for ondisk in ("false", "true"):
        m = built[ondisk]
        recalls, tuning = m["nprobe_recall_at_10"], m["tuning"]
        assert list(recalls) == ["1", "2"] and recalls["2"] - recalls["1"] > 0.002, recalls
        assert tuning["stopped_by"] == "scan cap"
        assert tuning["max_nprobe"] == 2 and tuning["max_scan_share"] == 0.125
        assert tuning["queries"] == 500 and tuning["seconds"] >= 0
    assert built["true"]["nprobe_recall_at_10"] == built["false"]["nprobe_recall_at_10"]


# A second driver on the session's Ray whose job passes the S3 settings to
# its workers (as `ray job submit --runtime-env-json` does on a cluster).
SUBMIT = """
import os, sys, ray
env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
ray.init(address=sys.argv[1], runtime_env={"env_vars": env}, log_to_driver=False)
from raysys.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_ondisk_index_under_an_s3_out_searches_as_the_local_one(
    built, aws_env, tmp_path, monkeypatch
) -> None:
    """``raysys index ... index.ondisk=true --out s3://...``: the bucket
    holds the index and its lists and no parts; loaded back through the
    cache, it searches as the local in-memory index does."""
    import ray

    from raysys import storage
    from raysys.storage import resolve

    uri = "s3://raysys-test/claims/ondisk-index"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SUBMIT,
            ray.get_runtime_context().gcs_address,
            "index",
            "-",
            "index.factory=IVF16,Flat",
            "index.ondisk=true",
            "index.tune_max_scan=0.125",
            f"--embeddings={built['tmp'] / 'enc'}",
            f"--out={uri}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "RAYSYS_CACHE": str(tmp_path / "sub-cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{") :])["ondisk"] is True
    out = resolve(uri)
    assert {"index.faiss", "lists.ivfdata", "ids.parquet", "manifest.json"} <= set(out.listdir())
    assert "parts" not in out.listdir()
    m = out.join("manifest.json").read_json()
    assert m["ondisk"] and m["nprobe_recall_at_10"] == built["false"]["nprobe_recall_at_10"]
    monkeypatch.setattr(storage, "CACHE_ROOT", tmp_path / "cache")
    _assert_same(_search(built["tmp"] / "false", _queries()), _search(uri, _queries()))
