"""LLaRA's pretext task (raysys.train.tasks.llara): the joint EBAE/EBAR layout,
the bag-of-tokens loss, the halves EBAR predicts, and training + export on
2 Ray Train workers under every ZeRO stage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from raysys.config import load_config
from raysys.data.texts import split_halves
from raysys.train.tasks.llara import (
    LlaraCollator,
    LlaraTask,
    bag_of_tokens_loss,
    layout,
    llara_contract,
)


def _cfg(model, data, *extra):
    return load_config(
        None,
        [
            f"model={model}",
            f"data.corpus={data / 'corpus.jsonl'}",
            "train.task=llara",
            "train.llara.special=4",
            "contract.query_max_len=32",
            "contract.passage_max_len=48",
            *extra,
        ],
    )


def _task(model, data, *extra):
    from raysys.models.backbone import load_tokenizer

    cfg = _cfg(model, data, *extra)
    task = LlaraTask(cfg)
    tok = load_tokenizer(str(model))
    torch.manual_seed(0)
    module = task.build(tok).eval()
    return cfg, task, task.load_data(), tok, module


def test_split_halves_cuts_at_the_sentence_nearest_the_middle():
    text = "One two three. Four five six seven. Eight nine. Ten."
    first, second = split_halves(text)
    assert (first, second) == ("One two three. Four five six seven.", "Eight nine. Ten.")
    assert split_halves("a b c d e") == ("a b", "c d e")  # one sentence: the middle word
    assert split_halves("single") == ("single", "")
    assert split_halves("Dr. Smith. ") == ("Dr.", "Smith.")


def test_layout_hides_the_ebae_prompt_from_the_ebar_prompt():
    ids, allowed, pos = layout([1, 2, 3], [[10, 11], [20, 21, 22]])
    assert ids == [1, 2, 3, 10, 11, 20, 21, 22]
    assert pos == [0, 1, 2, 3, 4, 3, 4, 5]  # EBAR starts where EBAE starts
    ebae, ebar = slice(3, 5), slice(5, 8)
    assert not allowed[ebar, ebae].any()  # EBAR never sees EBAE
    assert allowed[ebar, :3].all() and allowed[ebae, :3].all()  # both see the text
    assert torch.equal(allowed[ebar, ebar], torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    assert not allowed[:3, 3:].any()  # the text is causal: it sees no prompt


def test_bag_of_tokens_loss_against_a_hand_computation():
    logits = torch.tensor(
        [
            [[1.0, 0.0, 2.0, -1.0], [0.5, 3.0, 0.0, 0.0]],  # max over k: [1, 3, 2, 0]
            [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]],  # [0, 1, 0, 0]
            [[9.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]],  # no targets: left out
        ]
    )
    targets = torch.tensor([[1, 2], [0, -1], [-1, -1]])

    def logp(row, i):
        return row[i] - math.log(sum(math.exp(x) for x in row))

    row0, row1 = [1.0, 3.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.0]
    want = (-(logp(row0, 1) + logp(row0, 2)) / 2 - logp(row1, 0)) / 2
    got = bag_of_tokens_loss(logits, targets)
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_one_pass_equals_two(tiny_lm_dir, toy_data):
    """Evidence 1: the joint pass's EBAE and EBAR logits and losses equal
    those of a pass with each prompt alone."""
    cfg, task, data, tok, module = _task(tiny_lm_dir, toy_data)
    rows = list(range(6))
    cpu = torch.device("cpu")
    joint = LlaraCollator(data, tok, cfg)(rows, 0)
    with torch.no_grad():
        bow, lm = task.losses(module, joint, cpu)
        logits_joint, _ = module(
            joint.input_ids, joint.allowed, joint.position_ids, joint.special_index, joint.lm_labels
        )
    k = cfg.train.llara.special
    for i, part in enumerate(("ebae", "ebar")):
        alone = LlaraCollator(data, tok, cfg, parts=(part,))(rows, 0)
        # The single-prompt layout is the plain causal one.
        n = alone.input_ids.shape[1]
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        for r in range(len(rows)):
            t = int((alone.input_ids[r] != tok.pad_token_id).sum())
            assert torch.equal(alone.allowed[r, :t, :t], causal[:t, :t])
        with torch.no_grad():
            bow1, lm1 = task.losses(module, alone, cpu)
            logits1, _ = module(
                alone.input_ids,
                alone.allowed,
                alone.position_ids,
                alone.special_index,
                alone.lm_labels,
            )
        torch.testing.assert_close(logits_joint[:, i * k : (i + 1) * k], logits1, atol=1e-5, rtol=0)
        assert bow[part].item() == pytest.approx(bow1[part].item(), abs=1e-5)
        assert lm.item() == pytest.approx(lm1.item(), abs=1e-5)


def test_the_ebar_prompt_cannot_see_the_ebae_prompt(tiny_lm_dir, toy_data):
    """Perturbation: other tokens in the EBAE prompt change the EBAE logits,
    not the EBAR ones; other text changes both."""
    cfg, task, data, tok, module = _task(tiny_lm_dir, toy_data)
    batch = LlaraCollator(data, tok, cfg)(list(range(4)), 0)
    k = cfg.train.llara.special

    def logits(ids):
        with torch.no_grad():
            out, _ = module(
                ids, batch.allowed, batch.position_ids, batch.special_index, batch.lm_labels
            )
        return out[:, :k], out[:, k:]

    ebae0, ebar0 = logits(batch.input_ids)
    ebae_end = batch.special_index[:, k - 1]
    prompt_len = len(LlaraCollator(data, tok, cfg).prompts["ebae"])
    changed = batch.input_ids.clone()
    for r in range(changed.shape[0]):
        start = int(ebae_end[r]) - prompt_len + 1
        changed[r, start : start + prompt_len - k] = tok.convert_tokens_to_ids("w7")
    ebae1, ebar1 = logits(changed)
    assert (ebae1 - ebae0).abs().max() > 1e-3
    assert torch.equal(ebar1, ebar0)
    text_changed = batch.input_ids.clone()
    text_changed[:, 1] = tok.convert_tokens_to_ids("w9")
    ebae2, ebar2 = logits(text_changed)
    assert (ebar2 - ebar0).abs().max() > 1e-3 and (ebae2 - ebae0).abs().max() > 1e-3


def test_the_ebae_row_is_what_encoding_a_passage_gives(tiny_lm_dir, toy_data):
    """The prompt layout is the contract's: a passage encoded under the export's
    contract has the token ids of the EBAE-only training row."""
    cfg, task, data, tok, module = _task(tiny_lm_dir, toy_data)
    contract = llara_contract(cfg)
    batch = LlaraCollator(data, tok, cfg, parts=("ebae",))(list(range(3)), 0)
    for r, text in enumerate(data.texts(list(range(3)))):
        first, _ = split_halves(text)
        want = contract.token_ids(tok, [contract.format_passage(first)], "passage")[0]
        got = batch.input_ids[r][batch.input_ids[r] != tok.pad_token_id].tolist()
        assert got == want
    assert contract.last_k == 4 and contract.pooling == "last"
    assert contract.passage_suffix.endswith("<s1><s2><s3><s4>")
    assert contract.query_suffix.endswith("<s5><s6><s7><s8>")


def test_llara_refuses_settings_it_cannot_honour(tiny_lm_dir, toy_data):
    from raysys.config import ConfigError

    with pytest.raises(ConfigError, match="merged model"):
        _cfg(tiny_lm_dir, toy_data, "model.export_adapter=true")
    with pytest.raises(ConfigError, match="flash_attention_2"):
        _cfg(tiny_lm_dir, toy_data, "train.attn_implementation=flash_attention_2")
    with pytest.raises(ConfigError, match="train.grad_cache: the llara task"):
        _cfg(tiny_lm_dir, toy_data, "train.grad_cache.chunk_size=2")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "lora"), [(0, False), (1, True), (2, False), (3, True)], ids=lambda v: str(v)
)
def test_llara_trains_and_exports_under_every_zero_stage(
    ray_local, tiny_lm_dir, toy_data, tmp_path, stage, lora
):
    """2 Ray Train workers; the export (new tokens included, LoRA merged)
    reloads with plain transformers and raysys's embedder and reproduces the
    training-time embeddings."""
    from raysys.train.launch import run_training
    from tests.helpers import assert_probe_reproduced, short_training

    extra = short_training(f"llara{stage}", stage, lora, tmp_path / "ray")
    outcome = run_training(_cfg(tiny_lm_dir, toy_data, *extra), tmp_path / "out")
    assert outcome.finished and len(outcome.history) == 12
    losses = [h["loss"] for h in outcome.history]
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    model_dir = outcome.model_dir
    contract = json.loads((model_dir / "raysys_contract.json").read_text())
    assert contract["last_k"] == 4 and "<s8>" in contract["special_tokens"]
    assert_probe_reproduced(model_dir)
    # Plain transformers: the new tokens are whole tokens and trained rows.
    from transformers import AutoModel, AutoTokenizer

    plain_tok = AutoTokenizer.from_pretrained(model_dir)
    plain = AutoModel.from_pretrained(model_dir)
    ids = plain_tok.convert_tokens_to_ids(["<s1>", "<s8>"])
    assert plain.get_input_embeddings().weight.shape[0] == len(plain_tok) > max(ids)
