"""Typed run configuration: YAML file plus ``key=value`` command-line overrides.

Every section is a dataclass; unknown keys and values of the wrong type are
refused with a :class:`ConfigError` that names the dotted key. A few short
aliases (``model=``, ``data=``, ``split=``) map onto their long keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from raysys.contract import ContractError, EncodingContract


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key."""


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class DataConfig:
    # A BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
    path: str | None = None
    # qrels split used for evaluation.
    split: str = "test"
    # qrels split used to build training groups from the BEIR folder.
    train_split: str = "train"
    # Training groups (JSONL or Parquet, raysys or Tevatron field names);
    # when set, groups are read from here instead of being built from `path`.
    groups: str | None = None
    # Corpus used to resolve passage ids in `groups` (defaults to `path`).
    corpus: str | None = None
    # Negatives drawn at random from the corpus per query when building groups
    # from BEIR qrels (the first training round).
    sampled_negatives: int = 30
    # Limit the number of training queries (0 = all); useful for smoke runs.
    max_queries: int = 0
    # A malformed input line stops the run ("error", naming file and line) or
    # is counted and reported ("skip").
    on_bad_line: Literal["error", "skip"] = "error"


@dataclass
class TrainConfig:
    enabled: bool = True
    # What the train stage trains: the retriever (`model`) or the reranker
    # (`reranker`, on 1 positive + group_size-1 hard negatives, no in-batch).
    task: Literal["retrieve", "rerank"] = "retrieve"
    # Reranker loss: grouped softmax cross-entropy (RankLLaMA) or pointwise BCE.
    rerank_loss: Literal["grouped_ce", "bce"] = "grouped_ce"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Queries per worker per micro-step; each query brings group_size passages.
    per_device_queries: int = 8
    group_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    # If > 0, overrides epochs.
    max_steps: int = 0
    lr: float = 2e-5
    # Learning rate of a reranker's fresh score head (0: train.lr).
    head_lr: float = 0.0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    temperature: float = 0.05
    gather_negatives: bool = True
    in_batch_negatives: bool = True
    mask_false_negatives: bool = True
    zero_stage: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 42
    save_steps: int = 0
    log_steps: int = 1
    # Stop cleanly after this step (with a checkpoint) although the schedule
    # plans for the whole run: for time-sliced or preemptible allocations.
    stop_after: int = 0
    # A checkpoint directory to continue from (else the run's latest, if any).
    resume_from: str | None = None
    # Ray Train run name and storage; the same pair resumes the same run.
    run_name: str = "raysys-train"
    storage_path: str | None = None
    max_failures: int = 0


@dataclass
class EncodeConfig:
    # Rows per embedding shard: the unit of resume and of parallel index adds.
    shard_size: int = 20000
    # Encoder actors (0 = one per GPU when GPUs are used, else 1).
    actors: int = 0
    use_gpu: bool = False
    cpus_per_actor: float = 1.0
    # Torch threads per CPU actor (0 = the node's cores / actors).
    torch_threads: int = 0
    # Rows per actor call (one Ray Data batch); sorted by length inside it.
    batch_size: int = 256
    # Rows per forward pass inside an actor call.
    micro_batch: int = 32
    dtype: Literal["float32", "float16"] = "float32"
    # Speed levers (CPU): bf16 autocast, dynamic int8 quantisation of Linear
    # (per-channel weight scales: much closer to fp32 than per-tensor;
    # int8_ffn_down_fp32 keeps the FFN down-projections, the main source of
    # int8 drift, in fp32).
    bf16: bool = False
    int8: bool = False
    int8_per_channel: bool = True
    int8_ffn_down_fp32: bool = False
    # Encode only the first N corpus rows (0 = all); for smoke runs.
    max_docs: int = 0


@dataclass
class IndexConfig:
    # A FAISS index_factory string (e.g. "IVF1024,PQ64x8", "Flat", "HNSW32")
    # or "auto" (IVF-PQ sized from the vector count and dimension).
    factory: str = "auto"
    # Training sample size (0 = max(39 x nlist, 10000), capped by the corpus).
    train_sample: int = 0
    # Merge shard indexes into on-disk inverted lists (for corpora that do not
    # fit in memory); "auto" switches on above 5M vectors.
    ondisk: Literal["auto", "true", "false"] = "auto"
    # The default nprobe is the smallest whose recall@10 against exact search
    # (measured at build time on training-split queries when the pipeline has
    # them, else corpus vectors) reaches this share of the best recall any
    # nprobe gives (the codes cap it).
    recall_target: float = 0.99
    seed: int = 0


@dataclass
class SearchConfig:
    # 0 = the index's default (chosen at build time).
    nprobe: int = 0
    topk: int = 1000
    batch_size: int = 256
    # Drop hits whose doc id equals the query id (BEIR/MTEB convention).
    drop_self_hits: bool = True
    # nprobe values for the sweep plot in `raysys pipeline` (IVF indexes).
    sweep: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])


@dataclass
class ModelConfig:
    # A local folder, a raysys export, or an alias (see raysys.models.hub).
    path: str = "all-MiniLM-L6-v2"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Build the model from its config with random weights (tests only).
    random_init: bool = False
    # Keep the adapter separate from its base on export instead of merging.
    export_adapter: bool = False


@dataclass
class RerankerConfig:
    # Base model to train (train.task=rerank) or a raysys reranker export to
    # score with (the rerank stage). In the pipeline, a reranker trained by the
    # train stage replaces it.
    path: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    random_init: bool = False
    # Pair format; {query}, {document} (= "{title} {text}"), {title}, {text}.
    template: str = "query: {query} document: {document}"
    # cls for encoders, last (with append_eos) for decoders (RankLLaMA).
    pooling: Literal["cls", "mean", "last"] = "cls"
    append_eos: bool = False
    max_len: int = 256
    # Rerank stage: candidates per query taken from the first-stage run.
    topk: int = 100
    # Keep the candidates below top-k after the reranked ones (so Recall@1000
    # still describes the first stage) instead of dropping them.
    keep_tail: bool = True
    # Final score = weight * reranker + (1 - weight) * first stage, each
    # min-max normalised per query over the top-k (1.0: the reranker alone).
    weight: float = 1.0
    actors: int = 0
    use_gpu: bool = False
    cpus_per_actor: float = 1.0
    batch_size: int = 256
    micro_batch: int = 32
    int8: bool = False
    int8_per_channel: bool = True
    int8_ffn_down_fp32: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    # The encoding contract; `model` is filled from model.path when empty.
    contract: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    # Pipeline stages to run, in order (any prefix of the full list).
    stages: list[str] = field(
        default_factory=lambda: ["train", "encode", "index", "search", "evaluate"]
    )
    out: str | None = None

    def rerank_contract(self) -> Any:
        from raysys.models.reranker import RerankContract

        r = self.reranker
        try:
            return RerankContract(
                model=r.path or "",
                template=r.template,
                pooling=r.pooling,
                append_eos=r.append_eos,
                max_len=r.max_len,
            )
        except ContractError as e:
            raise ConfigError(f"invalid reranker settings: {e}") from e

    def encoding_contract(self) -> EncodingContract:
        d = dict(self.contract)
        d.setdefault("model", self.model.path)
        try:
            return EncodingContract.from_dict(d)
        except (ContractError, TypeError) as e:
            raise ConfigError(f"invalid contract: {e}") from e


STAGES = ("train", "encode", "index", "search", "rerank", "evaluate")
ALIASES = {"model": "model.path", "data": "data.path", "split": "data.split"}


def _is_dataclass_type(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently coerce) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if _is_dataclass_type(tp):
        return _build(tp, value, key)
    return value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        kwargs[k] = _coerce(key, v, hints[k])
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``a.b=value``; the value is read as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return ALIASES.get(key, key), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults), apply overrides, validate everything."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        # Short aliases are allowed at the top level of the file too.
        for short, long in ALIASES.items():
            if short in tree and not isinstance(tree[short], dict):
                _set_dotted(tree, long, tree.pop(short))
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree)
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    t = cfg.train
    checks = [
        (t.num_workers >= 1, "train.num_workers must be >= 1"),
        (t.per_device_queries >= 1, "train.per_device_queries must be >= 1"),
        (t.group_size >= 1, "train.group_size must be >= 1 (1 positive + n negatives)"),
        (t.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (t.zero_stage in (0, 1, 2, 3), "train.zero_stage must be 0, 1, 2 or 3"),
        (t.temperature > 0, "train.temperature must be > 0"),
        (t.lr > 0, "train.lr must be > 0"),
        (t.head_lr >= 0, "train.head_lr must be >= 0"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)"),
        (t.epochs > 0 or t.max_steps > 0, "train.epochs or train.max_steps must be > 0"),
        (cfg.model.lora.r >= 1, "model.lora.r must be >= 1"),
        (0 <= cfg.model.lora.dropout < 1, "model.lora.dropout must be in [0, 1)"),
        (cfg.data.sampled_negatives >= 0, "data.sampled_negatives must be >= 0"),
        (cfg.encode.shard_size >= 1, "encode.shard_size must be >= 1"),
        (cfg.encode.batch_size >= 1, "encode.batch_size must be >= 1"),
        (cfg.encode.micro_batch >= 1, "encode.micro_batch must be >= 1"),
        (cfg.search.topk >= 1, "search.topk must be >= 1"),
        (cfg.search.nprobe >= 0, "search.nprobe must be >= 0"),
        (cfg.reranker.topk >= 1, "reranker.topk must be >= 1"),
        (0.0 <= cfg.reranker.weight <= 1.0, "reranker.weight must be in [0, 1]"),
        (
            t.task != "rerank" or t.group_size >= 2,
            "train.group_size must be >= 2 for train.task=rerank (1 positive + negatives)",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
    cfg.encoding_contract()
    if t.task == "rerank" or "rerank" in cfg.stages:
        if not cfg.reranker.path:
            raise ConfigError(
                "reranker.path: set a base model (train.task=rerank) or a reranker export"
            )
        cfg.rerank_contract()


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
