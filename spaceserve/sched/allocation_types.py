"""The SM allocator's contract with the engine: its settings, the state the engine hands it before each encoder
dispatch / LM step, and the decision it returns (with the predictions the engine counts against measured times).
Plain frozen data, no torch."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from spaceserve.config import EngineConfig


class Placement(str, enum.Enum):
    LM_WHOLE = "lm_whole"
    """Nothing to encode: the LM on every SM."""
    ENCODER_WHOLE = "encoder_whole"
    """The next encoder batch on every SM while the LM waits for it."""
    SPLIT = "split"
    """The encoder batch on its side of a split, the LM step (decodes + a prefill chunk) on the other."""
    PREFILL_SPLIT = "prefill_split"
    """Decode-only steps on the bandwidth side; the encoder, then prefill steps, on the compute side."""


@dataclass(frozen=True)
class AllocatorConfig:
    slo_tpot_ms: float = 50.0
    slo_ttft_ms: float = 2000.0
    tpot_margin: float = 0.9
    """Predicted decode gaps must stay within this share of the TPOT SLO (room for what the curves don't see)."""
    lm_step_overhead_ms: float = 1.0
    """Added to every predicted LM step: scheduling and output handling, which the curves (runner only) omit; the
    least of it: the engine's learned host time per step replaces it when larger (`AllocatorState.lm_step_host_ms`)."""
    encoder_batch_overhead_ms: float = 0.0
    max_num_batched_tokens: int = 8192
    encoder_budget_tokens: int = 8192
    """The encoder scheduler's batch budget in output tokens (an item larger than it runs alone)."""
    prefill_granularity: int = 64
    """Prefill budgets are multiples of this; the chunk caps weighed are this times powers of two."""
    decode_delay_weight: float = 1.0
    """Weight of the delay a plan imposes on running decodes against the queued requests' TTFT (0: TTFT only,
    within the TPOT SLO)."""
    whole_device_encoder: bool = True
    prefill_split: bool = False
    """Offer PREFILL_SPLIT; the engine sets it once it can run a prefill step beside a decode step."""
    miss_penalty_ms: float | None = None
    """Cost of one request predicted past the TTFT SLO (None: the TTFT SLO itself)."""
    max_backlog_requests: int = 512
    """Only the oldest this many queued requests enter the forecast."""

    def __post_init__(self) -> None:
        if not (self.slo_tpot_ms > 0 and self.slo_ttft_ms > 0 and 0 < self.tpot_margin <= 1):
            raise ValueError("SLOs must be > 0 ms and tpot_margin in (0, 1]")
        if self.max_num_batched_tokens < 1 or self.encoder_budget_tokens < 1 or self.prefill_granularity < 1:
            raise ValueError("max_num_batched_tokens, encoder_budget_tokens and prefill_granularity must be >= 1")
        if min(self.lm_step_overhead_ms, self.encoder_batch_overhead_ms, self.decode_delay_weight) < 0:
            raise ValueError("overheads and decode_delay_weight must be >= 0")
        if self.max_backlog_requests < 1:
            raise ValueError("max_backlog_requests must be >= 1")

    @classmethod
    def from_engine_config(cls, config: EngineConfig, **overrides) -> AllocatorConfig:
        """The engine's SLOs, token budget and encoder batch budget."""
        made = cls(
            slo_tpot_ms=config.allocation.slo_tpot_ms,
            slo_ttft_ms=config.allocation.slo_ttft_ms,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            encoder_budget_tokens=config.encoder.budget_tokens,
        )
        return replace(made, **overrides)

    @property
    def tpot_budget_ms(self) -> float:
        return self.tpot_margin * self.slo_tpot_ms

    @property
    def penalty_ms(self) -> float:
        return self.slo_ttft_ms if self.miss_penalty_ms is None else self.miss_penalty_ms


@dataclass(frozen=True)
class EncoderItem:
    """One queued image (or video), in the order the encoder scheduler will take them."""

    request_ids: tuple[str, ...]
    """The requests waiting for it (an image shared by several prompts is encoded once)."""
    patches: int
    tokens: int


@dataclass(frozen=True)
class PendingRequest:
    """A request that has not had its first token: waiting for its images, its prefill, or both."""

    request_id: str
    arrival_time: float
    prefill_tokens: int
    """Prompt tokens (text and image embeddings) not computed yet."""


@dataclass(frozen=True)
class EncoderInFlight:
    encoder_sms: int
    """The SMs its batches run on; the device's total for a whole-device batch."""
    ends_at: float
    """Predicted end (the clock of `AllocatorState.now`), from the decision that dispatched it."""
    request_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class AllocatorState:
    now: float
    """Seconds, on the clock of the arrival times."""
    encoder_queue: tuple[EncoderItem, ...] = ()
    pending: tuple[PendingRequest, ...] = ()
    decode_contexts: tuple[int, ...] = ()
    """Context length (tokens of KV) of each running sequence that decodes in the next step."""
    decode_remaining_tokens: tuple[int, ...] | None = None
    """Tokens each of them still has to generate (None: unknown, taken as many)."""
    encoder_in_flight: EncoderInFlight | None = None
    decode_stalled_ms: float = 0.0
    """How long the running decodes have already waited for their next token (e.g. behind a whole-device batch)."""
    lm_step_scale_split: float = 1.0
    """Measured / curve time of LM steps on a split, beside the encoder (prediction_correction.py)."""
    lm_step_scale_whole: float = 1.0
    """The same for LM steps on the whole device."""
    lm_step_host_ms: float | None = None
    """Host time a decode gap adds to its step's GPU time, learned by the engine (prediction_correction.py); the
    per-step overhead is the larger of it and `AllocatorConfig.lm_step_overhead_ms` (None: the config's)."""


@dataclass(frozen=True)
class Allocation:
    placement: Placement
    encoder_sms: int
    """SMs for the next encoder batch; 0: dispatch nothing now."""
    lm_sms: int
    """SMs for the LM step; 0: no LM step until the encoder batch in flight ends."""
    prefill_tokens: int
    """Most prefill tokens the LM step may take (PREFILL_SPLIT: the prefill step on the compute side)."""
    prefill_sms: int = 0
    """PREFILL_SPLIT: the SMs the prefill step runs on (the compute side); 0 otherwise."""
    predicted_lm_step_ms: float | None = None
    """The LM step with the prefill tokens ready now (up to `prefill_tokens`); None: no LM step."""
    lm_step_curve_ms: float | None = None
    """That step's GPU time on the curve alone (before the state's scale and the overhead), for learning the scale."""
    predicted_encoder_batch_ms: float | None = None
    predicted_prefill_step_ms: float | None = None
    predicted_decode_gap_ms: float | None = None
    """Gap between a running sequence's tokens that this decision gives at most (None: nothing decodes)."""
    decode_stalled_ms: float = 0.0
    """What the decodes had already waited when this was decided: the part of that gap before the LM step."""
    predicted_mean_ttft_ms: float | None = None
    predicted_ttft_misses: int = 0
    tpot_ok: bool = True
    cost: float = 0.0
    encoder_batch_patches: int = 0
    considered: int = 1
    reason: str = ""
