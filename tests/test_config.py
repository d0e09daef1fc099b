import pytest

from raysys.config import ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "model: /some/model\ntrain:\n  lr: 1e-5\n  zero_stage: 2\ncontract:\n  pooling: last\n"
    )
    cfg = load_config(
        p,
        [
            "train.num_workers=3",
            "split=dev",
            "data=/beir",
            "model.lora.target_modules=[q_proj,v_proj]",
        ],
    )
    assert cfg.model.path == "/some/model"
    assert cfg.train.lr == 1e-5 and cfg.train.zero_stage == 2 and cfg.train.num_workers == 3
    assert cfg.data.split == "dev" and cfg.data.path == "/beir"
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    c = cfg.encoding_contract()
    assert c.pooling == "last" and c.model == "/some/model"


def test_unknown_key_is_named():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)"
    ):
        load_config(None, ["train.lrr=0.1"])


def test_unknown_key_in_file_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  zero_stag: 3\n")
    with pytest.raises(ConfigError, match="train.zero_stag"):
        load_config(p)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.num_workers=two", "train.num_workers: expected an integer"),
        ("train.zero_stage=4", "train.zero_stage must be 0, 1, 2 or 3"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
        ("train.gather_negatives=maybe", "train.gather_negatives: expected true or false"),
        ("contract.pooling=max", "contract.pooling must be cls, mean or last"),
        ("contract.colour=red", "unknown encoding contract field"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_bad_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent.yaml")
