"""The GPU suite: run where CUDA is, skipped elsewhere.

``RAYSYS_GPU_SUITE_ON_CPU=1`` runs it on the CPU instead (gloo for NCCL, no
half-precision weights): a dry run of its code on a machine without a GPU,
which proves nothing about GPUs but keeps that code from rotting unseen.
``scripts/test.sh`` (so CI) sets it; only the FAISS GPU tests skip there,
and the dry run is marked ``slow`` (``-m "not slow"`` leaves it out).

``RAYSYS_GPU_SUITE_REPORT=FILE`` appends one JSON line per test to FILE as
each test ends (id, outcome, seconds, first line of the message): the record
``scripts/device_gpu.sh`` brings back per test, kept even when its time
limit cuts the suite short (JUnit XML is only written at the end).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ON_CPU = os.environ.get("RAYSYS_GPU_SUITE_ON_CPU") == "1"
HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(
        reason="no CUDA device and RAYSYS_GPU_SUITE_ON_CPU unset (see scripts/device_gpu.sh)"
    )
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                # The dry run belongs with the slow tests (DeepSpeed, real encodes).
                item.add_marker(pytest.mark.slow if ON_CPU else skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def half() -> str:
    """The half precision this device trains and infers in."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With RAYSYS_GPU_SUITE_REPORT set: one JSON line per test, at its end
    (a failed set-up or teardown counts as an error; a skip at set-up as a
    skip)."""
    path = os.environ.get("RAYSYS_GPU_SUITE_REPORT")
    if not path or HERE not in Path(report.fspath).resolve().parents:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = report.outcome if report.when == "call" else "error"
        if report.skipped:
            outcome = "skipped"
    elif report.when == "teardown" and report.failed:
        outcome = "error"
    else:
        return
    message = ""
    if not report.passed:
        longrepr = report.longrepr
        if isinstance(longrepr, tuple):  # a skip: (file, line, reason)
            message = str(longrepr[2])
        else:
            crash = getattr(longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(longrepr)
    line = {
        "id": report.nodeid,
        "outcome": outcome,
        "seconds": round(report.duration, 2),
        "message": message.splitlines()[0][:300] if message else "",
    }
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
