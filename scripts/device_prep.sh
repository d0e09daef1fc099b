#!/usr/bin/env bash
# Prepare .device/ (git-ignored) for a lent GPU machine; run here, then give
# .device to the device tool's `carry` and run scripts/device_gpu.sh there.
#
# The GPU image has Python 3.12, torch (CUDA 13), transformers, peft, pyarrow
# and sentence-transformers, but no deepspeed (nor its pydantic/hjson), no
# ray and no faiss, and it cannot download. The GPU suite and benchmarks do
# not use Ray (raysys.train.inprocess runs the train step without it), so
# what travels is:
#   .device/wheels/  deepspeed (built here from its sdist) and the pure or
#                    cp312 wheels it needs that the image lacks (~4 MB);
#   .device/models/  config and tokenizer files of all-MiniLM-L6-v2 and
#                    SmolLM2-135M (weights are random-initialised there:
#                    throughput does not depend on them);
#   .device/data/    SciFact's corpus.jsonl, when ../shared has it.
# faiss-gpu wheels are over 100 MB with their CUDA libraries: GPU FAISS is
# not carried (its test skips).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
W=.device/wheels
mkdir -p "$W" .device/models .device/data
rm -f "$W"/*.whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$W" deepspeed==0.19.8
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$W" \
  hjson==3.1.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 \
  typing-inspection==0.4.2
"$PY" - <<'PY'
import shutil
from pathlib import Path

from raysys.models.hub import minilm_path, smollm_path

for name, src in (("minilm", minilm_path()), ("smollm2", smollm_path())):
    dst = Path(".device/models") / name
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix in (".json", ".txt", ".model") or f.name.startswith("tokenizer"):
            shutil.copy2(f, dst / f.name)
PY
if [ -f ../shared/data/scifact/corpus.jsonl ]; then
  cp ../shared/data/scifact/corpus.jsonl .device/data/
fi
du -sh .device
