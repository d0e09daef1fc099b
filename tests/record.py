"""What a test measured, kept for a results file.

``RAYSYS_RECORD_DIR`` (set by a script in ``benchmarks/``, e.g.
``grad_cache_exactness.py``) gets one JSON file per call; unset, nothing is
written. The test's own assertions stay the guard; this only keeps the numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def record(name: str, measured: dict) -> None:
    """Write ``measured`` to ``$RAYSYS_RECORD_DIR/<name>.json`` when that is set."""
    where = os.environ.get("RAYSYS_RECORD_DIR")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / f"{name}.json").write_text(json.dumps(measured, indent=2))
