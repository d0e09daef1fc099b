#!/usr/bin/env bash
# On a lent GPU machine (after scripts/device_prep.sh here, with .device
# carried): install the carried wheels, run the GPU suite, then each GPU
# benchmark step. Results go to $OUT (the device tool brings them back).
#   scripts/device_gpu.sh [suite|bench|all]   (default all)
# The device tool's call:  run(command="bash scripts/device_gpu.sh",
#   carry=[".device"], timeout_s=500)
#
# Each step runs under `timeout` (one hang cannot eat the call; pytest-timeout
# also fails a hung suite test and goes on), writes its results file as soon
# as it ends (benchmarks write after each model/stage, and one that fails is
# recorded and the next still runs), and prints one line: "[step] NAME:
# ok|failed|timeout|skipped in Ns (limit Ms) | ...". $OUT/summary.json
# (scripts/gpu_summary.py) is rewritten after every step, so a call cut short
# still returns all it measured, per suite test and per benchmark.
#
# Time on an H200: the call is sized to end within 8 minutes (a machine start
# takes 1-2 of the 15 lent, and a rerun of one step must still fit). No GPU
# has run this yet. The estimates are the work each step does at full size,
# at an assumed 35% of the bf16 peak (989 TFLOP/s) for the big matmuls, plus
# its fixed costs (imports, CUDA/NCCL init, model and engine builds); the
# CPU rehearsal (tiny shapes, 2 busy cores) shows where fixed costs lie, not
# GPU times:
#   step    estimate  limit  basis
#   setup     ~20 s    60 s  14 wheels into a folder (--no-deps, ~5 s); one
#                            import of torch, transformers, deepspeed etc.
#                            (rehearsal: 57 s, nearly all imports, busy CPU)
#   suite     ~75 s   120 s  pytest + CUDA/NCCL init ~15 s; 4 DeepSpeed runs
#                            of 12 steps on a 64-wide Llama (engine build
#                            ~5-8 s each, the steps milliseconds); encode,
#                            rerank and query checks on a tiny BERT ~10 s
#                            (rehearsal: 341 s, 85% in the DeepSpeed tests)
#   encode    ~90 s   130 s  3 models built on the GPU and saved (1B: 2.4 GB,
#                            ~10 s); MiniLM and SmolLM2-135M over 5,183 texts
#                            (~1.4M tokens; 135M: ~0.4 PFLOP, ~1-2 s a pass)
#                            and the 1B Llama over 2,000 (~0.56M tokens,
#                            ~1.1 PFLOP, ~3 s a pass): each twice in raysys
#                            (warm-up, timed) and 3 times in sentence-
#                            transformers (warm-up, batch 64, 256); CPU
#                            tokenizing ~3 s a model
#   train     ~70 s   105 s  ZeRO-2 then ZeRO-3: a 1B LoRA engine ~20 s each;
#                            12 steps of 16 queries + 64 passages (~17k
#                            tokens: ~0.1 PFLOP with recompute, ~0.3 s each)
#   rerank    ~25 s    45 s  ~5,000 MiniLM pairs in raysys and a plain loop
#   total    ~280 s   460 s  (+ a summary of ~1 s after each step)
# The limits add up to RAYSYS_GPU_BUDGET_S (460 s); a step never gets more
# than what is left of it, and one with under 10 s left is skipped.
#
# CPU rehearsal (scripts/rehearse_gpu.sh sets it up): RAYSYS_REHEARSE=1 runs
# this same script on the CPU at tiny shapes (benchmarks --device cpu
# --quick, the suite as its CPU dry run) with RAYSYS_PY's interpreter and
# limits scaled by RAYSYS_TIME_SCALE (default 8 there: 2 CPU cores, shared
# with other work, run the suite's DeepSpeed tests 20-100x slower than a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/raysys-gpu}"
mkdir -p "$OUT"
rm -f "$OUT/steps.tsv"
what="${1:-all}"
PY="${RAYSYS_PY:-python3}"
SITE="${RAYSYS_SITE:-/tmp/site}"
MODELS="${RAYSYS_MODELS_DIR:-/tmp/raysys-gpu-models}"
if [ "${RAYSYS_REHEARSE:-0}" = 1 ]; then
  SCALE="${RAYSYS_TIME_SCALE:-8}"
  BENCH_ARGS="--device cpu --quick"
  export RAYSYS_GPU_SUITE_ON_CPU=1
  MODELS="${RAYSYS_MODELS_DIR:-$OUT/models}"
else
  SCALE="${RAYSYS_TIME_SCALE:-1}"
  BENCH_ARGS=""
fi
export OUT PY SITE MODELS BENCH_ARGS SCALE
export RAYSYS_GPU_BUDGET_S=$(( ${RAYSYS_GPU_BUDGET_S:-460} * SCALE ))
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 DS_BUILD_OPS=0
T0=$SECONDS
rc=0

# step NAME LIMIT_S CMD: run the command line CMD (in bash, which sees the
# functions below) under timeout (the limit scaled, capped by
# what is left of the budget), log to $OUT/NAME.log, record it, summarise.
step() {
  local name=$1 limit=$(( $2 * SCALE )) status code t
  shift 2
  local left=$(( RAYSYS_GPU_BUDGET_S - (SECONDS - T0) ))
  (( limit > left )) && limit=$left
  t=$SECONDS
  if (( limit < 10 )); then
    status=skipped code=0
    echo "[$name] skipped: ${left}s of the budget left" > "$OUT/$name.log"
  else
    timeout -k 15 "$limit" bash -c "$1" 2>&1 | tee "$OUT/$name.log"
    code=${PIPESTATUS[0]}
    [ -z "$(tail -c 1 "$OUT/$name.log")" ] || echo  # a cut-off line
    case "$code" in
      0) status=ok ;;
      124 | 137) status=timeout ;;
      *) status=failed ;;
    esac
  fi
  [ "$status" = ok ] || rc=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$code" "$(( SECONDS - t ))" "$limit" \
    >> "$OUT/steps.tsv"
  "$PY" scripts/gpu_summary.py "$OUT" "$name" || rc=1
}

setup() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" --find-links .device/wheels -r .device/wheels/requirements.txt || return 1
  if [ "${RAYSYS_REHEARSE:-0}" != 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || return 1
  fi
  "$PY" - "$OUT/env.json" <<'PY'
import importlib.util
import json
import platform
import sys

import deepspeed
import peft
import pyarrow
import sentence_transformers
import torch
import transformers

env = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "transformers": transformers.__version__,
    "sentence_transformers": sentence_transformers.__version__,
    "peft": peft.__version__,
    "pyarrow": pyarrow.__version__,
    "deepspeed": deepspeed.__version__,
    "ray": bool(importlib.util.find_spec("ray")),
    "faiss": bool(importlib.util.find_spec("faiss")),
}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(env)
PY
}

bench() {
  "$PY" -m benchmarks.gpu --models .device/models --corpus .device/data/corpus.jsonl \
    --work "$MODELS" --only "$1" --out "$OUT/gpu-$1.json" $BENCH_ARGS
}
export -f setup bench

step setup 60 setup
if [ "$what" = suite ] || [ "$what" = all ]; then
  rm -f "$OUT/gpu-suite.jsonl"
  # -v names each test as it starts (the log shows which one a timeout cut);
  # pytest-timeout (carried) fails a hung test and goes on to the next.
  step suite 120 'RAYSYS_GPU_SUITE_REPORT="$OUT/gpu-suite.jsonl" "$PY" -m pytest tests/gpu -v \
    -rfEs -p no:cacheprovider -o addopts="" -o timeout=$(( 45 * SCALE )) \
    --junitxml "$OUT/gpu-suite.xml"'
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  step encode 130 'bench encode'
  step train 105 'bench train'
  step rerank 45 'bench rerank'
fi
echo "[device_gpu] $(( SECONDS - T0 ))s in all; $OUT/summary.json"
exit "$rc"
