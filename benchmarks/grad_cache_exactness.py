"""GradCache exactness, recorded: runs the exactness tests of
``tests/test_grad_cache.py`` and ``tests/test_m3_task.py`` (2 Ray Train
workers, negatives gathered across them) and writes what they measured to
``benchmarks/results/grad_cache_exactness.json``: per variant the loss curves
of GradCache and its reference, the largest loss difference, and the largest
difference of any trained weight.

The README's GradCache figures are read from this file. The tests themselves
assert the bounds; this script only keeps the numbers (and fails if a test does).

    .venv/bin/python benchmarks/grad_cache_exactness.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import RESULTS, ROOT, write_results

TESTS = {
    "every_zero_stage": "test_grad_cache.py::test_grad_cache_is_exact_under_every_zero_stage",
    "lora_checkpointing_accumulation_bf16": (
        "test_grad_cache.py::test_grad_cache_is_exact_with_lora_checkpointing_accumulation_and_bf16"
    ),
    "m3_zero2_zero3": "test_m3_task.py::test_m3_grad_cache_is_exact_under_zero_2_and_3",
}


def summarise(got: dict) -> dict:
    """Per variant: loss curves, max |loss diff| and max |weight diff| per reference."""
    out = {}
    for name, entry in got.items():
        losses = entry["losses"]
        row: dict = {"losses": losses}
        for other in (k for k in losses if k != "grad_cache"):
            row[f"max_loss_diff_{other}"] = max(
                abs(a - b) for a, b in zip(losses["grad_cache"], losses[other], strict=True)
            )
            row[f"max_weight_diff_{other}"] = entry[f"param_diff_{other}"]
        out[name] = row
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as record:
        env = {**os.environ, "RAYSYS_RECORD_DIR": record}
        ids = [f"tests/{t}" for t in TESTS.values()]
        subprocess.run([sys.executable, "-m", "pytest", "-q", *ids], cwd=ROOT, env=env, check=True)
        variants: dict = {}
        for test in TESTS:
            variants.update(summarise(json.loads((Path(record) / f"{test}.json").read_text())))
    res = {
        "setup": "tests/test_grad_cache.py: 2 Ray Train workers, tiny BERT (dropout 0.1) or tiny "
        "Llama (LoRA), per-worker batch 6 in GradCache chunks of 4 + 2, 5 steps; reference: one "
        "graph over the same chunks from the same RNG states ('reference'), or the standard "
        "one-pass step for the no-dropout variant; 'no_replay': GradCache without the RNG replay",
        "variants": variants,
    }
    path = write_results(
        RESULTS / "grad_cache_exactness.json", res, "benchmarks/grad_cache_exactness.py"
    )
    print(json.dumps(variants, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
