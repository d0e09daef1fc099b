#!/usr/bin/env bash
# The main job on a local, embedded Ray: sets up .venv, builds the offline demo
# dataset and runs raysys on it. Extra arguments are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export RAY_DEDUP_LOGS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT="${OUT:-runs/quickstart}"
.venv/bin/raysys demo-data "$OUT/data"
exec .venv/bin/raysys train jobs/quickstart.yaml "data=$OUT/data" "$@" --out "$OUT"
