"""The GPU suite: run where CUDA is, skipped elsewhere.

``RAYSYS_GPU_SUITE_ON_CPU=1`` runs it on the CPU instead (gloo for NCCL, no
half-precision weights): a dry run of its code on a machine without a GPU,
which proves nothing about GPUs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ON_CPU = os.environ.get("RAYSYS_GPU_SUITE_ON_CPU") == "1"
HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="no CUDA device (the GPU suite; see scripts/device_gpu.sh)")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available() and not ON_CPU:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def half() -> str:
    """The half precision this device trains and infers in."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"
