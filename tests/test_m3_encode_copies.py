"""M3 encode keeps the sparse and multi-vector outputs on the device across
micro-batches and copies them to the host once per batch (#34, fault 10):
the shard columns are the same as with the copy per micro-batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import raysys.representations.base as base
import raysys.representations.multivector as mv_mod
import raysys.representations.sparse as sp_mod
from raysys.models.m3 import REPRESENTATIONS
from raysys.representations import get_representation
from raysys.representations.sparse import terms_of
from tests.helpers import tiny_m3


def old_collect(name: str, out) -> list:  # noqa: ANN001
    """What collect returned per micro-batch before: rows copied to the host."""
    if name == "sparse":
        ids = out.ids.detach().cpu().numpy()
        w = out.weights.detach().float().cpu().numpy()
        return [terms_of(i, x) for i, x in zip(ids, w, strict=True)]
    vec = out.vectors.detach().to(torch.float16).cpu().numpy()
    mask = out.mask.detach().bool().cpu().numpy()
    return [v[m] for v, m in zip(vec, mask, strict=True)]


@pytest.fixture(scope="module")
def micro_batch_outputs(tiny_bert_dir) -> list[dict]:
    """A tiny M3 model's outputs for three micro-batches of different shapes."""
    m, tok, c = tiny_m3(tiny_bert_dir)
    batches = [
        ["w1 w2 w3 w4 w5 w6 w7 w1", "w2 w2 w9", "w4"],
        ["w5 w6 w7 w8", "w3"],
        ["w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w10", "w4 w4", "w1 w2", "the"],
    ]
    with torch.inference_mode():
        return [m.represent(**c.tokenize(tok, b, "passage")) for b in batches]


@pytest.mark.parametrize("name", ["sparse", "multivector"])
def test_one_host_copy_per_batch_and_the_same_columns(
    name: str, micro_batch_outputs: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    rep = get_representation(name)
    want = rep.to_columns([old_collect(name, o[name]) for o in micro_batch_outputs], "float16")
    copies, host_reads = [], []
    for mod in (sp_mod, mv_mod):  # raising=False: before the fix there was no to_host
        real = getattr(mod, "to_host", None)
        monkeypatch.setattr(
            mod, "to_host", lambda ts, real=real: copies.append(len(ts)) or real(ts), raising=False
        )
    for attr in ("cpu", "numpy", "tolist"):
        real_attr = getattr(torch.Tensor, attr)

        def spy(self, *a, _real=real_attr, _attr=attr, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            host_reads.append(_attr)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, spy)
    parts = [rep.collect(o[name], "float16") for o in micro_batch_outputs]
    assert host_reads == [] and copies == [], "collect copied a micro-batch to the host"
    got = rep.to_columns(parts, "float16")
    assert copies == [2 * len(parts)], copies  # one call: every part's two tensors
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].equals(want[k]), k
    rows = rep.combine(parts)
    assert len(rows) == sum(
        len(o[name].mask if name != "sparse" else o[name].ids) for o in micro_batch_outputs
    )
    if name == "multivector":
        assert all(r.dtype == np.float16 for r in rows)


@pytest.mark.parametrize("name", ["sparse", "multivector"])
def test_a_flush_part_way_keeps_the_shard_columns(
    name: str, micro_batch_outputs: list[dict]
) -> None:
    """Past ``DEVICE_HOLD_BYTES`` the encoder flushes what it holds to the host
    and goes on collecting: the columns must not change."""
    rep = get_representation(name)
    parts = [rep.collect(o[name], "float16") for o in micro_batch_outputs]
    want = rep.to_columns(parts, "float16")
    flushed = rep.flush(parts[:2])
    assert len(flushed) == 1 and all(base.device_bytes(p) == 0 for p in flushed)
    got = rep.to_columns(flushed + parts[2:], "float16")
    for k in want:
        assert got[k].equals(want[k]), k


def test_device_bytes_counts_device_tensors_only() -> None:
    on_device = torch.empty((4, 8), dtype=torch.float16, device="meta")
    assert base.device_bytes(on_device) == 64
    assert base.device_bytes(mv_mod.TokenVectors(on_device, on_device.bool())) == 64 + 32
    assert base.device_bytes(torch.zeros(4, 8)) == 0 and base.device_bytes([1, 2]) == 0


def test_the_encoder_flushes_past_the_hold_limit_and_keeps_the_columns(
    tiny_bert_dir, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EncodeShardActor's loop: with every collected byte counted as held on
    the device and a limit that one micro-batch passes, it flushes the
    token-level kinds after each micro-batch; the shard's columns are those
    of a run that never flushes (on the CPU nothing counts, so none do)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import raysys.index.encode as encode_mod
    from raysys.data.readers import CORPUS_SCHEMA
    from raysys.index.encode import EncodeShardActor
    from raysys.models.m3 import export_m3

    m, tok, c = tiny_m3(tiny_bert_dir)
    model = export_m3(m.backbone, m.heads_state(), tok, c, tmp_path / "m3")
    rows = [
        (f"d{i}", "", " ".join(f"w{(i * j) % 30}" for j in range(1 + i % 9))) for i in range(23)
    ]
    shard = tmp_path / "part-00000.parquet"
    pq.write_table(
        pa.table([pa.array(x) for x in zip(*rows, strict=True)], schema=CORPUS_SCHEMA), shard
    )

    monkeypatch.setattr(encode_mod, "_node_id", lambda: "")  # asking Ray would start it

    def encode(out: str) -> pa.Table:
        actor = EncodeShardActor(
            str(model),
            c.to_dict(),
            list(REPRESENTATIONS),
            "float16",
            str(tmp_path / out),
            {"micro_batch": 4, "torch_threads": torch.get_num_threads()},
        )
        return actor.encode_shard(str(shard))

    want = encode("plain")
    flushes: list[int] = []
    real_flush = {k: get_representation(k).flush for k in ("sparse", "multivector")}
    for mod in (sp_mod, mv_mod):
        cls = mod.SparseRepresentation if mod is sp_mod else mod.MultiVectorRepresentation
        monkeypatch.setattr(
            cls,
            "flush",
            lambda self, parts: flushes.append(len(parts)) or real_flush[self.name](parts),
        )
    monkeypatch.setattr(
        base,
        "device_bytes",
        lambda p: sum(
            t.numel() * t.element_size()
            for t in (
                [p]
                if isinstance(p, torch.Tensor)
                else vars(p).values()
                if hasattr(p, "__dict__")
                else []
            )
            if isinstance(t, torch.Tensor)
        ),
    )
    monkeypatch.setattr(base, "DEVICE_HOLD_BYTES", 1)
    got = encode("flushed")
    assert len(flushes) >= 2 * 5, flushes  # both kinds, after every one of the >= 6 micro-batches
    assert max(flushes) == 2  # the previous flush's host list and the new micro-batch
    assert got.column_names == want.column_names
    for k in want.column_names:
        assert got.column(k).equals(want.column(k)), k
