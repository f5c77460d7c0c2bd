"""Requests as the engine sees them: sampling parameters and per-sequence state."""
from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quantrt.errors import ConfigError

if TYPE_CHECKING:
    from quantrt.engine.outputs import TokenLogprob

MAX_N = 128            # completions per request; each one holds a seat in the running batch
MAX_LOGPROBS = 20      # top alternatives per token, as in the OpenAI API
_SEED_SPACE = 2**63


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request.

    ``n`` completions are sampled from the same prompt (its KV blocks are shared).  With a
    ``seed``, completion ``i`` uses ``seed + i``, so completion 0 of an ``n > 1`` request
    equals the single completion of the same request with ``n = 1``.  ``logprobs=k``
    returns, per generated token, its log-probability and the ``k`` most likely tokens'
    (``0``: the sampled token's only); they are taken from the raw model distribution
    (log_softmax of the logits, before penalties, temperature and top-k/p filtering).
    """
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0            # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience; stored as tuples so params stay hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ConfigError("stop_token_ids must be a list of non-negative token ids, got "
                              f"{self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("max_tokens", "top_k", "n"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"{name} must be an integer, got {getattr(self, name)!r}")
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
        for name in floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < _SEED_SPACE):
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ConfigError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise ConfigError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")
        if not 1 <= self.n <= MAX_N:
            raise ConfigError(f"n must be in [1, {MAX_N}], got {self.n}")
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ConfigError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], "
                              f"got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, a stop token or a stop string
    LENGTH = "length"    # max_tokens or the context limit
    ABORT = "abort"


_ids = itertools.count()


@dataclass(eq=False)  # identity semantics: sequences are compared and looked up by object
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    index: int = 0               # which of the request's n completions
    arrival: int = 0             # request order; the scheduler serves and preempts by it
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0          # tokens whose K/V are in the cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    output_text: str = ""        # decoded so far (may end in a held-back stop-string prefix)
    emitted: int = 0             # characters of output_text already released to callers
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0
    # Chained hashes of the full blocks of all_ids, filled lazily.  Tokens are append-only,
    # so an entry never goes stale, even across preemption.
    block_hashes: list[bytes] = field(default_factory=list)
    num_prefix_hits: int = 0     # prompt tokens the prefix cache served at its prefill
    # The request's completions (one list shared by all of them).  Completions 1..n-1 wait
    # with ``awaiting_fork`` until completion 0 has prefilled the prompt, then share its
    # full prompt blocks.
    group: list[Sequence] = field(default_factory=list)
    awaiting_fork: bool = False
    # Tokens sampled on the device but not read yet (an engine that overlaps steps): the
    # last ``pending`` entries of output_ids are placeholders until the engine reads them.
    # ``draining``: its placeholder is its last token (length limit), so it is not
    # scheduled again before that token is read.
    pending: int = 0
    draining: bool = False

    def __post_init__(self) -> None:
        if not self.group:
            self.group.append(self)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def drop_pending(self) -> None:
        """Forget unread tokens (the sequence finished before they were read)."""
        if self.pending:
            del self.output_ids[-self.pending:]
            self.pending = 0
        self.draining = False

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def seed(self) -> int | None:
        s = self.params.seed
        return None if s is None else (s + self.index) % _SEED_SPACE

    @property
    def visible_text(self) -> str:
        """Text a caller may see now: all of it once finished, else what is stop-string safe."""
        return self.output_text if self.finished else self.output_text[:self.emitted]

    def fork_targets(self) -> list[Sequence]:
        """Completions that take their first token from this sequence's prompt logits."""
        if self.index != 0 or self.output_ids:
            return []
        return [s for s in self.group if s.awaiting_fork]

    @property
    def seats(self) -> int:
        """Running-batch seats this sequence needs: itself plus completions still to fork."""
        return 1 + len(self.fork_targets())


def make_group(prompt_ids: list[int], params: SamplingParams, request_id: str,
               arrival: int) -> list[Sequence]:
    """The ``params.n`` sequences of one request; all but the first wait to be forked."""
    first = Sequence(list(prompt_ids), params, request_id, 0, arrival)
    for i in range(1, params.n):
        first.group.append(Sequence(list(prompt_ids), params, request_id, i, arrival,
                                    group=first.group, awaiting_fork=True))
    return first.group
