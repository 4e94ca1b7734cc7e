"""The contracts between the schedulers and the runners: plain data, no tensors created here."""

from __future__ import annotations

from dataclasses import dataclass

from spaceserve.core.multimodal import MultiModalFeature
from spaceserve.core.request import Request


@dataclass(frozen=True)
class ScheduledSequence:
    """Tokens [num_computed_tokens, num_computed_tokens + num_scheduled_tokens) of `request` run this step."""

    request: Request
    num_computed_tokens: int
    num_scheduled_tokens: int
    block_ids: tuple[int, ...]
    samples: bool
    """The chunk reaches the last known token, so it produces the next one; earlier prefill chunks don't."""

    @property
    def end(self) -> int:
        return self.num_computed_tokens + self.num_scheduled_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    sequences: tuple[ScheduledSequence, ...]
    preempted_request_ids: tuple[str, ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


@dataclass(frozen=True)
class EncoderBatch:
    """Images the encoder runner embeds together; each lands in the encoder cache under its mm_hash."""

    items: tuple[MultiModalFeature, ...]
    request_ids: frozenset[str] = frozenset()
    """The requests waiting for these items (for their encoder-wait metric)."""

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    @property
    def num_patches(self) -> int:
        return sum(item.num_patches for item in self.items)


@dataclass(frozen=True)
class TokenLogprobs:
    """One sampled token's log-probabilities: `token_ids[0]` is the sampled token, the rest the most likely ones
    (as many as the request asked for), `logprobs` theirs, `sampled_rank` the sampled token's rank (1 = top)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    sampled_rank: int


@dataclass(frozen=True)
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprobs] | None = None
    """For the requests of the step that asked for log-probabilities (SamplingParams.logprobs); None if none did."""
