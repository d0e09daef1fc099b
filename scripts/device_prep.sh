#!/usr/bin/env bash
# Prepare .device/ (git-ignored) for a lent GPU machine; run here, then give
# .device to the device tool's `carry` and run scripts/device_gpu.sh there.
#
# The GPU image has Python 3.12, torch (CUDA 13), transformers, peft, pyarrow
# and sentence-transformers, but no deepspeed (nor its pydantic/hjson), no
# ray and no faiss, and it cannot download. The GPU suite and benchmarks do
# not use Ray (raysys.train.inprocess runs the train step without it), so
# what travels is:
#   .device/wheels/  deepspeed (built here from its sdist), the pure or
#                    cp312 wheels it needs that the image lacks, and pytest
#                    with pytest-timeout (the image is not known to have
#                    them), ~7 MB; with
#                    requirements.txt naming them, which scripts/device_gpu.sh
#                    installs by name. The binary ones (pydantic-core,
#                    msgpack) also come for this machine's Python, so the CPU
#                    rehearsal (scripts/rehearse_gpu.sh) installs the same
#                    list from the same folder;
#   .device/models/  config and tokenizer files of all-MiniLM-L6-v2 and
#                    SmolLM2-135M (weights are random-initialised there:
#                    throughput does not depend on them);
#   .device/data/    SciFact's corpus.jsonl, when ../shared has it.
# faiss-gpu wheels are over 100 MB with their CUDA libraries: GPU FAISS is
# not carried (its tests are to skip; scripts/device_gpu.sh reports each).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
W=.device/wheels
mkdir -p "$W" .device/models .device/data
rm -f "$W"/*.whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$W" deepspeed==0.19.8
# deepspeed's requirements the image lacks (hjson, pydantic: imported by
# deepspeed.runtime.config; einops, msgpack, py-cpuinfo: imported by some of
# its modules), and pytest with pytest-timeout for the GPU suite. The image's own torch, numpy,
# packaging, psutil and tqdm are used as they are.
PINS=(deepspeed==0.19.8 hjson==3.1.0 pydantic==2.12.5 pydantic-core==2.41.5
  annotated-types==0.7.0 typing-inspection==0.4.2 einops==0.8.2 msgpack==1.2.4
  py-cpuinfo==9.0.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
  pytest-timeout==2.4.0)
printf '%s\n' "${PINS[@]}" > "$W/requirements.txt"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$W" "${PINS[@]:1}"
# The same binary packages for the Python of the rehearsal (this machine's).
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$W" \
  pydantic-core==2.41.5 msgpack==1.2.4
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
