"""Results files: every JSON in ``benchmarks/results/`` is written here, dated.

``write_results(path, data, script)`` stamps ``data["written"]`` with the UTC
date, the script that wrote it, the git commit of the code it measured (and
whether the tree had uncommitted changes) and the machine, then writes it
atomically. ``python benchmarks/_results.py --backfill`` dates the files
written before the stamp existed from their last commit (marked as such).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def stamp(script: str) -> dict:
    """When, by what and on which code and machine a result was measured."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "script": script,
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--", "raysys", "benchmarks")),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
    }


def write_results(path: str | Path, data: dict, script: str) -> Path:
    """Write ``data`` with a ``written`` stamp to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {**data, "written": stamp(script)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def backfill(scripts: dict[str, str | None]) -> list[str]:
    """Date results files that carry no stamp from the commit that last changed
    them (``"backfilled": true``); returns the files changed."""
    changed = []
    for name, script in scripts.items():
        path = RESULTS / name
        data = json.loads(path.read_text())
        if "written" in data:
            continue
        rel = str(path.relative_to(ROOT))
        data["written"] = {
            "date": _git("log", "-1", "--format=%cI", "--", rel),
            "script": script,
            "commit": _git("log", "-1", "--format=%H", "--", rel),
            "backfilled": True,
            "note": "dated from the commit that last changed this file; written before stamps"
            + (" existed" if script else ", by hand from run logs, not by a script"),
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        changed.append(name)
    return changed


# Which script writes which results file (the README's numbers point here too).
WRITERS: dict[str, str | None] = {
    "adapt_scifact.json": "benchmarks/adapt_scifact.py",
    "encode_throughput.json": "benchmarks/encode_throughput.py",
    "grad_cache.json": "benchmarks/grad_cache.py",
    "grad_cache_gpu.json": "benchmarks/grad_cache.py",
    "gpu.json": "benchmarks/gpu.py",
    # CPU rehearsal of scripts/device_gpu.sh (scripts/gpu_summary.py writes it).
    "gpu_rehearsal_cpu.json": "scripts/rehearse_gpu.sh",
    "grad_cache_exactness.json": "benchmarks/grad_cache_exactness.py",
    "grad_cache_scifact.json": "benchmarks/grad_cache_scifact.py",
    "index_memory.json": "benchmarks/index_memory.py",
    "m3_maxsim_memory.json": "benchmarks/m3_maxsim_memory.py",
    "m3_scifact.json": "benchmarks/m3_scifact.py",
    "mutation_check.json": "scripts/mutation_check.py",
    "rerank_throughput.json": "benchmarks/rerank_throughput.py",
    "scale.json": "benchmarks/scale.py",
    "scifact_rerank.json": "benchmarks/scifact_rounds.py",
    "train_corpus.json": "benchmarks/train_corpus.py",
    "train_throughput.json": "benchmarks/train_throughput.py",
    "demo/results.json": "scripts/demo.sh (runs/quickstart/results.json, copied)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backfill", action="store_true", help="date unstamped results files")
    a = ap.parse_args()
    if a.backfill:
        present = {k: v for k, v in WRITERS.items() if (RESULTS / k).is_file()}
        for name in backfill(present):
            print(f"dated {name}")


if __name__ == "__main__":
    main()
