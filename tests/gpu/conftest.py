"""The GPU suite: run where CUDA is, skipped elsewhere.

``RAYSYS_GPU_SUITE_ON_CPU=1`` runs it on the CPU instead (gloo for NCCL, no
half-precision weights): a dry run of its code on a machine without a GPU,
which proves nothing about GPUs but keeps that code from rotting unseen.
``scripts/test.sh`` (so CI) sets it; only the FAISS GPU tests skip there,
and the dry run is marked ``slow`` (``-m "not slow"`` leaves it out).
"""

from __future__ import annotations

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
