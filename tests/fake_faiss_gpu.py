"""A stand-in for faiss-gpu's entry points on a faiss-cpu install, for tests.

``index_cpu_to_gpu`` records the ``GpuClonerOptions`` it receives and checks
an IVF-PQ as GPU FAISS (no cuVS) does before it copies it, raising its
messages (faiss 1.15, ``faiss/gpu``):

- ``GpuIndexIVFPQ::copyFrom``: "GPU: only pq.nbits == 8 is supported";
- ``GpuIndexIVFPQ::verifyPQSettings_``: the sub-quantiser count must pass
  ``IVFPQ::isSupportedPQCodeLength`` (1-4, 8, 12, ..., 48, 56, 64, 96), and
  the lookup table (4 B, or 2 B with ``useFloat16``, x M x 2^nbits) must fit
  in the device's ``sharedMemPerBlock`` (48 KiB).

The "GPU" copy is a CPU clone (train, add and search run for real, on the
CPU); ``index_gpu_to_cpu`` hands back a clone of it.
"""

from __future__ import annotations

from typing import Any

SHARED_MEM_PER_BLOCK = 48 * 1024
SUPPORTED_PQ_M = {1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96}


class FakeClonerOptions:
    """``faiss.GpuClonerOptions`` with its defaults (GpuClonerOptions.h)."""

    def __init__(self) -> None:
        self.indicesOptions = 3  # INDICES_64_BIT
        self.useFloat16CoarseQuantizer = False
        self.useFloat16 = False
        self.usePrecomputed = False
        self.reserveVecs = 0
        self.storeTransposed = False
        self.verbose = False
        self.use_cuvs = False
        self.allowCpuCoarseQuantizer = False


class FakeGpuResources:
    """``faiss.StandardGpuResources``: nothing to hold."""


class FakeGpuFaiss:
    """The GPU entry points, bound to one real (CPU) ``faiss`` module."""

    def __init__(self, faiss: Any) -> None:
        self.faiss = faiss
        self.options: list[Any] = []  # what each index_cpu_to_gpu call received
        self.refused: list[str] = []  # the messages it raised

    def attributes(self) -> dict[str, Any]:
        """Name -> stand-in, to set on the ``faiss`` module."""
        return {
            "StandardGpuResources": FakeGpuResources,
            "GpuClonerOptions": FakeClonerOptions,
            "get_num_gpus": lambda: 1,
            "index_cpu_to_gpu": self.index_cpu_to_gpu,
            "index_gpu_to_cpu": self.index_gpu_to_cpu,
        }

    def index_cpu_to_gpu(
        self, res: Any, device: int, index: Any, options: Any | None = None
    ) -> Any:
        self.options.append(options)
        why = self.check(index, options)
        if why:
            self.refused.append(why)
            # As FAISS_THROW_IF_NOT_FMT words it.
            raise RuntimeError(
                "Error in void faiss::gpu::GpuIndexIVFPQ::verifyPQSettings_() const at "
                "faiss/gpu/GpuIndexIVFPQ.cu:607: Error: '<check>' failed: " + why
            )
        return self.faiss.clone_index(index)

    def index_gpu_to_cpu(self, index: Any) -> Any:
        return self.faiss.clone_index(index)

    def check(self, index: Any, options: Any | None) -> str:
        """What GPU FAISS would refuse about ``index`` ("" if nothing)."""
        faiss = self.faiss
        try:
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        except RuntimeError:
            return ""
        if not isinstance(ivf, faiss.IndexIVFPQ):
            return ""
        m, nbits = ivf.pq.M, ivf.pq.nbits
        if nbits != 8:
            return "GPU: only pq.nbits == 8 is supported"
        if m not in SUPPORTED_PQ_M:
            return f"Number of bytes per encoded vector / sub-quantizers ({m}) is not supported"
        table = (2 if options is not None and options.useFloat16 else 4) * m * 2**nbits
        if table > SHARED_MEM_PER_BLOCK:
            return (
                f"Device 0 has {SHARED_MEM_PER_BLOCK} bytes of shared memory, while "
                f"{nbits} bits per code and {m} sub-quantizers requires {table} bytes. "
                "Consider useFloat16LookupTables and/or reduce parameters"
            )
        return ""


def install() -> FakeGpuFaiss:
    """Set the stand-ins on this process's ``faiss`` (a Ray worker setup hook)."""
    from raysys.index.faiss_lib import load_faiss

    faiss = load_faiss()
    fake = FakeGpuFaiss(faiss)
    for name, value in fake.attributes().items():
        setattr(faiss, name, value)
    return fake
