"""Representations by name (see :mod:`raysys.representations.base`)."""

from __future__ import annotations

from raysys.errors import UserError
from raysys.representations.base import Representation, SearchIndex
from raysys.representations.dense import DenseRepresentation
from raysys.representations.multivector import MultiVectorRepresentation
from raysys.representations.sparse import SparseRepresentation

_KINDS: dict[str, type[Representation]] = {
    "dense": DenseRepresentation,
    "sparse": SparseRepresentation,
    "multivector": MultiVectorRepresentation,
}


def get_representation(name: str) -> Representation:
    if name not in _KINDS:
        raise UserError(f"unknown representation {name!r}; known: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]()


def register_representation(cls: type[Representation]) -> type[Representation]:
    _KINDS[cls.name] = cls
    return cls


__all__ = ["Representation", "SearchIndex", "get_representation", "register_representation"]
