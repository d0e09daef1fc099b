"""Training tasks, by name: ``train.task`` picks one.

Built in: ``retrieve`` (bi-encoder, InfoNCE), ``m3`` (BGE-M3's dense,
sparse and multi-vector heads), ``rerank`` (cross-encoder), and ``llara``
(LLaRA's EBAE/EBAR pretext) and ``mntp`` (LLM2Vec's masked next-token
prediction), both on plain text.
Any other value of the form ``package.module:Class`` imports a
:class:`~raysys.train.tasks.base.Task` subclass of your own.
"""

from __future__ import annotations

import importlib

from raysys.errors import UserError
from raysys.train.tasks.base import Task

_BUILTIN = {
    "retrieve": "raysys.train.tasks.retrieve:RetrieveTask",
    "rerank": "raysys.train.tasks.rerank:RerankTask",
    "llara": "raysys.train.tasks.llara:LlaraTask",
    "mntp": "raysys.train.tasks.mntp:MntpTask",
    "m3": "raysys.train.tasks.m3:M3Task",
}
_REGISTERED: dict[str, type[Task]] = {}


def register_task(cls: type[Task], name: str | None = None) -> type[Task]:
    """Register a task class under ``name`` (default: ``cls.name``); usable as a decorator."""
    _REGISTERED[name or cls.name] = cls
    return cls


def task_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def get_task(name: str) -> type[Task]:
    """The task class for ``train.task``."""
    from raysys.config import ConfigError

    if name in _REGISTERED:
        return _REGISTERED[name]
    spec = _BUILTIN.get(name, name)
    if ":" not in spec:
        raise ConfigError(
            f"train.task: unknown task {name!r}; known: {', '.join(task_names())} "
            "(or package.module:Class)"
        )
    module, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"train.task: cannot import {spec!r}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"train.task: {spec!r} is not a raysys Task subclass")
    return cls


__all__ = ["Task", "UserError", "get_task", "register_task", "task_names"]
