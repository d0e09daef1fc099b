"""Contracts: every setting that decides what a model's output means.

- :class:`EncodingContract`: how texts become vectors (prefixes, pooling,
  lengths, normalisation, ...), saved beside every exported model and every
  index. Searching an index with a model whose contract differs is refused
  (:func:`check_compatible`).
- :class:`RerankContract`: how a (query, passage) pair becomes a score.

Both share one JSON persistence base and one truncation rule
(:func:`truncated_ids`): with ``append_eos`` the last token is always EOS.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from raysys.errors import UserError

CONTRACT_FILE = "raysys_contract.json"
Pooling = Literal["cls", "mean", "last"]
Kind = Literal["query", "passage"]

# Fields that change the vector space; a mismatch on any of them is refused.
_SPACE_FIELDS = (
    "model",
    "query_prefix",
    "passage_prefix",
    "query_suffix",
    "passage_suffix",
    "pooling",
    "last_k",
    "append_eos",
    "normalize",
    "bidirectional",
    "use_title",
    "dim",
    "multivector_dim",
    "fingerprint",
)


class ContractError(UserError):
    """Raised when a contract is invalid or two contracts disagree."""


def truncated_ids(
    tokenizer: Any, texts: list[str], max_len: int, append_eos: bool, label: str
) -> list[list[int]]:
    """Unpadded token ids of ``texts``, at most ``max_len`` tokens each.

    With ``append_eos`` a text is cut to ``max_len - 1`` tokens and the
    tokenizer's EOS id appended (RepLLaMA, RankLLaMA), so the last token is
    EOS whatever the truncation. Pathological (megabyte) texts are cut before
    tokenizing: no tokenizer needs more than 64 characters per kept token.
    """
    texts = [t[: max_len * 64] for t in texts]
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ContractError(f"{label}.append_eos is set but the tokenizer has no EOS token")
        enc = tokenizer(texts, truncation=True, max_length=max_len - 1, return_attention_mask=False)
        return [list(x) + [tokenizer.eos_token_id] for x in enc["input_ids"]]
    enc = tokenizer(texts, truncation=True, max_length=max_len, return_attention_mask=False)
    return [list(x) for x in enc["input_ids"]]


_C = TypeVar("_C", bound="JsonContract")


class JsonContract:
    """JSON persistence shared by the contracts: one dataclass, one file in a folder."""

    FILE: ClassVar[str]
    LABEL: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ContractError(f"unknown {cls.LABEL} field(s): {', '.join(unknown)}")
        return cls(**d)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def missing_message(cls, path: Path) -> str:
        return f"no {cls.LABEL} at {path}"

    @classmethod
    def load(cls: type[_C], directory: str | Path) -> _C:
        path = Path(directory) / cls.FILE
        if not path.is_file():
            raise ContractError(cls.missing_message(path))
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        return (Path(directory) / cls.FILE).is_file()


@dataclass
class EncodingContract(JsonContract):
    """How texts become vectors.

    ``query_prefix`` may be an instruction template such as
    ``"Instruct: {instruction}\\nQuery: "`` (E5-mistral); ``{instruction}`` is
    filled from ``instruction`` when the contract is validated.

    A suffix follows the text and is never truncated (the text is cut
    instead): LLaRA's prompts end in special tokens whose states are the
    embedding, pooled as the mean of the ``last_k`` last tokens
    (``pooling=last``). ``special_tokens`` lists tokens the tokenizer must
    hold as single tokens; encoding with a tokenizer that lacks them is
    refused.
    """

    model: str = ""
    query_prefix: str = ""
    passage_prefix: str = ""
    query_suffix: str = ""
    passage_suffix: str = ""
    instruction: str = ""
    pooling: Pooling = "mean"
    # With pooling=last: the mean of the states of the last last_k tokens.
    last_k: int = 1
    special_tokens: list[str] = field(default_factory=list)
    append_eos: bool = False
    query_max_len: int = 64
    passage_max_len: int = 256
    normalize: bool = True
    bidirectional: bool = False
    use_title: bool = True
    dim: int | None = None
    # What the model writes per text (raysys.representations): "dense" always;
    # an M3 model adds "sparse" (lexical weights) and "multivector" (token
    # vectors of multivector_dim, from the heads in m3_heads.safetensors).
    representations: list[str] = field(default_factory=lambda: ["dense"])
    multivector_dim: int | None = None
    # Content hash of the weights (set when a model is loaded for encoding).
    fingerprint: str | None = None
    # Where the weights are when the export is an adapter (LoRA) over a base.
    base_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    FILE: ClassVar[str] = CONTRACT_FILE
    LABEL: ClassVar[str] = "encoding contract"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.pooling not in ("cls", "mean", "last"):
            raise ContractError(f"contract.pooling must be cls, mean or last, not {self.pooling!r}")
        for name in ("query_max_len", "passage_max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 2:
                raise ContractError(f"contract.{name} must be an integer >= 2, not {v!r}")
        if not isinstance(self.last_k, int) or self.last_k < 1:
            raise ContractError(f"contract.last_k must be an integer >= 1, not {self.last_k!r}")
        if self.last_k > 1 and self.pooling != "last":
            raise ContractError("contract.last_k > 1 needs contract.pooling=last")
        reps = list(self.representations)
        known = {"dense", "sparse", "multivector"}
        if not reps or reps[0] != "dense" or len(set(reps)) != len(reps) or set(reps) - known:
            raise ContractError(
                "contract.representations must start with dense and name each of dense, "
                f"sparse, multivector at most once, not {reps!r}"
            )
        if "{instruction}" in self.query_prefix and not self.instruction:
            raise ContractError(
                "contract.query_prefix has an {instruction} slot but contract.instruction is empty"
            )

    # -- formatting ---------------------------------------------------------
    def format_query(self, text: str) -> str:
        prefix = self.query_prefix.replace("{instruction}", self.instruction)
        return prefix + text

    def format_passage(self, text: str, title: str | None = None) -> str:
        body = text
        if self.use_title and title:
            body = f"{title} {text}" if text else title
        return self.passage_prefix + body

    def max_len(self, kind: Kind) -> int:
        return self.query_max_len if kind == "query" else self.passage_max_len

    def suffix(self, kind: Kind) -> str:
        return self.query_suffix if kind == "query" else self.passage_suffix

    def suffix_ids(self, tokenizer: Any, kind: Kind) -> list[int]:
        """Token ids of the ``kind`` suffix (no special tokens added); the
        tokenizer must hold every one of :attr:`special_tokens`."""
        self.check_tokenizer(tokenizer)
        text = self.suffix(kind)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer that splits one of :attr:`special_tokens`."""
        if not self.special_tokens:
            return
        vocab = tokenizer.get_vocab()
        missing = [t for t in self.special_tokens if t not in vocab]
        if missing:
            raise ContractError(
                f"the tokenizer lacks the contract's special tokens {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}: encode with the model trained "
                "under this contract (its export carries them), not its base"
            )

    def token_ids(self, tokenizer: Any, texts: list[str], kind: Kind) -> list[list[int]]:
        """Unpadded token ids of already-formatted texts under this contract.

        With ``append_eos`` the text is truncated to ``max_len - 1`` tokens and
        the tokenizer's EOS id is appended (RepLLaMA), so the last real token is
        always EOS whatever the truncation. A suffix is appended whole after
        the (shortened) text, before the EOS.
        """
        max_len = self.max_len(kind)
        suffix = self.suffix_ids(tokenizer, kind)
        if not suffix:
            return truncated_ids(tokenizer, texts, max_len, self.append_eos, "contract")
        room = max_len - len(suffix) - (1 if self.append_eos else 0)
        if room < 1:
            raise ContractError(
                f"contract.{kind}_max_len={max_len} leaves no room for text beside its "
                f"{len(suffix)}-token suffix"
            )
        eos = [tokenizer.eos_token_id] if self.append_eos else []
        if eos and eos[0] is None:
            raise ContractError("contract.append_eos is set but the tokenizer has no EOS token")
        body = truncated_ids(tokenizer, texts, room, False, "contract")
        return [ids + suffix + eos for ids in body]

    @staticmethod
    def pad(tokenizer: Any, ids: list[list[int]]) -> dict[str, Any]:
        """Pad token id lists (tokenizer's padding side) into tensors."""
        return tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")

    def tokenize(self, tokenizer: Any, texts: list[str], kind: Kind) -> dict[str, Any]:
        """Tokenize already-formatted texts under this contract; returns padded tensors."""
        return self.pad(tokenizer, self.token_ids(tokenizer, texts, kind))


@dataclass
class RerankContract(JsonContract):
    """How a (query, passage) pair becomes a score."""

    FILE: ClassVar[str] = "raysys_reranker.json"
    LABEL: ClassVar[str] = "reranker contract"

    model: str = ""
    template: str = "query: {query} document: {document}"
    pooling: str = "cls"
    append_eos: bool = False
    max_len: int = 256
    query_max_chars: int = 2000
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean", "last"):
            raise ContractError(f"reranker pooling must be cls, mean or last, not {self.pooling!r}")
        if not isinstance(self.max_len, int) or self.max_len < 8:
            raise ContractError(f"reranker max_len must be an integer >= 8, not {self.max_len!r}")
        if "{query}" not in self.template:
            raise ContractError("reranker template needs a {query} slot")
        if not any(s in self.template for s in ("{document}", "{text}")):
            raise ContractError("reranker template needs a {document} or {text} slot")

    def format_pair(self, query: str, title: str | None, text: str) -> str:
        title = title or ""
        document = f"{title} {text}" if title and text else (title or text)
        return (
            self.template.replace("{query}", query[: self.query_max_chars])
            .replace("{document}", document)
            .replace("{title}", title)
            .replace("{text}", text)
        )

    def token_ids(self, tokenizer: Any, pairs: list[str]) -> list[list[int]]:
        """Unpadded ids; the end of the passage is cut, EOS kept last when asked."""
        return truncated_ids(tokenizer, pairs, self.max_len, self.append_eos, "reranker")

    @classmethod
    def missing_message(cls, path: Path) -> str:
        return (
            f"{path.parent} is not a raysys reranker export (no {cls.FILE}); "
            "train one with `raysys train CONFIG train.task=rerank`"
        )


def check_compatible(index_contract: EncodingContract, query_contract: EncodingContract) -> None:
    """Refuse to search an index with a query encoder of another vector space."""
    diffs = [
        f"{name}: index has {getattr(index_contract, name)!r}, "
        f"query encoder has {getattr(query_contract, name)!r}"
        for name in _SPACE_FIELDS
        if getattr(index_contract, name) != getattr(query_contract, name)
    ]
    if diffs:
        raise ContractError("encoding contract mismatch:\n  " + "\n  ".join(diffs))
