"""Perplexity of a model on a text (``quantrt eval ppl``).

The text is tokenized once and cut into non-overlapping windows of ``ctx`` tokens; each
window is one prefill through quantrt's own model (any format quantrt loads, on CPU or
GPU), scoring tokens 2..ctx of the window.  The same windows for every model, so numbers
of one text and ctx compare across formats.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from quantrt.errors import ConfigError, SourceError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float       # mean negative log-likelihood per scored token (nats)
    tokens: int      # scored tokens
    windows: int
    ctx: int

    def as_dict(self) -> dict:
        return asdict(self)


def read_text(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SourceError("text file not found", where=path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file", where=path) from None
    if not text.strip():
        raise ConfigError("text file is empty", where=path)
    return text


def prompt_logits(lm, ids: list[int]):
    """Logits [T, vocab] (fp32, on the model's device) at every position of one prompt: a
    single prefill into a private one-block KV cache, without the engine."""
    import torch

    from quantrt.engine.model_runner import kv_heads
    from quantrt.models.attention import AttentionMetadata

    cfg, dev = lm.config, lm.device
    t = len(ids)
    shape = (1, t, kv_heads(lm.model), cfg.head_dim)
    kv = [(torch.zeros(shape, dtype=lm.dtype, device=dev),
           torch.zeros(shape, dtype=lm.dtype, device=dev)) for _ in range(cfg.num_layers)]
    i32 = dict(dtype=torch.int32, device=dev)
    # One sequence in one KV block of t slots: the prefill is the whole prompt.
    meta = AttentionMetadata(
        slot_mapping=torch.arange(t, dtype=torch.int64, device=dev),
        block_tables=torch.zeros(1, 1, **i32), context_lens=torch.tensor([t], **i32),
        query_start_loc=torch.tensor([0, t], **i32), context_lens_host=[t], query_lens_host=[t])
    with torch.no_grad():
        h = lm.model(torch.tensor(ids, device=dev), torch.arange(t, device=dev), kv, meta)
        return lm.model.compute_logits(h).float()


def window_nll(lm, ids: list[int]):
    """Sum of -log p(ids[t] | ids[:t]) for t >= 1, and the count, for one prefill."""
    import torch

    logits = prompt_logits(lm, ids)[:-1]
    target = torch.tensor(ids[1:], device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    return float(nll), len(ids) - 1


def perplexity(source, text_file, *, ctx: int = 512, max_windows: int | None = None,
               device: str | None = "cpu", dtype: str | None = "auto",
               lm=None) -> PerplexityResult:
    """Perplexity of ``source`` (or an already loaded ``lm``) on ``text_file``."""
    if ctx < 2:
        raise ConfigError(f"--ctx must be at least 2, got {ctx}")
    text = read_text(text_file)
    if lm is None:
        from quantrt.loader import load

        lm = load(source, device=device, dtype=dtype, progress=False)
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    if lm.tokenizer.bos_token_id is not None:
        ids = [lm.tokenizer.bos_token_id] + ids
    n_windows = len(ids) // ctx
    if n_windows == 0:
        raise ConfigError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}",
                          where=os.fspath(text_file), hint="use a longer text or a smaller --ctx")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    total, count = 0.0, 0
    for w in range(n_windows):
        nll, n = window_nll(lm, ids[w * ctx:(w + 1) * ctx])
        total, count = total + nll, count + n
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, count, n_windows, ctx)
