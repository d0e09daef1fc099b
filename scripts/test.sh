#!/usr/bin/env bash
# The test command: sets up .venv, then runs ruff and the whole pytest suite.
# Extra arguments go to pytest (e.g. -m "not slow" for the quick unit tests).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh || exit 1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 RAY_DEDUP_LOGS=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/raysys/torch_extensions}"
# tests/gpu runs here too: on a GPU where there is one, else as a dry run on
# the CPU (about 1 minute; its FAISS GPU tests skip), so its code cannot rot
# unseen. RAYSYS_GPU_SUITE_ON_CPU=0 skips it without a GPU.
export RAYSYS_GPU_SUITE_ON_CPU="${RAYSYS_GPU_SUITE_ON_CPU:-1}"
.venv/bin/ruff check raysys tests benchmarks || exit 1
.venv/bin/python -m pytest -ra --durations=25 "$@"
rc=$?
# pytest exits 5 when nothing was collected: that is a failure here too.
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
