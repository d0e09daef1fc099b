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
