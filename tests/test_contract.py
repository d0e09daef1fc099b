import pytest

from raysys.contract import ContractError, EncodingContract, check_compatible


def test_roundtrip(tmp_path):
    c = EncodingContract(
        model="m",
        query_prefix="query: ",
        passage_prefix="passage: ",
        pooling="last",
        append_eos=True,
    )
    c.save(tmp_path)
    assert EncodingContract.load(tmp_path) == c


def test_instruction_template():
    c = EncodingContract(
        query_prefix="Instruct: {instruction}\nQuery: ", instruction="Given a claim, find evidence"
    )
    assert c.format_query("x") == "Instruct: Given a claim, find evidence\nQuery: x"
    with pytest.raises(ContractError, match="instruction"):
        EncodingContract(query_prefix="Instruct: {instruction}\nQuery: ")


def test_passage_format_uses_title():
    c = EncodingContract(passage_prefix="passage: ")
    assert c.format_passage("body", "Title") == "passage: Title body"
    assert EncodingContract(use_title=False).format_passage("body", "Title") == "body"


def test_mismatch_is_refused():
    a = EncodingContract(model="m", pooling="mean")
    check_compatible(
        a, EncodingContract(model="m", pooling="mean", query_max_len=32)
    )  # length: same space
    with pytest.raises(ContractError, match="pooling: index has 'mean', query encoder has 'last'"):
        check_compatible(a, EncodingContract(model="m", pooling="last"))


def test_append_eos_survives_truncation(tiny_llama_dir):
    from raysys.models.backbone import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    c = EncodingContract(append_eos=True, query_max_len=4, pooling="last")
    out = c.tokenize(tok, ["w1 w2 w3 w4 w5 w6", "w1"], "query")
    ids = out["input_ids"]
    assert ids.shape[1] == 4
    assert ids[0, -1].item() == tok.eos_token_id  # truncated, EOS still last
    assert ids[1].tolist().count(tok.eos_token_id) == 1


def test_a_suffix_is_never_truncated(tiny_llama_dir):
    from raysys.models.backbone import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<s1>", "<s2>"]})
    c = EncodingContract(
        passage_suffix=" the passage <s1><s2>",
        pooling="last",
        last_k=2,
        special_tokens=["<s1>", "<s2>"],
        passage_max_len=8,
    )
    suffix = c.suffix_ids(tok, "passage")
    assert tok.convert_ids_to_tokens(suffix) == ["the", "passage", "<s1>", "<s2>"]
    long, short = c.token_ids(tok, [" ".join(f"w{i}" for i in range(20)), "w1"], "passage")
    assert len(long) == 8 and long[-4:] == suffix and long[:4] == tok("w0 w1 w2 w3")["input_ids"]
    assert short == tok("w1")["input_ids"] + suffix
    with_eos = EncodingContract(
        passage_suffix=" <s1>", special_tokens=["<s1>"], append_eos=True, passage_max_len=4
    ).token_ids(tok, ["w1 w2 w3 w4"], "passage")[0]
    assert tok.convert_ids_to_tokens(with_eos) == ["w1", "w2", "<s1>", "</s>"]
    with pytest.raises(ContractError, match="no room"):
        EncodingContract(
            passage_suffix=" the passage <s1><s2>", special_tokens=["<s1>"], passage_max_len=4
        ).token_ids(tok, ["w1"], "passage")


def test_special_tokens_must_be_in_the_tokenizer(tiny_llama_dir):
    from raysys.models.backbone import load_tokenizer

    c = EncodingContract(query_suffix=" <s9>", special_tokens=["<s9>"])
    with pytest.raises(ContractError, match=r"lacks the contract's special tokens \['<s9>'\]"):
        c.token_ids(load_tokenizer(str(tiny_llama_dir)), ["w1"], "query")


def test_last_k_pooling_under_either_padding_side():
    import torch

    from raysys.models.pooling import pool

    hidden = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    # Row 0 right-padded: tokens 0..2, last 2 = 1, 2; row 1: 8, 9.
    assert pool(hidden, right, "last", 2).flatten().tolist() == [1.5, 8.5]
    assert pool(hidden, left, "last", 2).flatten().tolist() == [3.5, 8.5]
    # A row shorter than k averages what it has.
    short = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert pool(hidden, short, "last", 3).flatten().tolist() == [0.0, 8.0]
    assert pool(hidden, right, "last", 1).flatten().tolist() == [2.0, 9.0]
    with pytest.raises(ContractError, match="last_k > 1 needs contract.pooling=last"):
        EncodingContract(pooling="mean", last_k=2)


def test_contracts_written_before_suffixes_still_load_and_match(tmp_path):
    import json

    old = {"model": "m", "pooling": "last", "append_eos": True}
    (tmp_path / "raysys_contract.json").write_text(json.dumps(old))
    loaded = EncodingContract.load(tmp_path)
    assert loaded.last_k == 1 and loaded.query_suffix == ""
    check_compatible(loaded, EncodingContract(model="m", pooling="last", append_eos=True))
    with pytest.raises(ContractError, match="last_k"):
        check_compatible(
            loaded,
            EncodingContract(
                model="m", pooling="last", append_eos=True, last_k=8, special_tokens=["<s1>"]
            ),
        )
