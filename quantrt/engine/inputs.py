"""What callers may pass as prompts and sampling parameters, normalised for the engine."""
from __future__ import annotations

from typing import Any

from quantrt.engine.sequence import SamplingParams
from quantrt.errors import ConfigError

Prompt = str | list[int]


def _is_token_list(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def one_prompt(tokenizer: Any, prompt: Any) -> tuple[str | None, list[int]]:
    """A text or a list of token ids -> (text or None, token ids)."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if _is_token_list(prompt):
        return None, list(prompt)
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise ConfigError("the prompt is empty")
    raise ConfigError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def many_prompts(tokenizer: Any, prompts: Any) -> list[tuple[str | None, list[int]]]:
    """One prompt or a list of them.  A flat list of ints is one token-id prompt."""
    if isinstance(prompts, str) or _is_token_list(prompts):
        return [one_prompt(tokenizer, prompts)]
    if not isinstance(prompts, (list, tuple)):
        raise ConfigError("prompts must be a string, a list of token ids, or a list of those, "
                          f"got {type(prompts).__name__}")
    return [one_prompt(tokenizer, p) for p in prompts]


def params_for(params: SamplingParams | list[SamplingParams] | None, count: int
               ) -> list[SamplingParams]:
    """One SamplingParams for all prompts, or one per prompt; None: the defaults."""
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * count
    if isinstance(params, (list, tuple)) and all(isinstance(p, SamplingParams) for p in params):
        if len(params) != count:
            raise ConfigError(f"{len(params)} sampling params for {count} prompts",
                              hint="pass one SamplingParams for all, or one per prompt")
        return list(params)
    raise ConfigError(f"expected SamplingParams or a list of them, got {type(params).__name__}")
