"""Peak memory of `raysys index` at two corpus sizes with the same shard size:
the parallel add tasks must stay flat (bounded by one shard), and the driver
must grow only by the compressed codes, never by the raw vectors.

    .venv/bin/python benchmarks/index_memory.py            # 100k and 400k vectors

Vectors are synthetic (a normalised Gaussian mixture, dim 384, float32) written
as `raysys encode` shards of 50k rows. Each size is built in its own process
(ru_maxrss is a per-process high-water mark). Baseline for comparison: the raw
float32 matrix a single-process build would hold (n x dim x 4 bytes).
Writes benchmarks/results/index_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if __package__:  # imported by the tests as benchmarks.index_memory
    from ._results import write_results
else:  # run as a script
    from _results import write_results

DIM = 384


def write_shards(emb_dir: Path, n: int, shard: int, seed: int = 0) -> None:
    from raysys.index.manifest import write_manifest

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((256, DIM)).astype(np.float32)
    shards = []
    for i, start in enumerate(range(0, n, shard)):
        rows = min(shard, n - start)
        v = centers[rng.integers(0, 256, rows)] + 0.5 * rng.standard_normal((rows, DIM)).astype(
            np.float32
        )
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        name = f"part-{i:05d}.parquet"
        ids = pa.array([f"d{start + j}" for j in range(rows)])
        emb = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), DIM)
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


def one(n: int, shard: int, factory: str, ondisk: str) -> dict:
    import ray

    from raysys.config import IndexConfig
    from raysys.index.build import build_index

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        emb = Path(tmp) / "emb"
        emb.mkdir()
        write_shards(emb, n, shard)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        icfg = IndexConfig(factory=factory, train_sample=40_000, ondisk=ondisk)
        m = build_index(emb, Path(tmp) / "index", icfg)
        secs = time.perf_counter() - t0
        driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ray.shutdown()
    return {
        "vectors": n,
        "shard_rows": shard,
        "factory": m["factory"],
        "ondisk": m["ondisk"],
        "build_s": round(secs, 1),
        "add_task_peak_rss_mib": m["add_task_peak_rss_mib"],
        "driver_peak_rss_mib": round(driver, 1),
        "driver_peak_before_build_mib": round(before, 1),
        "raw_float32_matrix_mib": round(n * DIM * 4 / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="100000,400000")
    ap.add_argument("--shard", type=int, default=50_000)
    ap.add_argument("--factory", default="IVF1024,PQ48x8np")
    ap.add_argument("--ondisk", default="false")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.shard, args.factory, args.ondisk)))
        return
    runs = []
    for n in (int(x) for x in args.sizes.split(",")):
        for ondisk in ("false", "true"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    str(n),
                    "--shard",
                    str(args.shard),
                    "--factory",
                    args.factory,
                    "--ondisk",
                    ondisk,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    small, large = runs[0], runs[2]
    res = {
        "runs": runs,
        "size_ratio": large["vectors"] / small["vectors"],
        "add_task_peak_ratio": large["add_task_peak_rss_mib"] / small["add_task_peak_rss_mib"],
        "driver_peak_ratio": large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"],
        "raw_matrix_ratio": large["raw_float32_matrix_mib"] / small["raw_float32_matrix_mib"],
    }
    out_path = Path(__file__).parent / "results" / "index_memory.json"
    out_path.parent.mkdir(exist_ok=True)
    write_results(out_path, res, "benchmarks/index_memory.py")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
