"""GPU benchmarks, each side by side in one run on one GPU (issue #15):

- **encode**: raysys's encode actor (token-budget micro-batches, pinned
  non-blocking copies, tokenizing overlapped, half-precision weights and
  output) against sentence-transformers ``encode`` on the same model, texts,
  maximum length and precision. Models: the all-MiniLM-L6-v2 and
  SmolLM2-135M architectures and a ~1B Llama, random-initialised (the
  machine cannot download weights; throughput does not depend on them).
  Reports tokens/s (non-padding tokens), the ratio, and MFU for decoders.
- **train**: a LoRA decoder train step (the ~1B Llama) under ZeRO-2 and
  ZeRO-3, bf16, gradient checkpointing: tokens/s and MFU.
- **rerank**: pairs/s of raysys's scorer against a plain loop (fixed batches
  in input order, ``tokenizer(...)`` per batch, same dtype).

MFU = model FLOPs / time / peak, with forward FLOPs per token = 2 x non-
embedding parameters + 4 x layers x hidden x mean padded length (attention
scores and values), a LoRA train step = 3 x forward (forward, activation
gradients, and the recomputed forward of gradient checkpointing; adapter
weight gradients are negligible). Peak: the dense bf16 figure of the GPU's
datasheet (H100 SXM 989 TFLOP/s, H200 the same).

    python -m benchmarks.gpu --models .device/models --corpus corpus.jsonl --out gpu.json

``--only encode|train|rerank`` runs one step (``scripts/device_gpu.sh`` runs
each in its own process, under its own time limit, with ``--work`` keeping
the built models for the next); results are written after each model or
stage, and a failed one is recorded (``"status": "error"``) while the rest
still run (the exit status is then 1).

``--device cpu --quick`` is a smoke run of the code on a machine without a
GPU (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def texts_from(corpus: Path | None, n: int) -> list[str]:
    if corpus is not None and corpus.is_file():
        out = []
        with corpus.open() as f:
            for line in f:
                d = json.loads(line)
                out.append(f"{d.get('title', '')} {d.get('text', '')}".strip())
                if len(out) >= n:
                    break
        return out
    rng = random.Random(0)
    words = [f"word{i}" for i in range(5000)]
    return [" ".join(rng.choices(words, k=rng.randrange(20, 300))) for _ in range(n)]


def build_model(src: Path, name: str, dest: Path, device: str = "cpu", **overrides: Any) -> Path:
    """A random-initialised model folder with ``src``'s config (plus
    ``overrides``) and tokenizer, saved in bf16; kept and reused when
    ``dest`` already holds it (the harness runs each step in its own
    process). Initialised on ``device`` (a 1B model: seconds on a GPU)."""
    from transformers import AutoConfig, AutoModel

    out = dest / name
    if (out / "config.json").is_file():
        return out
    config = AutoConfig.from_pretrained(src)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    try:
        with torch.device(device):
            model = AutoModel.from_config(config).to(torch.bfloat16)
    except Exception as e:  # the CPU is slower, never wrong: one failure must not stop the call
        print(
            f"[build] {name} on {device} failed ({type(e).__name__}: {e}); on the CPU", flush=True
        )
        model = AutoModel.from_config(config).to(torch.bfloat16)
    # Written whole or not at all: a step killed half-way leaves no model
    # that the next step would take as built.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest))
    model.save_pretrained(tmp)
    del model
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy2(f, tmp / f.name)
    try:
        tmp.rename(out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def nonembedding_params(model: torch.nn.Module) -> int:
    emb = {
        id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def forward_flops_per_token(model: torch.nn.Module, mean_len: float) -> float:
    c = model.config
    return 2 * nonembedding_params(model) + 4 * c.num_hidden_layers * c.hidden_size * mean_len


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- encode -------------------------------------------------------------------------


def bench_encode(
    path: Path, texts: list[str], pooling: str, max_len: int, device: str, precision: str
) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    from raysys.contract import EncodingContract
    from raysys.data.readers import CORPUS_SCHEMA
    from raysys.index.encode import EncodeShardActor
    from raysys.models.backbone import load_tokenizer

    tok = load_tokenizer(str(path))
    contract = EncodingContract(
        model=str(path),
        pooling=pooling,
        passage_max_len=max_len,
        append_eos=pooling == "last",
        use_title=False,
    )
    lengths = [len(x) for x in contract.token_ids(tok, texts, "passage")]
    n_tokens = int(sum(lengths))
    work = Path(tempfile.mkdtemp(prefix="bench-enc-"))
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # as prepare_corpus does
    rows = [(f"d{i}", "", texts[i]) for i in order]
    shard = work / "part-00000.parquet"
    pq.write_table(
        pa.table([pa.array(c) for c in zip(*rows, strict=True)], schema=CORPUS_SCHEMA), shard
    )
    opts = {
        "use_gpu": device == "cuda",
        "precision": precision,
        "micro_batch": 512,
        "micro_tokens": 128 * 1024 if device == "cuda" else 4096,
        "attn_implementation": "sdpa",
    }
    actor = EncodeShardActor(str(path), contract.to_dict(), ["dense"], "float16", str(work), opts)
    actor.encode_shard(str(shard))  # warm-up
    sync()
    t0 = time.perf_counter()
    actor.encode_shard(str(shard))
    sync()
    raysys_s = time.perf_counter() - t0
    model = actor.model
    mean_len = float(np.mean(lengths))
    flops = forward_flops_per_token(model.backbone, mean_len) * n_tokens
    del actor
    torch.cuda.empty_cache() if torch.cuda.is_available() else None

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    word = Transformer(
        str(path),
        max_seq_length=max_len,
        # The same weights' dtype as raysys (the saved models are bf16).
        model_kwargs={"attn_implementation": "sdpa", "dtype": dtype},
    )
    pool = Pooling(
        word.get_embedding_dimension(),
        pooling_mode="lasttoken" if pooling == "last" else pooling,
    )
    st = SentenceTransformer(modules=[word, pool], device=device)
    st_texts = [texts[i] for i in order]
    st.encode(st_texts[:256], batch_size=64)  # warm-up
    best = None
    for bs in (64, 256):
        sync()
        t0 = time.perf_counter()
        st.encode(st_texts, batch_size=bs, normalize_embeddings=True)
        sync()
        s = time.perf_counter() - t0
        if best is None or s < best[1]:
            best = (bs, s)
    shutil.rmtree(work, ignore_errors=True)
    peak = peak_flops()
    return {
        "texts": len(texts),
        "tokens": n_tokens,
        "max_len": max_len,
        "precision": precision,
        "raysys_s": raysys_s,
        "raysys_tokens_per_s": n_tokens / raysys_s,
        "st_s": best[1],
        "st_batch_size": best[0],
        "st_tokens_per_s": n_tokens / best[1],
        "ratio": best[1] / raysys_s,
        "raysys_mfu": flops / raysys_s / peak if peak else None,
        "st_mfu": flops / best[1] / peak if peak else None,
    }


# -- train ----------------------------------------------------------------------------


def bench_train(
    path: Path, texts: list[str], device: str, stage: int, steps: int
) -> dict[str, Any]:
    from raysys.config import load_config
    from raysys.train.inprocess import describe, train_steps

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rng = random.Random(0)
    with (work / "corpus.jsonl").open("w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n")
    with (work / "groups.jsonl").open("w") as f:
        for i, t in enumerate(texts):
            negs = [f"d{j}" for j in rng.sample(range(len(texts)), 3) if j != i]
            q = " ".join(t.split()[:12])
            f.write(
                json.dumps(
                    {"query_id": f"q{i}", "query": q, "positives": [f"d{i}"], "negatives": negs}
                )
                + "\n"
            )
    cfg = load_config(
        None,
        [
            f"model.path={path}",
            f"data.groups={work / 'groups.jsonl'}",
            f"data.corpus={work / 'corpus.jsonl'}",
            "contract.pooling=last",
            "contract.append_eos=true",
            "contract.query_max_len=64",
            "contract.passage_max_len=256",
            "model.lora.enabled=true",
            "model.lora.r=16",
            "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
            f"train.zero_stage={stage}",
            f"train.precision={'bf16' if device == 'cuda' else 'fp32'}",
            "train.gradient_checkpointing=true",
            "train.attn_implementation=sdpa",
            "train.per_device_queries=16" if device == "cuda" else "train.per_device_queries=2",
            "train.group_size=4",
        ],
    )
    res = train_steps(cfg, steps=steps, device=torch.device(device))
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        meta = AutoModel.from_config(AutoConfig.from_pretrained(path))
    skip = 2 if steps > 3 else 0  # warm-up steps
    secs, toks = sum(res.seconds[skip:]), sum(res.tokens[skip:])
    # Padded lengths are not recorded per step: the attention term uses the
    # contract's maximum lengths as an upper bound of the mean.
    flops = 3 * forward_flops_per_token(meta, 160) * toks
    peak = peak_flops()
    shutil.rmtree(work, ignore_errors=True)
    return {
        **describe(cfg),
        "steps_timed": len(res.seconds) - skip,
        "tokens_per_s": toks / secs,
        "mfu": flops / secs / peak if peak else None,
        "peak_gib": res.peak_bytes / 2**30,
        "losses": res.losses,
    }


# -- rerank ---------------------------------------------------------------------------


def bench_rerank(path: Path, texts: list[str], device: str, precision: str) -> dict[str, Any]:
    from transformers import AutoModel

    from raysys.models.backbone import build_backbone, load_tokenizer
    from raysys.models.reranker import RerankContract, Reranker, Scorer, export_reranker

    work = Path(tempfile.mkdtemp(prefix="bench-rr-"))
    tok = load_tokenizer(str(path))
    torch.manual_seed(0)
    model = Reranker(build_backbone(str(path), dtype=torch.float32), RerankContract(max_len=256))
    export_reranker(model, model.head.state_dict(), tok, work)
    rng = random.Random(0)
    queries = [" ".join(t.split()[:10]) for t in texts[:200]]
    pairs = [(q, rng.choice(texts)) for q in queries for _ in range(len(texts) // 200 or 1)]
    c = RerankContract.load(work)
    ids = c.token_ids(tok, [c.format_pair(q, "", d) for q, d in pairs])
    opts = {
        "precision": precision,
        "micro_batch": 512,
        "micro_tokens": 64 * 1024 if device == "cuda" else 4096,
    }
    scorer = Scorer(work, device, opts)
    scorer.score_ids(ids[:256])
    sync()
    t0 = time.perf_counter()
    scorer.score_ids(ids)
    sync()
    raysys_s = time.perf_counter() - t0
    del scorer
    # The plain loop: fixed batches in input order, tokenizer per batch.
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    plain = (
        AutoModel.from_pretrained(work, dtype=dtype if device == "cuda" else torch.float32)
        .to(device)
        .eval()
    )
    head = model.head.to(device)
    strs = [c.format_pair(q, "", d) for q, d in pairs]
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(strs), 32):
            enc = tok(
                strs[i : i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt"
            ).to(device)
            h = plain(**enc).last_hidden_state[:, 0]
            head(h.float()).float().cpu()
    sync()
    plain_s = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    return {
        "pairs": len(ids),
        "precision": precision,
        "raysys_pairs_per_s": len(ids) / raysys_s,
        "plain_pairs_per_s": len(ids) / plain_s,
        "ratio": plain_s / raysys_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="folder with minilm/ and smollm2/")
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--only", default="encode,train,rerank")
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the random-initialised models, kept and reused (default: a "
        "temporary one, removed at the end)",
    )
    args = ap.parse_args()
    dev, quick = args.device, args.quick
    only = [s for s in ("encode", "train", "rerank") if s in args.only.split(",")]
    half = "bf16" if dev == "cuda" else "fp32"
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-models-"))
    work.mkdir(parents=True, exist_ok=True)
    llama_1b = dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8,
    )  # fmt: skip
    if quick:
        llama_1b = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    # Only the models the chosen steps use (`quick` names its own folders:
    # a shared --work never mixes tiny and full-size models).
    tag = "-quick" if quick else ""

    def minilm() -> Path:
        return build_model(args.models / "minilm", "minilm", work, dev)

    def smol() -> Path:
        extra = llama_1b if quick else {}
        return build_model(args.models / "smollm2", f"smollm2-135m{tag}", work, dev, **extra)

    def big() -> Path:
        return build_model(args.models / "smollm2", f"llama-1b{tag}", work, dev, **llama_1b)

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "peak_bf16_flops": peak_flops(),
        "quick": quick,
    }
    n = 64 if quick else 5183
    texts = texts_from(args.corpus, n)
    failed: list[str] = []

    def save() -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import write_results

        write_results(args.out, result, "benchmarks/gpu.py")

    def attempt(step: str, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run one measurement; a failure is recorded and the next one still
        runs (one call of the GPU harness is to bring back all it can).
        Results are written after each."""
        t0 = time.perf_counter()
        try:
            r: dict[str, Any] | None = {**run(), "status": "ok"}
        except Exception as e:  # recorded; the exit status says so
            traceback.print_exc()
            r = None
            result.setdefault(step, {})[name] = {
                "status": "error",
                "error": f"{type(e).__name__}: {e}",
            }
            failed.append(f"{step}/{name}")
            print(f"[{step}] {name}: FAILED {type(e).__name__}: {e}", flush=True)
        if r is not None:
            r["seconds"] = time.perf_counter() - t0
            result.setdefault(step, {})[name] = r
        save()
        return r

    if "encode" in only:
        for name, path, pooling, max_len, count in (
            ("all-MiniLM-L6-v2", minilm, "mean", 256, n),
            ("SmolLM2-135M", smol, "last", 512, n),
            ("llama-1b", big, "last", 512, 100 if quick else 2000),
        ):
            r = attempt(
                "encode",
                name,
                lambda path=path, pooling=pooling, max_len=max_len, count=count: bench_encode(
                    path(), texts[:count], pooling, max_len, dev, half
                ),
            )
            if r is not None:
                print(f"[encode] {name}: raysys {r['raysys_tokens_per_s']:.0f} tok/s, "
                      f"sentence-transformers {r['st_tokens_per_s']:.0f} tok/s, x{r['ratio']:.2f}, "
                      f"MFU {r['raysys_mfu']}", flush=True)  # fmt: skip
    if "train" in only:
        for stage in (2, 3):
            r = attempt(
                "train",
                f"zero{stage}",
                lambda stage=stage: bench_train(
                    big(), texts[: (64 if quick else 2000)], dev, stage, 3 if quick else 12
                ),
            )
            if r is not None:
                print(f"[train] ZeRO-{stage}: {r['tokens_per_s']:.0f} tok/s MFU {r['mfu']}",
                      flush=True)  # fmt: skip
    if "rerank" in only:
        r = attempt(
            "rerank",
            "all-MiniLM-L6-v2",
            lambda: bench_rerank(minilm(), texts[: (64 if quick else 5183)], dev, half),
        )
        if r is not None:
            print(f"[rerank] raysys {r['raysys_pairs_per_s']:.0f} pairs/s, plain loop "
                  f"{r['plain_pairs_per_s']:.0f}, x{r['ratio']:.2f}", flush=True)  # fmt: skip
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
