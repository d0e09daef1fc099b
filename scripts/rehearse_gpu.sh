#!/usr/bin/env bash
# CPU rehearsal of scripts/device_gpu.sh (issue #34): the same script, the
# same carried wheels (.device/wheels from scripts/device_prep.sh) and the
# same order (suite, then every benchmark step), on the CPU with tiny shapes,
# in .rehearse-venv (git-ignored), whose libraries match the GPU image:
# transformers 5.17.0, sentence-transformers 6.0.1, peft, pyarrow, numpy, and
# NO ray, faiss, deepspeed or pytest (deepspeed and pytest come only from the
# carried wheels, as there). Differences from the image, on purpose or
# forced: torch is this machine's CPU build (2.13.0+cpu, not 2.11.0+cu130),
# and Python is 3.11 (no CPU torch wheel for 3.12 is on the registry), so the
# two binary carried wheels are taken in their cp311 builds.
#
#   scripts/rehearse_gpu.sh [suite|bench|all] [--record]
#
# Results go to $OUT (default .rehearse-out/). --record copies the summary
# and the log to benchmarks/results/gpu_rehearsal_cpu.{json,log}.
# Building the venv took 5-9 minutes here the first time (mostly downloads:
# sentence-transformers brings scipy and scikit-learn), .device 1-2 more; the
# rehearsal itself took 17 minutes on 2 busy cores, half of it the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
what=all
record=0
for a in "$@"; do
  case "$a" in
    --record) record=1 ;;
    suite | bench | all) what="$a" ;;
    *) echo "usage: $0 [suite|bench|all] [--record]" >&2; exit 2 ;;
  esac
done
V=.rehearse-venv
BASE="${RAYSYS_REHEARSE_PYTHON:-python3}"
# The GPU image's libraries (../shared/STACK.md), and this machine's CPU torch.
PINS="torch==2.13.0+cpu transformers==5.17.0 sentence-transformers==6.0.1 peft==0.21.2 pyarrow==26.0.1 numpy"
if [ ! -x "$V/bin/python" ] || [ "$(cat "$V/.pins" 2>/dev/null)" != "$PINS" ]; then
  rm -rf "$V"
  "$BASE" -m venv "$V"
  # shellcheck disable=SC2086
  "$V/bin/python" -m pip install -q $PINS
  echo "$PINS" > "$V/.pins"
fi
# Fail if the venv has what the image lacks: the rehearsal would hide it.
"$V/bin/python" - <<'PY'
import importlib.util
import sys

extra = [m for m in ("ray", "faiss", "deepspeed", "pytest") if importlib.util.find_spec(m)]
if extra:
    sys.exit(f"the rehearsal venv has {extra}, which the GPU image lacks")
PY
# .device as scripts/device_prep.sh makes it now (made again when that changed).
if [ ! -f .device/wheels/requirements.txt ] \
  || [ scripts/device_prep.sh -nt .device/wheels/requirements.txt ]; then
  bash scripts/device_prep.sh
fi
OUT="${OUT:-$PWD/.rehearse-out}"
mkdir -p "$OUT"
# What an earlier rehearsal left there (its models are kept and reused).
rm -f "$OUT"/{summary.json,env.json,steps.tsv,gpu-suite.jsonl,gpu-suite.xml} "$OUT"/*.log \
  "$OUT"/gpu-{encode,train,rerank}.json
set +e
OUT="$OUT" RAYSYS_REHEARSE=1 RAYSYS_PY="$PWD/$V/bin/python" \
  RAYSYS_SITE="$PWD/.rehearse-site" bash scripts/device_gpu.sh "$what" 2>&1 | tee "$OUT/device_gpu.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$record" = 1 ]; then
  cp "$OUT/summary.json" benchmarks/results/gpu_rehearsal_cpu.json
  # Temporary folders' names differ between runs: keep the log comparable.
  sed -E 's#/tmp/[A-Za-z0-9_.-]+#/tmp/...#g' "$OUT/device_gpu.log" \
    > benchmarks/results/gpu_rehearsal_cpu.log
fi
exit "$rc"
