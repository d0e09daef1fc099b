#!/usr/bin/env bash
# On a lent GPU machine (after scripts/device_prep.sh here, with .device
# carried): install the carried wheels, run the GPU suite, then the GPU
# benchmarks. Results go to $OUT (the device tool brings them back).
#   scripts/device_gpu.sh [suite|bench|all]   (default all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/raysys-gpu}"
mkdir -p "$OUT"
what="${1:-all}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .device/wheels/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 DS_BUILD_OPS=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" >> "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
rc=0
if [ "$what" = suite ] || [ "$what" = all ]; then
  python3 -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" --junitxml "$OUT/gpu-suite.xml" \
    2>&1 | tee "$OUT/gpu-suite.txt"
  rc=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 -m benchmarks.gpu --models .device/models --corpus .device/data/corpus.jsonl \
    --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu-bench.txt"
  rc=$(( rc || PIPESTATUS[0] ))
fi
exit "$rc"
