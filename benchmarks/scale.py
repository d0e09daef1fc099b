"""Scale benchmark (#14): encode -> IVF-PQ build -> search at several corpus
sizes, with per-stage wall time, rows/s, driver and worker peak RSS and bytes
on storage; the Ray overhead against bare single-process scripts
(sentence-transformers ``encode`` + plain faiss) on the same data; and a run
killed half-way through encoding, then resumed.

    .venv/bin/pip install sentence-transformers      # for the bare baseline
    .venv/bin/python benchmarks/scale.py              # 250k and 1M passages, killed at 100k
    .venv/bin/python benchmarks/scale.py --sizes 20000 80000 --bare-size 20000  # quick

The corpus is synthetic with realistic passage lengths: words drawn from a
Zipf law over the whole words of all-MiniLM-L6-v2's WordPiece vocabulary,
lengths log-normal around 56 words (MS MARCO's mean), a short title on half of
them. The encoder is a random-init 2-layer BERT (hidden 128) with that real
tokenizer, passages cut at 128 tokens. Each size runs in its own process on
an embedded Ray (peak RSS is per process). Driver RSS is sampled every 0.2 s
in the driver; worker RSS is the largest of any ``ray::`` process (encode
actors, add tasks) sampled alongside. Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _results import write_results

ROOT = Path(__file__).resolve().parents[1]
SHARD = 20_000
N_QUERIES = 10_000
P_LEN, Q_LEN = 128, 32


# -- data and model ------------------------------------------------------------------


def make_model(path: Path) -> Path:
    """A random 2-layer BERT with MiniLM's real tokenizer (saved once)."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from raysys.models.hub import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2"))
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _words(model: Path) -> list[str]:
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(model).get_vocab()
    return sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) > 1)


def make_corpus(path: Path, n: int, model: Path, seed: int = 0) -> Path:
    """``n`` passages as corpus.jsonl (kept if already there)."""
    if path.is_file():
        return path
    words = np.array(_words(model))
    rng = np.random.default_rng(seed)
    # Zipf-like ranks over the vocabulary (s = 1.1, a common fit for English).
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    p /= p.sum()
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for start in range(0, n, 10_000):
            rows = min(10_000, n - start)
            lengths = np.clip(rng.lognormal(math.log(50), 0.45, rows).astype(int), 8, 220)
            flat = words[rng.choice(len(words), size=int(lengths.sum()), p=p)]
            title_len = np.where(rng.random(rows) < 0.5, rng.integers(2, 8, rows), 0)
            t_flat = words[rng.choice(len(words), size=int(title_len.sum()), p=p)]
            off = t_off = 0
            for j in range(rows):
                text = " ".join(flat[off : off + lengths[j]])
                title = " ".join(t_flat[t_off : t_off + title_len[j]])
                off += lengths[j]
                t_off += title_len[j]
                f.write(json.dumps({"_id": f"p{start + j}", "title": title, "text": text}) + "\n")
    tmp.replace(path)
    return path


def make_queries(n: int, model: Path, seed: int = 1) -> dict[str, str]:
    words = np.array(_words(model))
    rng = np.random.default_rng(seed)
    return {
        f"q{i}": " ".join(words[rng.integers(0, len(words), rng.integers(4, 12))]) for i in range(n)
    }


# -- measuring -----------------------------------------------------------------------


class Sampler:
    """Peak RSS of this process and of any ``ray::`` worker, per stage."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.driver = self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            self.driver = max(self.driver, self.me.memory_info().rss)
            for p in psutil.process_iter(["name", "memory_info"]):
                name = p.info["name"] or ""
                if name.startswith("ray::") and "IDLE" not in name and p.info["memory_info"]:
                    self.worker = max(self.worker, p.info["memory_info"].rss)

    def reset(self) -> None:
        self.driver = self.me.memory_info().rss
        self.worker = 0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _config(work: Path, model: Path) -> Any:
    from raysys.config import load_config

    return load_config(
        None,
        [
            f"model={model}",
            "contract.pooling=mean",
            f"contract.passage_max_len={P_LEN}",
            f"contract.query_max_len={Q_LEN}",
            f"encode.shard_size={SHARD}",
            "encode.pool.micro_batch=64",
            "search.topk=100",
        ],
    )


def run_size(n: int, work: Path, model: Path) -> dict[str, Any]:
    """encode -> index -> search at ``n`` passages (this process is the driver)."""
    import ray

    from raysys.search.retrieve import QueryEncoder
    from raysys.stages import encode_stage, index_stage, search_stage

    corpus = make_corpus(work / f"corpus-{n}.jsonl", n, model)
    cfg = _config(work, model)
    out = work / f"run-{n}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sampler = Sampler()
    stages: dict[str, Any] = {}

    def stage(name: str, rows: int, fn: Any, size_of: Path | None) -> Any:
        sampler.reset()
        t0 = time.perf_counter()
        res = fn()
        wall = time.perf_counter() - t0
        stages[name] = {
            "wall_s": round(wall, 2),
            "rows": rows,
            "rows_per_s": round(rows / wall, 1),
            "driver_peak_rss_mib": round(sampler.driver / 2**20, 1),
            "worker_peak_rss_mib": round(sampler.worker / 2**20, 1),
            "bytes_on_storage": _bytes(size_of) if size_of else 0,
        }
        print(f"[{n}] {name}: {stages[name]}", flush=True)
        return res

    contract = cfg.encoding_contract()
    stage("encode", n, lambda: encode_stage(cfg, corpus, out, cfg.model.path, contract), out)
    m = stage("index", n, lambda: index_stage(cfg, out, out / "index"), out / "index")
    queries = make_queries(N_QUERIES, model)
    encoder = QueryEncoder(cfg.model.path, contract)
    stage("search", N_QUERIES, lambda: search_stage(cfg, out / "index", queries, encoder), None)
    sampler.stop()
    ray.shutdown()
    return {
        "passages": n,
        "corpus_bytes": corpus.stat().st_size,
        "stages": stages,
        "index": {
            k: m[k]
            for k in (
                "factory",
                "nprobe",
                "tuning",
                # recall@10 against exact search at each nprobe tried: the
                # README's PQ ceiling is the largest of these.
                "nprobe_recall_at_10",
                "embedding_passes",
                "embedding_shard_reads",
                "add_task_peak_rss_mib",
            )
        },
    }


# -- the bare baseline: one process, no Ray ------------------------------------------


def run_bare(n: int, work: Path, model: Path, factory: str, nprobe: int) -> dict[str, Any]:
    """The same stages as plain single-process scripts."""
    import faiss
    import torch
    from sentence_transformers import SentenceTransformer, models

    torch.set_num_threads(2)
    corpus = make_corpus(work / f"corpus-{n}.jsonl", n, model)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    ids, texts = [], []
    with corpus.open() as f:
        for line in f:
            r = json.loads(line)
            ids.append(r["_id"])
            texts.append(f"{r['title']} {r['text']}".strip())
    st = SentenceTransformer(
        modules=[
            models.Transformer(str(model), max_seq_length=P_LEN),
            models.Pooling(128, pooling_mode="mean"),
            models.Normalize(),
        ],
        device="cpu",
    )
    emb = st.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    out["encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = faiss.index_factory(emb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    nlist = faiss.extract_index_ivf(index).nlist
    rng = np.random.default_rng(0)
    index.train(emb[rng.choice(n, size=min(n, max(39 * nlist, 10_000)), replace=False)])
    index.add(emb)
    out["index"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    queries = make_queries(N_QUERIES, model)
    q = st.encode([queries[k] for k in sorted(queries)], batch_size=256, convert_to_numpy=True)
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    index.search(q, 100)
    out["search"] = time.perf_counter() - t0
    return {k: round(v, 2) for k, v in out.items()}


# -- killed half-way -----------------------------------------------------------------


def run_killed(n: int, work: Path, model: Path) -> dict[str, Any]:
    """Kill `raysys encode` (its whole process group) once its progress line
    says half the passages are encoded, count the shards on storage, rerun,
    check every id once."""
    import re

    from raysys.index.encode import EMB_DIR, read_embeddings

    corpus = make_corpus(work / f"corpus-{n}.jsonl", n, model)
    out = work / f"killed-{n}"
    args = [
        sys.executable,
        "-m",
        "raysys.cli",
        "encode",
        "-",
        f"model={model}",
        "contract.pooling=mean",
        f"contract.passage_max_len={P_LEN}",
        f"encode.shard_size={SHARD}",
        "encode.pool.micro_batch=64",
        f"--corpus={corpus}",
        f"--out={out}",
    ]
    env = {**os.environ, "RAYSYS_PROGRESS_S": "1"}
    proc = subprocess.Popen(
        args,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    t0 = time.perf_counter()
    encoded = 0
    assert proc.stderr is not None
    for line in proc.stderr:  # "encode: 12345/250000 passages (...)" every second
        hit = re.match(r"encode: (\d+)/(\d+) passages", line.strip())
        if hit and int(hit.group(1)) >= n / 2:
            encoded = int(hit.group(1))
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.perf_counter() - t0
    emb = out / EMB_DIR
    total = math.ceil(n / SHARD)
    on_storage = len(list(emb.glob("part-*.parquet")))
    t0 = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rerun = time.perf_counter() - t0
    m = json.loads((emb / "manifest.json").read_text())
    ids = [i for s in m["shards"] for i in read_embeddings(emb, s["name"])[0]]
    return {
        "passages": n,
        "killed_at_s": round(killed_at, 1),
        "passages_encoded_at_kill": encoded,
        "shards_total": total,
        "shards_on_storage_at_kill": on_storage,
        "share_on_storage": round(on_storage / total, 3),
        "rerun_wall_s": round(rerun, 1),
        "ids": len(ids),
        "distinct_ids": len(set(ids)),
        "every_id_exactly_once": len(ids) == len(set(ids)) == n,
    }


# -- driver --------------------------------------------------------------------------


def _child(args: list[str]) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def _exponent(rows: list[dict[str, Any]], stage: str, key: str = "wall_s") -> float:
    """Least-squares slope of log(key) on log(passages)."""
    x = np.log([r["passages"] for r in rows])
    y = np.log([max(r["stages"][stage][key], 1e-9) for r in rows])
    return round(float(np.polyfit(x, y, 1)[0]), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000])
    ap.add_argument("--bare-size", type=int, default=250_000)
    ap.add_argument("--kill-size", type=int, default=100_000, help="passages of the killed run")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--bare", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="raysys-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / "tiny-bert-minilm-tok")
    if a.one:
        print(json.dumps(run_size(a.one, work, model)))
        return
    if a.bare:
        n, factory, nprobe = int(a.bare[0]), a.bare[1], int(a.bare[2])
        print(json.dumps(run_bare(n, work, model, factory, nprobe)))
        return
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"sizes": rows, "shard_size": SHARD, "queries": N_QUERIES}
    for n in sorted(a.sizes):
        rows.append(_child(["--one", str(n), "--work", str(work)]))
        write_results(a.out, result, "benchmarks/scale.py")  # partial, kept if cut off
    small, large = rows[0], rows[-1]
    result["fitted_exponent_wall"] = {s: _exponent(rows, s) for s in ("encode", "index")}
    result["driver_rss_growth"] = {
        s: round(
            large["stages"][s]["driver_peak_rss_mib"] / small["stages"][s]["driver_peak_rss_mib"],
            3,
        )
        for s in ("encode", "index", "search")
    }
    bare_row = next((r for r in rows if r["passages"] == a.bare_size), None)
    if bare_row is not None:
        try:
            ix = bare_row["index"]
            bare = _child(
                ["--bare", str(a.bare_size), ix["factory"], str(ix["nprobe"]), "--work", str(work)]
            )
            result["ray_overhead"] = {
                "passages": a.bare_size,
                "bare_wall_s": bare,
                "raysys_wall_s": {s: bare_row["stages"][s]["wall_s"] for s in bare},
                "ratio": {s: round(bare_row["stages"][s]["wall_s"] / bare[s], 3) for s in bare},
            }
        except subprocess.CalledProcessError as e:
            result["ray_overhead"] = {
                "error": f"bare baseline failed ({e}); sentence-transformers?"
            }
    result["killed_half_way"] = run_killed(a.kill_size, work, model)
    write_results(a.out, result, "benchmarks/scale.py")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
