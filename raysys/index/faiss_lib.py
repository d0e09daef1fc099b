"""The one FAISS this install has: faiss-cpu or a faiss-gpu build, not both.

Both distributions ship the same ``faiss`` module into the same folder, so
with both installed the one that imports depends on install order (and
uninstalling either breaks the other). :func:`load_faiss` checks this once
and says what to do.
"""

from __future__ import annotations

import functools
from importlib import metadata
from types import ModuleType

from raysys.errors import UserError


def faiss_distributions() -> list[str]:
    """Installed distributions that provide the ``faiss`` module."""
    names = set()
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name == "faiss-cpu" or name.startswith("faiss-gpu"):
            names.add(name)
    return sorted(names)


@functools.lru_cache(maxsize=1)
def load_faiss() -> ModuleType:
    """``import faiss``, with a clear error when it is missing or doubled."""
    found = faiss_distributions()
    if len(found) > 1:
        raise UserError(
            f"several FAISS builds are installed ({', '.join(found)}) into one `faiss` "
            "module; keep one: pip uninstall -y " + " ".join(found) + " && pip install "
            "'raysys[gpu]' (GPU nodes) or 'raysys[cpu]'"
        )
    try:
        import faiss
    except ImportError as e:
        raise UserError(
            f"FAISS is not installed or does not import ({e}); "
            "pip install 'raysys[cpu]', or 'raysys[gpu]' on GPU nodes"
        ) from e
    return faiss
