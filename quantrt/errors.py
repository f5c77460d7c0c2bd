"""User-facing errors.

Every problem caused by the user's input (a bad path, a corrupt file, an unsupported
setting) is raised as a :class:`QuantrtError`.  The CLI prints it as one line and exits
with status 2; the Python API lets it propagate.  Programming errors stay ordinary
exceptions so that they keep their tracebacks.
"""
from __future__ import annotations

import os


class QuantrtError(Exception):
    """An error the user can act on: what was wrong, where, and what to do."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | os.PathLike | None = None,
                 hint: str | None = None) -> None:
        self.message = message
        self.where = os.fspath(where) if where is not None else None
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text.replace("\n", " ")


class SourceError(QuantrtError):
    """The model source (path, hub id, alias) cannot be resolved."""


class FormatError(QuantrtError):
    """A checkpoint file is malformed or truncated."""


class ConfigError(QuantrtError):
    """A configuration (architecture, quantization settings, flags) is invalid or unsupported."""


class UnsupportedError(QuantrtError):
    """A recognised feature that quantrt does not support (yet, or on this hardware)."""
