from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from spaceserve.core.errors import InvalidInputError

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
"""A seed must fit a signed 64-bit integer (torch's generators, vLLM's validation)."""
MAX_LOGPROBS = 20
"""Most top log-probabilities per token (OpenAI's top_logprobs limit, vLLM's default max_logprobs)."""


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's output; names and defaults follow vLLM's SamplingParams."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    """Return the sampled token's log-probability and the `logprobs` most likely tokens' at each step (vLLM's
    meaning: 0 gives the sampled token's alone); None: none."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        if any(not isinstance(s, str) for s in self.stop):
            raise InvalidInputError("stop must be a string or a list of strings")
        stop_token_ids = tuple(self.stop_token_ids or ())
        if any(not _is_int(t) or t < 0 for t in stop_token_ids):
            raise InvalidInputError(f"stop_token_ids must be non-negative token ids, got {list(stop_token_ids)}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stop_token_ids))
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise InvalidInputError(f"seed must be an integer in [{INT64_MIN}, {INT64_MAX}], got {self.seed!r}")
        for name in ("top_k", "min_tokens"):
            if not _is_int(getattr(self, name)):
                raise InvalidInputError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.max_tokens is not None and not _is_int(self.max_tokens):
            raise InvalidInputError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        for name in ("temperature", "top_p"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise InvalidInputError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not _is_int(self.n) or self.n < 1:
            raise InvalidInputError(f"n must be a positive integer, got {self.n!r}")
        if self.seed is not None and self.seed + self.n - 1 > INT64_MAX:
            raise InvalidInputError("seed + n - 1 must stay within int64 (each of the n samples takes seed + i)")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidInputError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not 0.0 <= self.temperature < float("inf"):  # JSON's Infinity and NaN parse as floats
            raise InvalidInputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0:
            object.__setattr__(self, "top_k", -1)
        if self.top_k < -1:
            raise InvalidInputError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise InvalidInputError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidInputError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        if any(not s for s in self.stop):
            raise InvalidInputError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
