import pytest
import torch

from raysys.config import LoraConfig
from raysys.contract import EncodingContract
from raysys.models.backbone import BIDIRECTIONAL_ARCHS, build_backbone, load_tokenizer
from raysys.models.embedder import Embedder, export_embedder, load_embedder
from raysys.models.pooling import pool
from tests.helpers import tiny_llama

TEXTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10"]


def test_last_pooling_under_left_and_right_padding(tiny_llama_dir):
    contract = EncodingContract(pooling="last", append_eos=True, normalize=False)
    model = Embedder(build_backbone(str(tiny_llama_dir)), contract).eval()
    tok = load_tokenizer(str(tiny_llama_dir))
    outs = {}
    for side in ("left", "right"):
        tok.padding_side = side
        batch = contract.tokenize(tok, TEXTS, "passage")
        with torch.no_grad():
            outs[side] = model(batch["input_ids"], batch["attention_mask"])
    single = []
    for t in TEXTS:  # no padding at all
        b = contract.tokenize(tok, [t], "passage")
        with torch.no_grad():
            single.append(model(b["input_ids"], b["attention_mask"])[0])
    torch.testing.assert_close(outs["left"], torch.stack(single), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["right"], torch.stack(single), atol=1e-5, rtol=1e-5)


def test_pool_modes():
    h = torch.arange(12, dtype=torch.float).view(1, 4, 3)
    m = torch.tensor([[0, 1, 1, 0]])
    assert pool(h, m, "cls").tolist() == [[0.0, 1.0, 2.0]]
    assert pool(h, m, "mean").tolist() == [[4.5, 5.5, 6.5]]
    assert pool(h, m, "last").tolist() == [[6.0, 7.0, 8.0]]


@pytest.mark.parametrize("arch", sorted(BIDIRECTIONAL_ARCHS))
def test_bidirectional_attention(arch, tmp_path, tiny_llama_dir):
    """With bidirectional attention the first token sees later tokens; causal does not."""
    path = str(tiny_llama(tmp_path / arch, model_type=arch))
    # Same word-level vocabulary for every arch (AutoTokenizer would pick e.g.
    # Qwen2Tokenizer from the model type and ignore the saved tokenizer class).
    tok = load_tokenizer(str(tiny_llama_dir))
    a = tok(["w1 w2 w3"], return_tensors="pt")
    b = tok(["w1 w2 w9"], return_tensors="pt")
    for bidi in (False, True):
        c = EncodingContract(pooling="cls", normalize=False, bidirectional=bidi)
        model = Embedder(build_backbone(path), c).eval()
        with torch.no_grad():
            first_a = model(a["input_ids"], a["attention_mask"])
            first_b = model(b["input_ids"], b["attention_mask"])
        changed = not torch.allclose(first_a, first_b, atol=1e-6)
        assert changed == bidi, f"{arch}: bidirectional={bidi} but first token changed={changed}"
    # Padding must stay invisible under the bidirectional mask.
    c = EncodingContract(pooling="mean", normalize=False, bidirectional=True)
    model = Embedder(build_backbone(path), c).eval()
    padded = tok(["w1 w2", "w1 w2 w3 w4 w5"], padding=True, return_tensors="pt")
    alone = tok(["w1 w2"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            model(padded["input_ids"], padded["attention_mask"])[0],
            model(alone["input_ids"], alone["attention_mask"])[0],
            atol=1e-5,
            rtol=1e-5,
        )


def test_bidirectional_refused_for_unsupported(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported for model_type 'gpt2'"):
        Embedder(
            build_backbone(str(tmp_path)), EncodingContract(pooling="last", bidirectional=True)
        )


@pytest.mark.parametrize("merge", [True, False])
def test_lora_export_reloads_same_embeddings(tiny_llama_dir, tmp_path, merge):
    contract = EncodingContract(
        model=str(tiny_llama_dir), pooling="last", append_eos=True, query_prefix="query: "
    )
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)
    backbone = build_backbone(str(tiny_llama_dir), lora=lora)
    with torch.no_grad():  # make the adapter non-trivial
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model = Embedder(backbone, contract).eval()
    tok = load_tokenizer(str(tiny_llama_dir))
    before = model.encode_texts(tok, TEXTS, "query")
    out = export_embedder(backbone, tok, contract, tmp_path / "export", merge=merge)
    assert (out / "raysys_contract.json").is_file()
    assert (out / "adapter_config.json").is_file() != merge
    reloaded, tok2 = load_embedder(str(out))
    torch.testing.assert_close(
        reloaded.encode_texts(tok2, TEXTS, "query"), before, atol=1e-5, rtol=1e-4
    )


def test_encoder_export_loads_in_sentence_transformers(tiny_bert_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    contract = EncodingContract(
        model=str(tiny_bert_dir), pooling="mean", normalize=True, passage_max_len=64
    )
    backbone = build_backbone(str(tiny_bert_dir))
    tok = load_tokenizer(str(tiny_bert_dir))
    ours = Embedder(backbone, contract).encode_texts(tok, TEXTS, "passage")
    out = export_embedder(backbone, tok, contract, tmp_path / "st")
    st = SentenceTransformer(str(out), device="cpu")
    theirs = torch.tensor(st.encode(TEXTS))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_same_gradients(tiny_llama_dir):
    contract = EncodingContract(pooling="last", append_eos=True)
    tok = load_tokenizer(str(tiny_llama_dir))
    batch = contract.tokenize(tok, TEXTS, "passage")
    grads = []
    for ckpt in (False, True):
        model = Embedder(
            build_backbone(str(tiny_llama_dir), gradient_checkpointing=ckpt), contract
        ).train()
        model(batch["input_ids"], batch["attention_mask"]).sum().backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_ffn_down_projections_are_found_in_encoders_and_decoders(tiny_bert_dir, tiny_llama_dir):
    from raysys.models.quantize import ffn_down_projections

    bert = ffn_down_projections(build_backbone(str(tiny_bert_dir)))
    assert bert and all(n.endswith(".output.dense") and "attention" not in n for n in bert)
    llama = ffn_down_projections(build_backbone(str(tiny_llama_dir)))
    assert llama and all(n.endswith("mlp.down_proj") for n in llama)
    assert ffn_down_projections(torch.nn.Sequential(torch.nn.Linear(4, 4))) == set()


@pytest.mark.slow
def test_int8_schemes_drift_from_fp32_as_measured(scifact):
    """Real MiniLM on real passages: per-channel scales (the default) and
    per-tensor scales with the FFN down-projections in fp32 both keep
    embeddings near fp32; plain per-tensor drifts much further."""
    import copy
    import itertools
    import json

    from raysys.models.quantize import ffn_down_projections, quantize_int8

    contract = EncodingContract(pooling="mean", normalize=True, passage_max_len=256)
    model, tok = load_embedder("all-MiniLM-L6-v2", "cpu", contract)
    with open(scifact / "corpus.jsonl") as f:
        docs = [json.loads(line) for line in itertools.islice(f, 32)]
    batch = contract.tokenize(
        tok, [contract.format_passage(d["text"], d["title"]) for d in docs], "passage"
    )
    schemes = {"per_channel": (True, False), "per_tensor": (False, False), "ffn": (False, True)}
    cos = {}
    with torch.inference_mode():
        ref = model(batch["input_ids"], batch["attention_mask"])
        for name, (per_channel, ffn_fp32) in schemes.items():
            q = quantize_int8(copy.deepcopy(model), per_channel, ffn_fp32)
            kept = {n for n, m in q.named_modules() if type(m) is torch.nn.Linear}
            assert kept == (ffn_down_projections(model) if ffn_fp32 else set())
            out = q(batch["input_ids"], batch["attention_mask"])
            cos[name] = float((out * ref).sum(-1).mean())
    assert cos["per_channel"] > 0.97
    assert cos["ffn"] > 0.98
    assert min(cos["per_channel"], cos["ffn"]) > cos["per_tensor"] + 0.02
