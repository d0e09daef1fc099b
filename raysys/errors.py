"""The base of every error a user's input can cause.

The CLI prints a :class:`UserError` as one ``raysys: error: ...`` line and
exits non-zero; anything else is a bug and keeps its traceback. Config,
contract and data errors all derive from it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a config, a file, a command-line value)."""


class GPUUnavailable(UserError):
    """A GPU was asked for (``use_gpu=true``) where none can be used."""
