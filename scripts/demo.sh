#!/usr/bin/env bash
# The main job on a local, embedded Ray: sets up .venv, builds the offline demo
# dataset (stdlib docstrings as a BEIR folder) and runs the whole pipeline on it:
# fine-tune -> encode (Ray Data) -> IVF-PQ index -> search -> evaluate.
# Extra arguments are config overrides, e.g. train.enabled=false.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export RAY_DEDUP_LOGS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT="${OUT:-runs/quickstart}"
.venv/bin/raysys demo-data "$OUT/data"
.venv/bin/raysys pipeline jobs/quickstart.yaml "data=$OUT/data" "$@" --out "$OUT"
echo "report: $OUT/report.md  metrics: $OUT/metrics.json  plot: $OUT/nprobe.png"
