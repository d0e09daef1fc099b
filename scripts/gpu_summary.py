"""The summary of a ``scripts/device_gpu.sh`` call, rewritten after each step.

``python scripts/gpu_summary.py OUT [STEP]`` reads what the harness left in
``OUT`` (``steps.tsv``: one line per finished step; ``env.json``; the suite's
per-test record ``gpu-suite.jsonl``, else its JUnit XML; each benchmark's
JSON) and writes ``OUT/summary.json``: every
step with its status, time and limit, every suite test with its outcome, and
the benchmarks' results. With ``STEP`` it also prints that step's one-line
summary. It uses the standard library only (it runs on the GPU image).

A rehearsal (``RAYSYS_REHEARSE=1``) is marked so inside the file: its
numbers are CPU numbers at tiny shapes, not GPU numbers. The file records
the SHA-256 of the harness's files, so a committed rehearsal can be checked
against the code it ran (tests/test_gpu_harness.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import write_results  # noqa: E402

# The harness's own files, whose code a committed rehearsal must have run
# (tests/test_gpu_harness.py). The code they call (raysys, the suite's
# tests) is checked on every CI run by the suite's CPU dry run instead.
HARNESS = (
    "scripts/device_gpu.sh",
    "scripts/device_prep.sh",
    "scripts/rehearse_gpu.sh",
    "scripts/gpu_summary.py",
    "benchmarks/gpu.py",
    "tests/gpu/conftest.py",
)
# Every step of a full call, in order.
STEPS = ("setup", "suite", "encode", "train", "rerank")
REHEARSAL_NOTE = (
    "CPU rehearsal, not GPU numbers: scripts/device_gpu.sh run by scripts/rehearse_gpu.sh "
    "on the CPU at tiny shapes, in a venv with the GPU image's libraries"
)


def harness_hashes(root: Path = ROOT) -> dict[str, str]:
    """SHA-256 of each harness file (``missing`` for one not there)."""
    out = {}
    for rel in HARNESS:
        p = root / rel
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "missing"
    return out


def suite_results(xml: Path) -> dict[str, Any] | None:
    """Counts and per-test outcomes from pytest's JUnit XML (None if absent)."""
    if not xml.is_file():
        return None
    try:
        tree = ET.parse(xml)
    except ET.ParseError as e:
        return {"error": f"unreadable {xml.name}: {e}"}
    tests = []
    for case in tree.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = ((el.get("message") or "").splitlines() or [""])[0][:300]
                break
        tests.append(
            {
                "id": f"{case.get('classname', '')}::{case.get('name', '')}",
                "outcome": outcome,
                "seconds": round(float(case.get("time", 0) or 0), 2),
                **({"message": message} if message else {}),
            }
        )
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


def suite_lines(path: Path) -> dict[str, Any] | None:
    """Counts and per-test outcomes from the suite's own per-test record
    (tests/gpu/conftest.py; written as each test ends, so also for a suite
    cut short). None if absent or empty."""
    if not path.is_file():
        return None
    tests = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not tests:
        return None
    for t in tests:
        if not t.get("message"):
            t.pop("message", None)
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


def read_steps(tsv: Path) -> list[dict[str, Any]]:
    """The finished steps: name, status, exit code, seconds, limit."""
    steps = []
    if tsv.is_file():
        for line in tsv.read_text().splitlines():
            name, status, rc, secs, limit = line.split("\t")
            steps.append(
                {
                    "name": name,
                    "status": status,
                    "rc": int(rc),
                    "seconds": int(secs),
                    "limit_s": int(limit),
                }
            )
    return steps


def one_line(step: dict[str, Any], summary: dict[str, Any]) -> str:
    """The step's one-line summary."""
    head = (
        f"[step] {step['name']}: {step['status']} in {step['seconds']}s (limit {step['limit_s']}s)"
    )
    name = step["name"]
    if name == "suite" and summary.get("suite"):
        s = summary["suite"]
        if "counts" in s:
            c = s["counts"]
            head += " | " + ", ".join(f"{v} {k}" for k, v in sorted(c.items()))
            bad = [t["id"] for t in s["tests"] if t["outcome"] in ("failed", "error")]
            if bad:
                head += " | not passed: " + ", ".join(bad)
    elif name in summary.get("benchmarks", {}):
        parts = []
        for k, v in summary["benchmarks"][name].items():
            if isinstance(v, dict) and "status" in v:
                figure = ""
                if "ratio" in v:
                    figure = f" x{v['ratio']:.2f} vs its baseline"
                elif "tokens_per_s" in v:
                    figure = f" {v['tokens_per_s']:.0f} tok/s"
                parts.append(f"{k} {v['status']}{figure}")
        head += " | " + (", ".join(parts) if parts else "no results written")
    elif name == "setup" and summary.get("environment"):
        env = summary["environment"]
        head += " | " + ", ".join(f"{k} {v}" for k, v in env.items())
    return head


def summarise(out: Path) -> dict[str, Any]:
    """Build and write ``out/summary.json``; returns it."""
    rehearsal = os.environ.get("RAYSYS_REHEARSE") == "1"
    steps = read_steps(out / "steps.tsv")
    done = {s["name"] for s in steps}
    summary: dict[str, Any] = {
        "note": REHEARSAL_NOTE if rehearsal else "GPU run of scripts/device_gpu.sh",
        "rehearsal": rehearsal,
        "complete": all(s in done for s in STEPS),
        "all_ok": all(s in done for s in STEPS) and all(s["status"] == "ok" for s in steps),
        "budget_s": int(os.environ.get("RAYSYS_GPU_BUDGET_S", "0") or 0) or None,
        "steps": steps,
        "harness_sha256": harness_hashes(),
    }
    env = out / "env.json"
    if env.is_file():
        summary["environment"] = json.loads(env.read_text())
    suite = suite_lines(out / "gpu-suite.jsonl") or suite_results(out / "gpu-suite.xml")
    if suite is not None:
        summary["suite"] = suite
    benchmarks = {}
    for name in ("encode", "train", "rerank"):
        p = out / f"gpu-{name}.json"
        if p.is_file():
            data = json.loads(p.read_text())
            data.pop("written", None)
            benchmarks[name] = data.get(name, {})
            summary.setdefault("benchmark_device", data.get("device"))
    summary["benchmarks"] = benchmarks
    script = "scripts/rehearse_gpu.sh" if rehearsal else "scripts/device_gpu.sh"
    write_results(out / "summary.json", summary, script)
    return summary


def main() -> None:
    out = Path(sys.argv[1])
    summary = summarise(out)
    if len(sys.argv) > 2:
        step = next((s for s in summary["steps"] if s["name"] == sys.argv[2]), None)
        if step is not None:
            print(one_line(step, summary), flush=True)


if __name__ == "__main__":
    main()
