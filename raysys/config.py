"""Typed run configuration: YAML file plus ``key=value`` command-line overrides.

Every section is a dataclass; unknown keys and values of the wrong type are
refused with a :class:`ConfigError` that names the dotted key. A few short
aliases (``model=``, ``data=``, ``split=``) map onto their long keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from raysys.contract import ContractError, EncodingContract, RerankContract
from raysys.errors import UserError

log = logging.getLogger(__name__)


class ConfigError(UserError):
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
    # Limit the texts of the unsupervised tasks (llara, mntp; 0 = all).
    max_texts: int = 0
    # A malformed input line stops the run ("error", naming file and line) or
    # is counted and reported ("skip").
    on_bad_line: Literal["error", "skip"] = "error"


@dataclass
class ScalingConfig:
    """Ray Train workers (Ray's ``ScalingConfig``)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass
class OptimConfig:
    """AdamW and its schedule (linear warm-up, then linear decay)."""

    lr: float = 2e-5
    # Learning rate of a reranker's fresh score head (0: optim.lr).
    head_lr: float = 0.0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0


@dataclass
class LossConfig:
    """Negatives and the loss (each task reads the keys it uses)."""

    temperature: float = 0.05
    # Retriever: passages of the other queries in the global batch are
    # negatives (in_batch), gathered from every worker (gather_negatives);
    # known positives of a query are masked out of its softmax.
    gather_negatives: bool = True
    in_batch_negatives: bool = True
    mask_false_negatives: bool = True
    # Reranker: grouped softmax cross-entropy (RankLLaMA) or pointwise BCE.
    rerank_loss: Literal["grouped_ce", "bce"] = "grouped_ce"
    # Distillation from a teacher (retrieve, m3): the groups' teacher scores
    # (`raysys teacher`) over each query's group; the loss adds
    # distill_weight x the soft cross-entropy of the student's group scores
    # (over `temperature`) towards softmax(teacher / teacher_temperature).
    distill_weight: float = 0.0
    teacher_temperature: float = 1.0


@dataclass
class LlaraConfig:
    """LLaRA's pretext (train.task=llara): EBAE and EBAR in one pass.

    The text is wrapped as ``prefix + text`` and followed by both prompts,
    each ending in ``special`` new tokens; the EBAR prompt cannot see the
    EBAE prompt and reuses its positions. The loss is ``lm_weight`` x the
    next-token loss over the text plus ``bow_weight`` x the mean of the
    EBAE and EBAR bag-of-tokens losses (FlagEmbedding's pretraining: 1 and
    0.1). The export's encoding contract puts the EBAR prompt after queries
    and the EBAE prompt after passages, pooled as the mean of the last
    ``special`` states.
    """

    prefix: str = '"'
    ebae_prompt: str = '", summarize the above passage within eight words: '
    ebar_prompt: str = '", predict the following passage within eight words: '
    special: int = 8
    lm_weight: float = 1.0
    bow_weight: float = 0.1
    # Tokens of the input text (the prompts come on top) and of each target.
    max_len: int = 128
    target_max_len: int = 128


@dataclass
class MntpConfig:
    """LLM2Vec's masked next-token prediction (train.task=mntp): with
    bidirectional attention, masked token i is predicted from position i-1."""

    # Share of the text tokens chosen; of those 80% become the mask token,
    # 10% a random token, 10% stay (LLM2Vec uses BERT's recipe at 0.2).
    mask_prob: float = 0.2
    # The mask token: empty = the tokenizer's, else "_" (LLM2Vec's choice
    # for Llama and Mistral, which have none).
    mask_token: str = ""
    # Tokens per text.
    max_len: int = 128


@dataclass
class M3Config:
    """BGE-M3 (train.task=m3): dense, sparse and multi-vector heads trained
    together. The loss averages the InfoNCE of each head (weighted by
    ``loss_weights``) and of the ensemble ``sum(weights[h] * s_h)``; with
    ``self_distill`` the ensemble's softmax (a teacher without gradient) is
    distilled into each head from optimizer step ``self_distill_start`` on,
    and the two halves are averaged (BGE-M3's published recipe)."""

    # Multi-vector head output size (0 = the backbone's hidden size).
    multivector_dim: int = 0
    weights: dict[str, float] = field(
        default_factory=lambda: {"dense": 1.0, "sparse": 0.3, "multivector": 1.0}
    )
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"dense": 1.0, "sparse": 0.1, "multivector": 1.0}
    )
    self_distill: bool = True
    self_distill_start: int = 0


@dataclass
class GradCacheConfig:
    """GradCache (raysys.train.steps.GradCacheStep): a micro-batch of any size
    at the activation memory of one chunk, with exact gradients."""

    # Queries per chunk (each with its passages); 0 = off.
    chunk_size: int = 0


@dataclass
class CheckpointConfig:
    """Checkpoints, resume and failures (Ray's ``RunConfig``/``FailureConfig``)."""

    save_steps: int = 0
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
class TrainConfig:
    enabled: bool = True
    # The training task (raysys.train.tasks): `retrieve` (bi-encoder, InfoNCE),
    # `rerank` (cross-encoder on reranker.*), or `package.module:Class` for a
    # task of your own.
    task: str = "retrieve"
    # Queries per worker per micro-step; each query brings group_size passages.
    per_device_queries: int = 8
    group_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    # If > 0, overrides epochs.
    max_steps: int = 0
    zero_stage: int = 0
    # Mixed precision: bf16, or fp16 with loss scaling (V100/T4). The
    # weights load in fp32 whatever the checkpoint's dtype, so the optimizer
    # always keeps fp32 master weights and states.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # On a GPU, fp32 matmuls (precision: fp32, and fp32 parts of mixed
    # precision) use TF32 tensor cores; false keeps them true fp32.
    tf32: bool = True
    # from_pretrained's attn_implementation for training (sdpa,
    # flash_attention_2, eager; empty: the model's default).
    attn_implementation: str = ""
    gradient_checkpointing: bool = False
    seed: int = 42
    # Every step is recorded (history, TensorBoard, the console's bar); every
    # log_steps-th also goes to the log file and to Ray Train as a report.
    log_steps: int = 10
    # Also log the step metrics to MLflow (needs `pip install mlflow`; its
    # MLFLOW_TRACKING_URI decides where).
    mlflow: bool = False
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grad_cache: GradCacheConfig = field(default_factory=GradCacheConfig)
    llara: LlaraConfig = field(default_factory=LlaraConfig)
    mntp: MntpConfig = field(default_factory=MntpConfig)
    m3: M3Config = field(default_factory=M3Config)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class PoolConfig:
    """A Ray Data actor pool that runs a model (encode and rerank)."""

    # Actors: a fixed pool of this size, or 0: on GPUs an autoscaling pool
    # (1 .. max_actors, growing as GPU nodes join), on CPUs 1 actor.
    actors: int = 0
    # Cap of the autoscaling GPU pool (0: no cap).
    max_actors: int = 0
    use_gpu: bool = False
    # GPU share of one actor: 1 = a whole GPU; 0.25 = four actors share one
    # (small models cannot keep a GPU busy alone).
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    # Torch threads per CPU actor (0 = the node's cores / actors).
    torch_threads: int = 0
    # Rows per actor call (one Ray Data batch); sorted by length inside it.
    batch_size: int = 256
    # Rows per forward pass inside an actor call, and (if > 0) at most this
    # many padded tokens per forward pass: batches by token budget.
    micro_batch: int = 32
    micro_tokens: int = 0
    # Inference precision: auto (bf16 on a GPU that supports it, Ampere and
    # later; else fp32); fp32; bf16 (GPU: bf16 weights, CPU: bf16 autocast);
    # fp16 (GPU only, V100/T4). tf32: TF32 matmuls on GPUs.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tf32: bool = True
    # from_pretrained's attn_implementation (sdpa, flash_attention_2, eager;
    # empty: the model's default).
    attn_implementation: str = ""
    # Speed levers (CPU): bf16 autocast (same as precision=bf16), dynamic int8 quantisation of Linear
    # (per-channel weight scales: much closer to fp32 than per-tensor;
    # int8_ffn_down_fp32 keeps the FFN down-projections, the main source of
    # int8 drift, in fp32).
    bf16: bool = False
    int8: bool = False
    int8_per_channel: bool = True
    int8_ffn_down_fp32: bool = False
    # Custom Ray resources each actor asks for, e.g. {encode_node: 1}, to put
    # the pool on the nodes that advertise them.
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class EncodeConfig:
    # Rows per embedding shard: the unit of resume and of parallel index adds.
    shard_size: int = 20000
    dtype: Literal["float32", "float16"] = "float32"
    # Encode only the first N corpus rows (0 = all); for smoke runs.
    max_docs: int = 0
    pool: PoolConfig = field(default_factory=PoolConfig)


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
    # Tuning's bounded cost: nprobe doubles from 1 while recall@10 still
    # gains more than `tune_plateau`, and never scans more than this share
    # of the inverted lists.
    tune_max_scan: float = 0.25
    tune_plateau: float = 0.002
    seed: int = 0
    # Train the index on a GPU task and add shards on GPU tasks (faiss-gpu on
    # the GPU nodes); "auto" then picks PQ codes GPU IVF-PQ supports.
    use_gpu: bool = False
    # GPU share of one add task (several small adds share a GPU).
    gpus_per_task: float = 0.25
    # Custom Ray resources each add task asks for (see encode.pool.resources).
    resources: dict[str, float] = field(default_factory=dict)


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
    # Which representation ranks (an M3 model's index has all three):
    # dense | sparse | multivector (exact MaxSim over every passage) | hybrid
    # (candidates from the dense and sparse indexes, each scored by every
    # representation the index has, then fused).
    mode: Literal["dense", "sparse", "multivector", "hybrid"] = "dense"
    # hybrid: candidates per query from each of the dense and sparse indexes.
    hybrid_candidates: int = 100
    # hybrid: "weighted" = sum of weight x raw score (BGE-M3's "all"), or "rrf".
    fusion: Literal["weighted", "rrf"] = "weighted"
    weights: dict[str, float] = field(
        default_factory=lambda: {"dense": 1.0, "sparse": 0.3, "multivector": 1.0}
    )
    rrf_k: int = 60


@dataclass
class MineConfig:
    """Hard-negative mining (``raysys mine``; its flags override these)."""

    # Rank range to sample from (0-based, counted after dropping positives).
    rank_from: int = 10
    rank_to: int = 100
    # Negatives per query, drawn with a per-query seed.
    n: int = 30
    seed: int = 42
    # An existing index of the corpus; else the corpus is encoded under
    # <out>.work/ and searched exactly shard by shard in Ray tasks ("exact":
    # memory one shard per task, no index), or indexed with this FAISS
    # factory string.
    index: str | None = None
    factory: str = "exact"
    # False-negative filter: drop candidates the reranker scores at or above
    # (the query's lowest positive - margin). Both or neither.
    reranker: str | None = None
    margin: float | None = None


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
class ContractConfig:
    """The settable part of :class:`raysys.contract.EncodingContract`."""

    # Filled from model.path when empty.
    model: str = ""
    query_prefix: str = ""
    passage_prefix: str = ""
    # Text after the (truncated) text, never cut: LLaRA's prompts.
    query_suffix: str = ""
    passage_suffix: str = ""
    # Fills an {instruction} slot in query_prefix (E5-mistral).
    instruction: str = ""
    pooling: Literal["cls", "mean", "last"] = "mean"
    # pooling=last: the mean of the last last_k tokens' states (LLaRA: 8).
    last_k: int = 1
    # Tokens the tokenizer must hold whole (LLaRA's <s1>..<s16>; the task adds them).
    special_tokens: list[str] = field(default_factory=list)
    append_eos: bool = False
    query_max_len: int = 64
    passage_max_len: int = 256
    normalize: bool = True
    bidirectional: bool = False
    use_title: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


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
    pool: PoolConfig = field(default_factory=PoolConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    # The encoding contract of model.path (a raysys export carries its own).
    contract: ContractConfig = field(default_factory=ContractConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    # Pipeline stages to run, in order. "mine" (before train) mines hard
    # negatives for the train split with the untrained model.path (`mine:`
    # settings) and trains on them (data.groups, data.corpus = data.path).
    stages: list[str] = field(
        default_factory=lambda: ["train", "encode", "index", "search", "evaluate"]
    )
    # Pipeline: when the train stage runs, also encode, index, search and
    # evaluate with the untrained model.path, so the report compares base and
    # fine-tuned side by side (into OUT/base/).
    baseline: bool = False
    out: str | None = None

    def rerank_contract(self) -> RerankContract:
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
        d = dataclasses.asdict(self.contract)
        d["model"] = d["model"] or self.model.path
        try:
            return EncodingContract.from_dict(d)
        except (ContractError, TypeError) as e:
            raise ConfigError(f"invalid contract: {e}") from e


STAGES = ("mine", "train", "encode", "index", "search", "rerank", "evaluate")
ALIASES = {"model": "model.path", "data": "data.path", "split": "data.split"}

# Keys that moved when sections were grouped: old dotted key -> new one. An
# old key still works (with a warning); setting both is refused.
_POOL_KEYS = (
    "actors",
    "use_gpu",
    "cpus_per_actor",
    "torch_threads",
    "batch_size",
    "micro_batch",
    "bf16",
    "int8",
    "int8_per_channel",
    "int8_ffn_down_fp32",
)
MOVED: dict[str, str] = {
    **{f"train.{k}": f"train.scaling.{k}" for k in ("num_workers", "use_gpu", "cpus_per_worker")},
    **{
        f"train.{k}": f"train.optim.{k}"
        for k in ("lr", "head_lr", "weight_decay", "warmup_ratio", "max_grad_norm")
    },
    **{
        f"train.{k}": f"train.loss.{k}"
        for k in (
            "temperature",
            "gather_negatives",
            "in_batch_negatives",
            "mask_false_negatives",
            "rerank_loss",
        )
    },
    **{
        f"train.{k}": f"train.checkpoint.{k}"
        for k in (
            "save_steps",
            "stop_after",
            "resume_from",
            "run_name",
            "storage_path",
            "max_failures",
        )
    },
    **{f"encode.{k}": f"encode.pool.{k}" for k in _POOL_KEYS},
    **{f"reranker.{k}": f"reranker.pool.{k}" for k in _POOL_KEYS},
}


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
        if isinstance(value, bool) and str(value).lower() in args:
            # `index.ondisk=true` (YAML reads a bool) for the choice "true".
            return str(value).lower()
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
            # Suggest a close key of this section, or where a close old key moved.
            moved = {
                old.rsplit(".", 1)[1]: new
                for old, new in MOVED.items()
                if old.rsplit(".", 1)[0] == prefix
            }
            close = difflib.get_close_matches(str(k), names + list(moved), n=1)
            hint = ""
            if close:
                target = moved.get(close[0]) or (f"{prefix}.{close[0]}" if prefix else close[0])
                hint = f" (did you mean '{target}'?)"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        kwargs[k] = _coerce(key, v, hints[k])
    return cls(**kwargs)


def _migrate(tree: dict[str, Any], origin: str) -> None:
    """Move keys of the old flat layout to their new sections, in place."""
    for old, new in MOVED.items():
        section, key = old.split(".")
        node = tree.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node.pop(key)
        if _get_dotted(tree, new) is not None:
            raise ConfigError(f"{origin}: '{old}' and '{new}' are both set; keep only '{new}'")
        log.warning("%s: config key '%s' is now '%s'", origin, old, new)
        _set_dotted(tree, new, value)


def _get_dotted(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :func:`to_dict`'s output (workers, actors)."""
    return _build(Config, data)


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
        _migrate(tree, str(p))
    for item in overrides or []:
        key, value = parse_override(item)
        if key in MOVED:
            log.warning("override '%s' is now '%s'", key, MOVED[key])
            key = MOVED[key]
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree)
    _absolute_paths(cfg)
    _validate(cfg)
    return cfg


# Fields naming local inputs. Ray Train workers, Ray Data tasks and actors do
# not share the driver's working directory, so a relative folder that exists
# here is made absolute here (aliases, hub ids and URIs are left alone).
_INPUT_PATHS = (
    ("model", "path"),
    ("reranker", "path"),
    ("data", "path"),
    ("data", "groups"),
    ("data", "corpus"),
    ("train.checkpoint", "resume_from"),
    ("mine", "index"),
    ("mine", "reranker"),
)


def _absolute_paths(cfg: Config) -> None:
    """Make the config's existing relative local paths absolute, in place;
    ``train.checkpoint.storage_path`` (written, so perhaps not there yet)
    whenever it is local."""
    for section, name in _INPUT_PATHS:
        node: Any = cfg
        for part in section.split("."):
            node = getattr(node, part)
        value = getattr(node, name)
        if not value or "://" in value:
            continue
        local = Path(value).expanduser()
        if local.exists():
            setattr(node, name, str(local.resolve()))
    ck = cfg.train.checkpoint
    if ck.storage_path and "://" not in ck.storage_path:
        ck.storage_path = str(Path(ck.storage_path).expanduser().resolve())


def _validate(cfg: Config) -> None:
    t = cfg.train
    checks = [
        (t.scaling.num_workers >= 1, "train.scaling.num_workers must be >= 1"),
        (t.per_device_queries >= 1, "train.per_device_queries must be >= 1"),
        (t.group_size >= 1, "train.group_size must be >= 1 (1 positive + n negatives)"),
        (t.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (t.zero_stage in (0, 1, 2, 3), "train.zero_stage must be 0, 1, 2 or 3"),
        (t.loss.temperature > 0, "train.loss.temperature must be > 0"),
        (t.loss.distill_weight >= 0, "train.loss.distill_weight must be >= 0"),
        (t.loss.teacher_temperature > 0, "train.loss.teacher_temperature must be > 0"),
        (t.optim.lr > 0, "train.optim.lr must be > 0"),
        (t.optim.head_lr >= 0, "train.optim.head_lr must be >= 0"),
        (0 <= t.optim.warmup_ratio < 1, "train.optim.warmup_ratio must be in [0, 1)"),
        (t.epochs > 0 or t.max_steps > 0, "train.epochs or train.max_steps must be > 0"),
        (t.log_steps >= 1, "train.log_steps must be >= 1"),
        (cfg.model.lora.r >= 1, "model.lora.r must be >= 1"),
        (0 <= cfg.model.lora.dropout < 1, "model.lora.dropout must be in [0, 1)"),
        (cfg.data.sampled_negatives >= 0, "data.sampled_negatives must be >= 0"),
        (cfg.search.hybrid_candidates >= 1, "search.hybrid_candidates must be >= 1"),
        (
            set(cfg.search.weights) <= {"dense", "sparse", "multivector"},
            "search.weights takes the keys dense, sparse and multivector, not "
            + ", ".join(sorted(set(cfg.search.weights) - {"dense", "sparse", "multivector"})),
        ),
        (cfg.encode.shard_size >= 1, "encode.shard_size must be >= 1"),
        (cfg.encode.pool.batch_size >= 1, "encode.pool.batch_size must be >= 1"),
        (cfg.encode.pool.micro_batch >= 1, "encode.pool.micro_batch must be >= 1"),
        *(
            check
            for name, pool in (
                ("encode.pool", cfg.encode.pool),
                ("reranker.pool", cfg.reranker.pool),
            )
            for check in (
                (
                    0 < pool.gpus_per_actor <= 1 or float(pool.gpus_per_actor).is_integer(),
                    f"{name}.gpus_per_actor must be in (0, 1] or a whole number",
                ),
                (pool.micro_tokens >= 0, f"{name}.micro_tokens must be >= 0"),
                (
                    pool.use_gpu or pool.precision != "fp16",
                    f"{name}.precision=fp16 needs a GPU (use_gpu=true); on CPU use bf16",
                ),
            )
        ),
        (0 < cfg.index.gpus_per_task <= 1, "index.gpus_per_task must be in (0, 1]"),
        (cfg.reranker.pool.batch_size >= 1, "reranker.pool.batch_size must be >= 1"),
        (cfg.reranker.pool.micro_batch >= 1, "reranker.pool.micro_batch must be >= 1"),
        (0 <= cfg.mine.rank_from < cfg.mine.rank_to, "mine: need 0 <= rank_from < rank_to"),
        (cfg.mine.n >= 1, "mine.n must be >= 1"),
        (
            (cfg.mine.reranker is None) == (cfg.mine.margin is None),
            "mine: the reranker filter needs both mine.reranker and mine.margin",
        ),
        (cfg.search.topk >= 1, "search.topk must be >= 1"),
        (cfg.search.nprobe >= 0, "search.nprobe must be >= 0"),
        (cfg.reranker.topk >= 1, "reranker.topk must be >= 1"),
        (0.0 <= cfg.reranker.weight <= 1.0, "reranker.weight must be in [0, 1]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if t.enabled and "train" in cfg.stages:
        from raysys.train.steps import check_step
        from raysys.train.tasks import get_task

        task_cls = get_task(t.task)
        task_cls.validate(cfg)
        check_step(cfg, task_cls)
    if t.mlflow:
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError("train.mlflow=true needs MLflow: pip install mlflow")
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
    if "mine" in cfg.stages and cfg.data.groups:
        raise ConfigError("stages: the mine stage writes the training groups; unset data.groups")
    cfg.encoding_contract()
    if "rerank" in cfg.stages:
        if not cfg.reranker.path:
            raise ConfigError(
                "reranker.path: set a base model (train.task=rerank) or a reranker export"
            )
        cfg.rerank_contract()


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
