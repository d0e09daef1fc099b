"""Helpers shared by the benchmarks that drive the raysys CLI step by step."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_raysys(args: list[str], log: Path) -> float:
    """Run the raysys CLI from the repository root, its console into ``log``;
    returns minutes."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        subprocess.run(
            [sys.executable, "-m", "raysys.cli", *args], check=True, cwd=ROOT, stdout=f, stderr=f
        )
    return (time.perf_counter() - t0) / 60


def train_summary(train_dir: Path) -> dict:
    """Steps, tokens, examples and first/last loss of a training run."""
    h = json.loads((train_dir / "train_summary.json").read_text())["history"]
    return {
        "steps": len(h),
        "tokens": sum(x.get("tokens", 0) for x in h),
        "examples": sum(x.get("examples", 0) for x in h),
        "first_loss": h[0]["loss"] if h else None,
        "final_loss": h[-1]["loss"] if h else None,
    }
