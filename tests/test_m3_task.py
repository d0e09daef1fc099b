"""The m3 training task (#18) and distillation from teacher scores: the loss
against a hand computation, teacher scores in groups, and training, GradCache
and export on 2 Ray workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raysys.config import ConfigError, load_config
from raysys.data.groups import read_groups
from raysys.data.readers import DataError
from raysys.train.tasks.m3 import M3Task
from raysys.train.tasks.retrieve import RetrievalBatch, RetrieveTask
from tests.helpers import assert_loss_falls
from tests.record import record


def _overrides(model: Path, data: Path, *extra: str) -> list[str]:
    return [
        f"model={model}",
        f"data.groups={data / 'groups.jsonl'}",
        f"data.corpus={data / 'corpus.jsonl'}",
        "contract.pooling=cls",
        "contract.query_max_len=8",
        "contract.passage_max_len=16",
        "train.task=m3",
        "train.per_device_queries=4",
        "train.group_size=3",
        "train.loss.temperature=0.5",
        *extra,
    ]


def _reps(b: int, g: int, vocab: int = 11, d: int = 4, lq: int = 8, lp: int = 16) -> dict:
    torch.manual_seed(0)
    n = b * g

    def tokens(rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        v = F.normalize(torch.randn(rows, length, d), dim=-1)
        mask = torch.zeros(rows, length, dtype=torch.int8)
        for i in range(rows):
            mask[i, : 1 + i % 3] = 1
        return v, mask

    qm, qmm = tokens(b, lq)
    pm, pmm = tokens(n, lp)
    return {
        "q_dense": F.normalize(torch.randn(b, d), dim=-1),
        "q_sparse": torch.relu(torch.randn(b, vocab)),
        "q_mv": qm,
        "q_mv_mask": qmm,
        "p_dense": F.normalize(torch.randn(n, d), dim=-1),
        "p_sparse": torch.relu(torch.randn(n, vocab)),
        "p_mv": pm,
        "p_mv_mask": pmm,
    }


def _batch(b: int, g: int, teacher: torch.Tensor | None = None) -> RetrievalBatch:
    return RetrievalBatch(
        queries={},
        passages={},
        passage_ids=[f"p{i}" for i in range(b * g)],
        query_positive_ids=[{f"p{i * g}"} for i in range(b)],
        teacher=teacher,
    )


def _by_hand(r: dict, b: int, g: int, t: float, distill: bool, teacher=None) -> float:  # noqa: ANN001
    """BGE-M3's loss written out with plain loops."""
    s_d = r["q_dense"] @ r["p_dense"].T
    s_s = r["q_sparse"] @ r["p_sparse"].T
    s_m = torch.zeros(b, b * g)
    for i in range(b):
        qv = r["q_mv"][i][r["q_mv_mask"][i].bool()]
        for j in range(b * g):
            pv = r["p_mv"][j][r["p_mv_mask"][j].bool()]
            s_m[i, j] = (qv @ pv.T).max(dim=1).values.mean()
    ens = s_d + 0.3 * s_s + s_m
    target = torch.arange(b) * g

    def ce(s: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(s / t, target)

    loss = (ce(s_d) + 0.1 * ce(s_s) + ce(s_m) + ce(ens)) / 4
    if distill:
        p = torch.softmax(ens / t, dim=1)

        def kd(s: torch.Tensor) -> torch.Tensor:
            return -(p * torch.log_softmax(s / t, dim=1)).sum(1).mean()

        loss = (loss + (kd(s_d) + 0.1 * kd(s_s) + kd(s_m)) / 3) / 2
    if teacher is not None:
        pt = torch.softmax(teacher, dim=1)
        cols = torch.arange(b)[:, None] * g + torch.arange(g)

        def tkd(s: torch.Tensor) -> torch.Tensor:
            return -(pt * torch.log_softmax(s.gather(1, cols) / t, dim=1)).sum(1).mean()

        loss = loss + 0.5 * (tkd(s_d) + 0.1 * tkd(s_s) + tkd(s_m)) / 3
    return float(loss)


def test_m3_loss_by_hand_with_self_distillation_from_its_start_step(tiny_bert_dir, toy_data):
    b, g = 4, 3
    task = M3Task(
        load_config(None, _overrides(tiny_bert_dir, toy_data, "train.m3.self_distill_start=1"))
    )
    r = _reps(b, g)
    task.step = 0  # before the start step: no self-distillation
    got = task.loss_from_reps([r], _batch(b, g), torch.device("cpu"))
    assert got.value == pytest.approx(_by_hand(r, b, g, 0.5, distill=False), rel=1e-5)
    task.step = 1
    got = task.loss_from_reps([r], _batch(b, g), torch.device("cpu"))
    assert got.value == pytest.approx(_by_hand(r, b, g, 0.5, distill=True), rel=1e-5)
    # Split into two chunks (GradCache's view): the same loss.
    halves = [{k: v[: 2 if k.startswith("q") else 6] for k, v in r.items()}]
    halves.append({k: v[2:] if k.startswith("q") else v[6:] for k, v in r.items()})
    assert task.loss_from_reps(halves, _batch(b, g), torch.device("cpu")).value == pytest.approx(
        got.value, rel=1e-6
    )
    # Distillation from a teacher's scores over each group.
    teacher = torch.randn(b, g)
    task = M3Task(
        load_config(None, _overrides(tiny_bert_dir, toy_data, "train.loss.distill_weight=0.5"))
    )
    task.step = 0
    got = task.loss_from_reps([r], _batch(b, g, teacher), torch.device("cpu"))
    assert got.value == pytest.approx(_by_hand(r, b, g, 0.5, True, teacher), rel=1e-5)


def test_retriever_distillation_by_hand(tiny_bert_dir, toy_data):
    b, g, t = 3, 4, 0.05
    cfg = load_config(
        None,
        _overrides(
            tiny_bert_dir,
            toy_data,
            "train.task=retrieve",
            f"train.group_size={g}",
            f"train.loss.temperature={t}",
            "train.loss.distill_weight=2.0",
            "train.loss.teacher_temperature=0.5",
        ),
    )
    torch.manual_seed(1)
    q, p = F.normalize(torch.randn(b, 8), dim=-1), F.normalize(torch.randn(b * g, 8), dim=-1)
    teacher = torch.randn(b, g)
    got = RetrieveTask(cfg).loss_from_reps(
        [{"q": q, "p": p}], _batch(b, g, teacher), torch.device("cpu")
    )
    s = q @ p.T / t
    nce = F.cross_entropy(s, torch.arange(b) * g)
    own = torch.stack([s[i, i * g : (i + 1) * g] for i in range(b)])
    kd = -(torch.softmax(teacher / 0.5, 1) * torch.log_softmax(own, 1)).sum(1).mean()
    assert got.value == pytest.approx(float(nce + 2.0 * kd), rel=1e-5)


def test_teacher_scores_in_groups(tmp_path):
    rows = [
        {"query_id": "a", "query": "x", "positives": ["d1"], "negatives": ["d2", "d3"],
         "pos_scores": [3.0], "neg_scores": [1.0, -2.0]},
        {"query_id": "b", "query": "y", "positives": ["d2"], "negatives": ["d1"],
         "pos_scores": [0.5], "neg_scores": [0.25]},
    ]  # fmt: skip
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": f"t{i}"}) + "\n" for i in (1, 2, 3))
    )
    from raysys.data.readers import read_corpus

    def groups(recs: list[dict]) -> Path:
        p = tmp_path / "g.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return p

    ts = read_groups(groups(rows), read_corpus(corpus))
    assert ts.teacher_scores(0, [0, 1, 2]) == [3.0, 1.0, -2.0]
    assert ts.teacher_scores(1, [1, 0]) == [0.5, 0.25]
    bad = [rows[0], {k: v for k, v in rows[1].items() if "scores" not in k}]
    with pytest.raises(DataError, match=r"g.jsonl:2: teacher scores must be on every group"):
        read_groups(groups(bad), read_corpus(corpus))
    with pytest.raises(DataError, match=r"g.jsonl:1: neg_scores must be a list with one number"):
        read_groups(groups([{**rows[0], "neg_scores": [1.0]}]), read_corpus(corpus))
    plain = read_groups(groups(bad[1:]), read_corpus(corpus))
    with pytest.raises(DataError, match=r"needs teacher scores"):
        plain.teacher_scores(0, [1])


def test_bad_m3_settings_fail_in_one_line(tiny_bert_dir, toy_data):
    with pytest.raises(ConfigError, match=r"train.m3.weights takes the keys .* not lex"):
        load_config(
            None, _overrides(tiny_bert_dir, toy_data, "train.m3.weights={dense: 1, lex: 2}")
        )


# -- on 2 Ray Train workers (slow) ----------------------------------------------------


@pytest.mark.slow
def test_m3_grad_cache_is_exact_under_zero_2_and_3(ray_local, tiny_bert_dir, toy_data, tmp_path):
    """Every head gathered across 2 workers, dropout 0.1: GradCache (chunks of
    4 and 2) equals one graph over the same chunks, ZeRO-2 and ZeRO-3."""
    from tests import test_grad_cache as gc

    variants = [
        (
            f"m3_zero{s}",
            gc._overrides(
                tiny_bert_dir,
                toy_data,
                "train.task=m3",
                f"train.zero_stage={s}",
                "contract.query_max_len=8",
                "contract.passage_max_len=16",
                "train.m3.self_distill_start=2",
            ),
            "chunked",
        )
        for s in (2, 3)
    ]
    got = gc._run_workers(variants, tmp_path / "exact.json")
    record("m3_zero2_zero3", got)
    for name, entry in got.items():
        a, b = entry["losses"]["grad_cache"], entry["losses"]["reference"]
        assert a == pytest.approx(b, abs=1e-5), (name, a, b)
        assert entry["param_diff_reference"] < 1e-5, (name, entry)
        assert len(set(a)) == 5


@pytest.mark.slow
@pytest.mark.parametrize("stage,lora", [(2, False), (3, True)])
def test_m3_trains_and_exports_every_head(
    ray_local, tiny_llama_dir, tiny_bert_dir, toy_data, tmp_path, stage, lora
):
    """2 workers: the loss falls; the export loads with plain transformers and
    raysys's embedder reproduces the training-time probe of every head."""
    from transformers import AutoModel

    from raysys.models.embedder import load_embedder
    from raysys.train.launch import run_training

    extra = [
        f"train.zero_stage={stage}",
        "train.max_steps=10",
        "train.optim.lr=5e-3",
        f"train.checkpoint.storage_path={tmp_path / 'ray'}",
        f"train.checkpoint.run_name=m3-{stage}",
    ]
    model = tiny_bert_dir
    if lora:
        model = tiny_llama_dir
        extra += [
            "model.lora.enabled=true",
            "model.lora.r=8",
            "model.lora.target_modules=[q_proj,v_proj]",
            "contract.pooling=last",
            "contract.append_eos=true",
        ]
    cfg = load_config(None, _overrides(model, toy_data, *extra))
    outcome = run_training(cfg, tmp_path / "out")
    assert outcome.finished and outcome.model_dir is not None
    losses = [h["loss"] for h in outcome.history]
    # Measured: 19% (full), 6.6% (LoRA); a run without gradients wobbles by ~1%.
    assert_loss_falls(losses, by=0.03)
    out = Path(outcome.model_dir)
    AutoModel.from_pretrained(out)  # the backbone loads in plain transformers
    contract = json.loads((out / "raysys_contract.json").read_text())
    assert contract["representations"] == ["dense", "sparse", "multivector"]
    probe = json.loads((out / "train_probe.json").read_text())
    embedder, tok = load_embedder(str(out))
    got = embedder.represent_texts(tok, probe["passages"], "passage", formatted=True)
    torch.testing.assert_close(
        torch.tensor(got["dense"]), torch.tensor(probe["dense"]), atol=1e-4, rtol=1e-4
    )
    for (ids, w), (pids, pw) in zip(got["sparse"], probe["sparse"], strict=True):
        assert ids.tolist() == pids
        torch.testing.assert_close(torch.tensor(w), torch.tensor(pw), atol=1e-4, rtol=1e-4)
    for v, pv in zip(got["multivector"], probe["multivector"], strict=True):
        torch.testing.assert_close(
            torch.tensor(v, dtype=torch.float32), torch.tensor(pv), atol=2e-3, rtol=2e-3
        )
