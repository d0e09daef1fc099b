"""The GPU FAISS paths, checked on the CPU (issue #34, faults 2 and 3).

- Without FAISS (the lent GPU image has none, nor Ray), ``raysys.index.build``
  still imports and the GPU suite's FAISS tests skip, saying why.
- GPU IVF-PQ is cloned with the options its PQ needs (float16 lookup tables
  over 48 sub-quantisers); an index GPU FAISS refuses runs on the CPU with a
  console warning and the reason in the manifest's ``device``. faiss-cpu has
  no GPU, so :mod:`tests.fake_faiss_gpu` stands in for faiss-gpu's entry
  points and refuses what GPU FAISS refuses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.fake_faiss_gpu import FakeGpuFaiss

REPO = Path(__file__).resolve().parents[1]
GPU_FAISS_TESTS = [
    "tests/gpu/test_gpu_inference.py::test_faiss_ivfpq_on_gpu",
    "tests/gpu/test_gpu_inference.py::test_index_trains_and_adds_on_the_gpu",
]


def _run_without(modules: list[str], code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python in which ``modules`` do not import."""
    blocker = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )


# -- fault 2: no FAISS, no Ray -------------------------------------------------------


def test_the_index_build_module_imports_without_faiss_or_ray():
    """Importing it needs neither; FAISS's absence shows on first use, as
    load_faiss's error."""
    proc = _run_without(
        ["faiss", "ray"],
        """
        import raysys.index.build as build
        print("RESULT", build.auto_factory(100_000, 384, gpu=True)[0])
        try:
            build.faiss
        except Exception as e:
            print("RESULT", type(e).__name__, e)
        """,
    )
    lines = [x.split(" ", 1)[1] for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout + proc.stderr[-3000:]
    assert lines[0] == "IVF1024,PQ96x8np"
    assert lines[1].startswith("UserError FAISS is not installed")


def test_the_gpu_suites_faiss_tests_skip_without_faiss_or_ray(tmp_path):
    """The GPU suite (dry run on the CPU) on an image without FAISS and Ray:
    its FAISS tests are skipped with the reason, not errors."""
    import xml.etree.ElementTree as ET

    report = tmp_path / "report.xml"
    proc = _run_without(
        ["faiss", "ray"],
        f"""
        import pytest
        sys.exit(pytest.main(["-p", "no:cacheprovider", "-q", "--junitxml={report}",
                              "--basetemp={tmp_path / "t"}", *{GPU_FAISS_TESTS!r}]))
        """,
        RAYSYS_GPU_SUITE_ON_CPU="1",
        CUDA_VISIBLE_DEVICES="",
    )
    out = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0 and "2 skipped" in out, out
    cases = {c.get("name"): c for c in ET.parse(report).iter("testcase")}
    assert sorted(cases) == sorted(n.split("::")[1] for n in GPU_FAISS_TESTS), out
    for name, case in cases.items():
        outcome = [child.tag for child in case]
        assert outcome == ["skipped"], f"{name}: {outcome}\n{out}"
        assert "no FAISS here: FAISS is not installed" in case[0].get("message"), out


# -- fault 3: the cloner options, and a loud fallback --------------------------------


@pytest.fixture
def fake_gpu(monkeypatch) -> FakeGpuFaiss:
    """faiss-gpu's entry points on this faiss-cpu, refusing what GPU FAISS refuses."""
    from raysys.index.faiss_lib import load_faiss

    faiss = load_faiss()
    fake = FakeGpuFaiss(faiss)
    for name, value in fake.attributes().items():
        monkeypatch.setattr(faiss, name, value, raising=False)
    return fake


def test_float16_lookup_tables_exactly_where_faiss_gpu_needs_them():
    """The rule against faiss/gpu/impl/IVFPQ.cu's list: of the supported
    sub-quantiser counts, 56, 64 and 96 are "only supported with float16";
    and the GPU auto factory always takes 8-bit codes (the only width GPU
    IVF-PQ copies), also for the smallest IVF corpora."""
    from raysys.index.build import GPU_PQ_M, auto_factory, gpu_needs_float16_lookup

    assert [m for m in GPU_PQ_M if gpu_needs_float16_lookup(m)] == [56, 64, 96]
    for n in (1000, 1023, 5000):
        assert auto_factory(n, 384, gpu=True)[1]["pq_nbits"] == 8


@pytest.mark.parametrize(("dim", "m"), [(384, 96), (768, 96), (1024, 64), (4096, 96)])
def test_the_gpu_clone_of_the_auto_factory_gets_float16_lookup_tables(fake_gpu, dim, m):
    """index.use_gpu's auto factory picks more than 48 sub-quantisers; its
    clone must ask for float16 lookup tables, else GPU FAISS refuses it."""
    from raysys.index.build import _to_gpu, auto_factory
    from raysys.index.faiss_lib import load_faiss

    faiss = load_faiss()
    factory, chosen = auto_factory(1_000_000, dim, gpu=True)
    assert chosen["pq_m"] == m
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    got = _to_gpu(faiss.StandardGpuResources(), index)
    assert len(fake_gpu.options) == 1
    options = fake_gpu.options[0]
    assert options is not None and options.useFloat16, f"{factory}: {fake_gpu.refused}"
    # Nothing else changed from FAISS's defaults.
    assert not options.useFloat16CoarseQuantizer and not options.usePrecomputed
    gpu, why = got
    assert gpu is not None and why == "" and not fake_gpu.refused


def test_a_gpu_clone_keeps_faiss_defaults_where_float16_is_not_needed(fake_gpu):
    from raysys.index.build import gpu_cloner_options
    from raysys.index.faiss_lib import load_faiss

    faiss = load_faiss()
    for factory in ("IVF16,PQ48x8np", "Flat", "IVF16,Flat", "IVF16,PQ16x4np"):
        index = faiss.index_factory(96, factory, faiss.METRIC_INNER_PRODUCT)
        assert not gpu_cloner_options(index).useFloat16, factory
    index = faiss.index_factory(112, "IVF16,PQ56x8np", faiss.METRIC_INNER_PRODUCT)
    assert gpu_cloner_options(index).useFloat16


def _untrained(factory: str, dim: int) -> bytes:
    from raysys.index.faiss_lib import load_faiss

    faiss = load_faiss()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    return faiss.serialize_index(index).tobytes()


def test_training_that_falls_back_to_the_cpu_says_so(fake_gpu, caplog):
    """An index GPU FAISS refuses (4-bit codes) trains on the CPU; the task
    warns and returns why, for the driver's warning and the manifest."""
    from raysys.index.build import train_on_gpu

    x = np.random.default_rng(0).standard_normal((400, 16)).astype(np.float32)
    with caplog.at_level("WARNING", logger="raysys.index.build"):
        out = train_on_gpu(_untrained("IVF4,PQ8x4np", 16), x)
    assert fake_gpu.refused == ["GPU: only pq.nbits == 8 is supported"]
    trained, device = out
    assert device == {"used": "cpu", "why": "GPU: only pq.nbits == 8 is supported"}
    assert "falls back to the CPU" in caplog.text and "only pq.nbits == 8" in caplog.text
    from raysys.index.faiss_lib import load_faiss

    assert load_faiss().deserialize_index(np.frombuffer(trained, np.uint8)).is_trained


def test_an_add_that_falls_back_to_the_cpu_is_a_console_warning_and_in_the_manifest(
    fake_gpu, monkeypatch, tmp_path, capsys
):
    """A GPU add task (run here outside Ray) that GPU FAISS refuses adds on the
    CPU and reports it; the driver's device record says so, with FAISS's
    reason, and warns on the console."""
    import benchmarks.index_memory as index_memory
    from raysys.console import session
    from raysys.index.build import _add_shard, _device_record
    from raysys.index.faiss_lib import load_faiss

    faiss = load_faiss()
    monkeypatch.setattr(index_memory, "DIM", 16)
    index_memory.write_shards(tmp_path, 300, 300)
    index = faiss.index_factory(16, "IVF4,PQ8x4np", faiss.METRIC_INNER_PRODUCT)
    index.train(np.random.default_rng(0).standard_normal((400, 16)).astype(np.float32))
    trained = faiss.serialize_index(index).tobytes()
    out = _add_shard(
        trained, str(tmp_path), "part-00000.parquet", 0, str(tmp_path / "p"), None, True
    )
    assert out["device"]["used"] == "cpu" and "only pq.nbits == 8" in out["device"]["why"]
    assert (
        faiss.deserialize_index(np.frombuffer((tmp_path / "p").read_bytes(), np.uint8)).ntotal
        == 300
    )

    capsys.readouterr()
    with session(None):
        record = _device_record(True, {"used": "gpu"}, [out["device"], {"used": "gpu"}])
    err = capsys.readouterr().err
    assert record == {
        "requested": "gpu",
        "used": "gpu and cpu",
        "train": "gpu",
        "add": {"gpu": 1, "cpu": 1},
        "why": out["device"]["why"],
    }
    assert "warning: index.use_gpu=true, but 1 of 2 shards were added on the CPU" in err
    assert _device_record(True, None, [{"used": "gpu"}]) == {
        "requested": "gpu",
        "used": "gpu",
        "train": "none (trained already)",
        "add": {"gpu": 1, "cpu": 0},
    }
    assert _device_record(False, None, [None]) == {"requested": "cpu", "used": "cpu"}


_BUILD = r"""
import json, sys
from pathlib import Path
import ray
import benchmarks.index_memory as index_memory
from raysys.cli import main
from raysys.index.encode import EMB_DIR

tmp = sys.argv[1]
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
         runtime_env={"worker_process_setup_hook": "tests.fake_faiss_gpu.install"})
index_memory.DIM = 128
emb = Path(tmp) / "enc" / EMB_DIR
emb.mkdir(parents=True)
index_memory.write_shards(emb, 1200, 600)
for name, factory in (("auto", "auto"), ("refused", "IVF16,PQ16x4np")):
    print(f"BUILD {name}", file=sys.stderr, flush=True)
    rc = main(["index", "-", "index.use_gpu=true", f"index.factory={factory}",
               f"--embeddings={tmp}/enc", f"--out={tmp}/{name}"])
    print(f"RC {name} {rc}", file=sys.stderr, flush=True)
    m = json.load(open(f"{tmp}/{name}/manifest.json"))
    print("RESULT", json.dumps({"name": name, "factory": m["factory"], "device": m.get("device")}))
"""


@pytest.mark.slow  # a Ray cluster (with one pretend GPU) in a subprocess
def test_a_gpu_index_build_records_its_device_and_warns_on_a_cpu_fallback(tmp_path):
    """`raysys index` with index.use_gpu=true, GPU FAISS faked in every Ray
    worker: the auto factory (64 sub-quantisers at 128-d) trains and adds on
    the "GPU" with no warning; a factory GPU FAISS refuses (4-bit codes)
    builds on the CPU, warns on the console and says why in the manifest."""
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    out = proc.stdout + proc.stderr[-5000:]
    results = {
        r["name"]: r
        for r in (json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    }
    assert proc.returncode == 0 and set(results) == {"auto", "refused"}, out
    auto, refused = results["auto"], results["refused"]
    assert auto["factory"].endswith("PQ64x8np"), auto
    assert auto["device"] == {
        "requested": "gpu",
        "used": "gpu",
        "train": "gpu",
        "add": {"gpu": 2, "cpu": 0},
    }, auto
    assert refused["device"]["used"] == "cpu" and refused["device"]["train"] == "cpu", refused
    assert refused["device"]["add"] == {"gpu": 0, "cpu": 2}
    assert "only pq.nbits == 8" in refused["device"]["why"]
    before, after = proc.stderr.split("BUILD refused")
    assert "warning: index.use_gpu" not in before, before[-3000:]
    assert "warning: index.use_gpu=true, but GPU FAISS cannot hold IVF16,PQ16x4np" in after
    assert "warning: index.use_gpu=true, but 2 of 2 shards were added on the CPU" in after
