"""`quantrt eval ppl`: the per-window negative log-likelihood equals transformers' loss on the
same weights; windows and token counts follow the stated rule; bad input is refused."""
from __future__ import annotations

import math

import pytest
import torch

from quantrt.errors import ConfigError, SourceError
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("eval") / "m", seed=9)


def test_window_nll_matches_transformers(tiny):
    import transformers

    from quantrt.eval import window_nll
    from quantrt.loader import load

    lm = load(tiny, device="cpu", progress=False)
    ids = torch.randint(0, 256, (23,), generator=torch.Generator().manual_seed(2)).tolist()
    nll, n = window_nll(lm, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert n == 22
    assert abs(nll / n - loss) < 1e-4


def test_perplexity_windows(tiny, tmp_path):
    from quantrt.eval import perplexity
    from quantrt.loader import load

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    lm = load(tiny, device="cpu", progress=False)
    ids = lm.tokenizer.encode(text.read_text(), add_special_tokens=False)
    ids = ([lm.tokenizer.bos_token_id] if lm.tokenizer.bos_token_id is not None else []) + ids
    r = perplexity(None, text, ctx=32, lm=lm)
    assert r.windows == len(ids) // 32 and r.tokens == r.windows * 31
    assert math.isclose(r.ppl, math.exp(r.nll))
    assert perplexity(None, text, ctx=32, max_windows=2, lm=lm).windows == 2


def test_bad_input(tiny, tmp_path):
    from quantrt.eval import perplexity

    with pytest.raises(SourceError, match="not found"):
        perplexity(tiny, tmp_path / "missing.txt")
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        perplexity(tiny, empty)
    short = tmp_path / "s.txt"
    short.write_text("hi")
    with pytest.raises(ConfigError, match="fewer than one window"):
        perplexity(tiny, short, ctx=512)
    with pytest.raises(ConfigError, match="ctx"):
        perplexity(tiny, short, ctx=1)
