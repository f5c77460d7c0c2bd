"""``quantrt convert``: quantize or transcode a model into a checkpoint that the original
ecosystem (transformers, vLLM, llama.cpp) loads too.

:func:`convert` validates the request, opens the source, checks every layer's shape
against the target format, and only then writes -- into a temp directory renamed into
place at the end, so an interrupted run leaves nothing that looks like a checkpoint.
"""
from __future__ import annotations

import os
import sys

from quantrt.convert.request import ConvertRequest

__all__ = ["ConvertRequest", "convert"]


def convert(source: str | os.PathLike, out: str | os.PathLike, req: ConvertRequest,
            progress: bool | None = None) -> str:
    """Write ``source`` converted per ``req`` to ``out`` (a new directory, or a .gguf file)."""
    from quantrt.convert.pipeline import run

    req.check_output(out)
    show = sys.stderr.isatty() if progress is None else progress
    return run(source, os.fspath(out), req, show)
