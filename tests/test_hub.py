"""The SmolLM2 GGUF conversion cache under concurrent callers."""

import multiprocessing as mp
import time
from pathlib import Path

import raysys.models.hub as hub


def _slow_convert(dest: Path) -> None:
    dest.mkdir(parents=True)
    (dest / "config.json").write_text('{"model_type": "llama"}')
    time.sleep(0.5)
    (dest / "model.safetensors").write_bytes(b"x")
    with open(dest.parent / "conversions.log", "a") as f:
        f.write("converted\n")


def _resolve(q) -> None:
    hub._convert_smollm = _slow_convert
    out = hub.smollm_path()
    q.put(((out / "config.json").read_text(), (out / "model.safetensors").is_file()))


def test_concurrent_workers_convert_once_and_never_see_a_half_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSYS_CACHE", str(tmp_path))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_resolve, args=(q,)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert results == [('{"model_type": "llama"}', True)] * 3
    assert (tmp_path / "models" / "conversions.log").read_text() == "converted\n"
    assert not list((tmp_path / "models").glob("*.tmp*"))


def test_a_broken_leftover_folder_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSYS_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "_convert_smollm", _slow_convert)
    broken = tmp_path / "models" / "SmolLM2-135M-Instruct"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")  # no weights: an interrupted old run
    out = hub.smollm_path()
    assert (out / "model.safetensors").is_file()
