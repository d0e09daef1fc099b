#!/usr/bin/env bash
# The main job on a local, embedded Ray: sets up .venv, builds the offline demo
# dataset (docstrings of the Python install as a BEIR folder) and runs the
# whole pipeline on it: base model evaluated -> fine-tune (Ray Train +
# DeepSpeed) -> encode (Ray Data) -> IVF-PQ index -> search -> evaluate, with
# a report comparing base and fine-tuned.
# Extra arguments are config overrides, e.g. train.max_steps=10.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT="${OUT:-runs/quickstart}"
# DEMO_SOURCES=small / DEMO_PAIRS=N: a smaller corpus (the tests' short demo).
.venv/bin/raysys demo-data "$OUT/data" --size "${DEMO_SOURCES:-full}" \
  --max-pairs "${DEMO_PAIRS:-4000}" > /dev/null
exec .venv/bin/raysys pipeline jobs/quickstart.yaml "data=$OUT/data" "$@" --out "$OUT"
