"""Training on a multi-gigabyte corpus (issue #14, evidence 1).

1. **Batch fetch is O(batch).** A synthetic corpus (MS MARCO-like passage
   lengths, random text) is built at two sizes, as Arrow holds a corpus read
   from disk: 32-bit-offset string chunks under 2 GiB. ``TrainingSet`` then
   compacts it (once) and the time to fetch a batch of 128 random passages is
   measured at both sizes; the ratio should be near 1 (goal: <= 1.5).
2. **A few training steps on the large corpus.** Ray Train + DeepSpeed with 2
   CPU workers and a tiny random-init BERT; the corpus reaches the workers
   through Ray's object store. Each worker reports its peak RSS.

    .venv/bin/python benchmarks/train_corpus.py --small-gb 0.1 --large-gb 2.5

Writes benchmarks/results/train_corpus.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers (tiny BERT)

from _results import write_results

from raysys.data.groups import TrainingSet
from raysys.data.readers import Report
from raysys.train.tasks import register_task
from raysys.train.tasks.retrieve import RetrieveTask

ALPHABET = np.frombuffer(b"etaoinshrdlucmfwypvbgkqjxz      ", dtype=np.uint8)
CHUNK_BYTES = 1 << 30  # chunks under 2 GiB, as a string column read from disk


def synthetic_corpus(n_bytes: float, seed: int = 0) -> pa.Table:
    """id/title/text, passages of lognormal length (median ~330 chars), in
    string chunks of at most 1 GiB."""
    rng = np.random.default_rng(seed)
    chunks: dict[str, list[pa.Array]] = {"id": [], "title": [], "text": []}
    made, start = 0, 0
    while made < n_bytes:
        want = int(min(CHUNK_BYTES, n_bytes - made))
        lengths = np.clip(rng.lognormal(np.log(330), 0.5, size=want // 300 + 1), 20, 4000)
        lengths = lengths.astype(np.int64)
        lengths = lengths[np.cumsum(lengths) <= want] if lengths.sum() > want else lengths
        if len(lengths) == 0:  # what is left is shorter than one passage
            break
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        data = ALPHABET[rng.integers(0, len(ALPHABET), size=int(offsets[-1]), dtype=np.uint8)]
        n = len(lengths)
        chunks["text"].append(
            pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data.tobytes()))
        )
        ids = [f"d{i}" for i in range(start, start + n)]
        chunks["id"].append(pa.array(ids, pa.string()))
        chunks["title"].append(pa.array([f"title {i}" for i in ids], pa.string()))
        made += int(offsets[-1])
        start += n
    return pa.table({k: pa.chunked_array(v) for k, v in chunks.items()})


def training_set(corpus: pa.Table, n_queries: int, seed: int = 0) -> TrainingSet:
    rng = np.random.default_rng(seed + 1)
    n = corpus.num_rows
    positives = [[int(r)] for r in rng.integers(0, n, size=n_queries)]
    negatives = [[int(r) for r in rng.integers(0, n, size=8)] for _ in range(n_queries)]
    queries = [f"query {i} " + "w" * 30 for i in range(n_queries)]
    return TrainingSet(
        corpus, [f"q{i}" for i in range(n_queries)], queries, positives, negatives, Report()
    )


def fetch_ms(fetch: Any, n: int, batches: int = 100, batch: int = 128) -> float:
    """Median milliseconds of ``fetch(rows)`` for random batches of ``batch`` rows."""
    rng = np.random.default_rng(7)
    times = []
    for _ in range(batches):
        rows = [int(r) for r in rng.integers(0, n, size=batch)]
        t0 = time.perf_counter()
        fetch(rows)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def uncompacted_fetch(corpus: pa.Table) -> Any:
    """The fetch before compaction: ``take`` on the chunked string columns."""

    def fetch(rows: list[int]) -> Any:
        sub = corpus.take(pa.array(rows, type=pa.int64()))
        return [sub.column(c).to_pylist() for c in ("id", "title", "text")]

    return fetch


def build(gb: float) -> tuple[TrainingSet, dict[str, Any]]:
    t0 = time.perf_counter()
    corpus = synthetic_corpus(gb * 1e9)
    built = time.perf_counter() - t0
    chunks = corpus.column("text").num_chunks
    n = corpus.num_rows
    try:
        before: float | str = round(fetch_ms(uncompacted_fetch(corpus), n, batches=10), 3)
    except pa.ArrowInvalid as e:  # past 2 GiB: the concatenating take overflows
        before = f"fails: {e}"
    t0 = time.perf_counter()
    ts = training_set(corpus, 256)
    compact_s = time.perf_counter() - t0
    text_bytes = ts.corpus.column("text").chunk(0).buffers()[2].size
    return ts, {
        "corpus_gb": round(text_bytes / 1e9, 3),
        "passages": n,
        "chunks_before": chunks,
        "build_s": round(built, 1),
        "compact_s": round(compact_s, 1),
        "fetch_128_ms_uncompacted": before,
    }


def compare_fetch(small_gb: float, large_gb: float, rounds: int = 5) -> dict[str, Any]:
    """Fetch time per 128-row batch at both sizes, measured in alternating
    rounds (after a warm-up) so that machine noise hits both alike."""
    sets, info = {}, {}
    for name, gb in (("small", small_gb), ("large", large_gb)):
        sets[name], info[name] = build(gb)
        print(name, info[name], flush=True)
    times: dict[str, list[float]] = {"small": [], "large": []}
    for ts in sets.values():
        fetch_ms(ts.texts, ts.corpus.num_rows, batches=50)  # warm-up
    for _ in range(rounds):
        for name, ts in sets.items():
            times[name].append(fetch_ms(ts.texts, ts.corpus.num_rows, batches=200))
    for name in sets:
        info[name]["fetch_128_ms_rounds"] = [round(t, 3) for t in times[name]]
        info[name]["fetch_128_ms"] = round(statistics.median(times[name]), 3)
    info["ratio_large_over_small"] = round(
        info["large"]["fetch_128_ms"] / info["small"]["fetch_128_ms"], 3
    )
    return info


class BigCorpusTask(RetrieveTask):
    """The retrieve task on the synthetic corpus, reporting worker peak RSS."""

    corpus_gb = 2.5

    def load_data(self) -> TrainingSet:
        return training_set(synthetic_corpus(self.corpus_gb * 1e9), 256)

    def probe(self, module: Any, tokenizer: Any, data: TrainingSet) -> dict[str, Any]:
        out = super().probe(module, tokenizer, data)
        out["worker_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out


def train_steps(gb: float, steps: int) -> dict[str, Any]:
    import ray

    from raysys.config import load_config
    from raysys.train.launch import run_training
    from tests.helpers import tiny_bert

    BigCorpusTask.corpus_gb = gb
    # Registered on the driver; the class reaches the workers by value (it is
    # defined in __main__) through the trainer's config.
    register_task(BigCorpusTask, "big-corpus")
    with tempfile.TemporaryDirectory() as d:
        model = tiny_bert(Path(d) / "tiny-bert")
        cfg = load_config(
            None,
            [
                f"model={model}",
                "contract.pooling=mean",
                "contract.passage_max_len=64",
                "train.per_device_queries=8",
                "train.group_size=4",
                f"train.max_steps={steps}",
                "train.zero_stage=2",
                "train.scaling.num_workers=2",
                f"train.checkpoint.storage_path={d}/ray",
                "train.checkpoint.run_name=big-corpus",
                "train.task=big-corpus",
            ],
        )
        ray.init(num_cpus=4, include_dashboard=False)
        t0 = time.perf_counter()
        outcome = run_training(cfg, Path(d) / "out")
        seconds = time.perf_counter() - t0
        probe = json.loads((outcome.model_dir / "train_probe.json").read_text())
        ray.shutdown()
    return {
        "corpus_gb": gb,
        "steps": outcome.stopped_at,
        "losses": [round(h["loss"], 4) for h in outcome.history],
        "seconds": round(seconds, 1),
        "worker_peak_rss_mib": round(probe["worker_peak_rss_mib"], 1),
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small-gb", type=float, default=0.1)
    ap.add_argument("--large-gb", type=float, default=2.5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    result: dict[str, Any] = {"fetch": compare_fetch(args.small_gb, args.large_gb)}
    print("fetch ratio", result["fetch"]["ratio_large_over_small"], flush=True)
    if not args.skip_train:
        # Both sizes, so the worker's peak RSS can be compared across them.
        result["train"] = {
            name: train_steps(gb, args.steps)
            for name, gb in (("small", args.small_gb), ("large", args.large_gb))
        }
        print("train", result["train"], flush=True)
    out = Path(__file__).parent / "results" / "train_corpus.json"
    write_results(out, result, "benchmarks/train_corpus.py")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
