import logging

import pytest

from raysys.config import MOVED, ConfigError, config_from_dict, load_config, to_dict


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "model: /some/model\ntrain:\n  optim:\n    lr: 1e-5\n  zero_stage: 2\n"
        "contract:\n  pooling: last\n"
    )
    cfg = load_config(
        p,
        [
            "train.scaling.num_workers=3",
            "split=dev",
            "data=/beir",
            "model.lora.target_modules=[q_proj,v_proj]",
        ],
    )
    assert cfg.model.path == "/some/model"
    assert cfg.train.optim.lr == 1e-5 and cfg.train.zero_stage == 2
    assert cfg.train.scaling.num_workers == 3
    assert cfg.data.split == "dev" and cfg.data.path == "/beir"
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    c = cfg.encoding_contract()
    assert c.pooling == "last" and c.model == "/some/model"


def test_existing_relative_paths_become_absolute(tmp_path, monkeypatch):
    """Workers do not share the driver's cwd: local inputs are made absolute
    on the driver; aliases, hub ids, URIs and missing paths are left alone."""
    (tmp_path / "runs" / "m").mkdir(parents=True)
    (tmp_path / "groups.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            "model=runs/m",
            "data.groups=groups.jsonl",
            "data.corpus=./not-there.jsonl",
            "reranker.path=BAAI/bge-reranker-base",
            "train.checkpoint.storage_path=ray",
            "mine.index=s3://bucket/index",
        ],
    )
    assert cfg.model.path == str(tmp_path / "runs" / "m")
    assert cfg.data.groups == str(tmp_path / "groups.jsonl")
    assert cfg.data.corpus == "./not-there.jsonl"
    assert cfg.reranker.path == "BAAI/bge-reranker-base"
    assert cfg.train.checkpoint.storage_path == str(tmp_path / "ray")
    assert cfg.mine.index == "s3://bucket/index"
    assert load_config(None, []).model.path == "all-MiniLM-L6-v2"


def test_workers_rebuild_the_same_config():
    cfg = load_config(None, ["train.optim.lr=3e-4", "encode.pool.actors=2", "mine.n=7"])
    assert config_from_dict(to_dict(cfg)) == cfg


def test_old_flat_keys_still_work_and_say_where_they_moved(tmp_path, caplog):
    p = tmp_path / "old.yaml"
    p.write_text(
        "train:\n  lr: 1e-5\n  num_workers: 4\n  run_name: old\n"
        "encode:\n  actors: 2\n  batch_size: 64\nreranker:\n  micro_batch: 8\n"
    )
    with caplog.at_level(logging.WARNING, logger="raysys.config"):
        cfg = load_config(p, ["train.temperature=0.02", "encode.int8=true"])
    assert cfg.train.optim.lr == 1e-5 and cfg.train.scaling.num_workers == 4
    assert cfg.train.checkpoint.run_name == "old" and cfg.train.loss.temperature == 0.02
    assert cfg.encode.pool.actors == 2 and cfg.encode.pool.batch_size == 64
    assert cfg.encode.pool.int8 and cfg.reranker.pool.micro_batch == 8
    assert "'train.lr' is now 'train.optim.lr'" in caplog.text
    assert "'encode.int8' is now 'encode.pool.int8'" in caplog.text
    # Every moved key lands on a real field.
    for old, new in MOVED.items():
        load_config(None, [f"{old}={_sample(new)}"])


def _sample(dotted: str) -> str:
    cfg = load_config(None)
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return "null" if node is None else str(node).lower() if isinstance(node, bool) else str(node)


def test_old_and_new_key_together_is_refused(tmp_path):
    p = tmp_path / "both.yaml"
    p.write_text("train:\n  lr: 1e-5\n  optim:\n    lr: 2e-5\n")
    with pytest.raises(ConfigError, match="'train.lr' and 'train.optim.lr' are both set"):
        load_config(p)


def test_unknown_key_is_named():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.lrr' \(did you mean 'train.optim.lr'\?\)"
    ):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.max_step' \(did you mean 'train.max_steps'"
    ):
        load_config(None, ["train.max_step=3"])


def test_unknown_key_in_file_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  zero_stag: 3\n")
    with pytest.raises(ConfigError, match="train.zero_stag"):
        load_config(p)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.scaling.num_workers=two", "train.scaling.num_workers: expected an integer"),
        ("train.zero_stage=4", "train.zero_stage must be 0, 1, 2 or 3"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
        ("train.loss.gather_negatives=maybe", "train.loss.gather_negatives: expected true or"),
        (
            "train.task=nosuch",
            "train.task: unknown task 'nosuch'; known: llara, m3, mntp, rerank, retrieve",
        ),
        ("train.task=os.path:join", "is not a raysys Task subclass"),
        ("contract.pooling=max", "contract.pooling: 'max' is not one of"),
        ("contract.query_max_len=1", "contract.query_max_len must be an integer >= 2"),
        ("contract.colour=red", "unknown config key 'contract.colour'"),
        ("mine.rank_from=150", "mine: need 0 <= rank_from < rank_to"),
        ("mine.margin=0.5", "needs both mine.reranker and mine.margin"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_bad_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent.yaml")
