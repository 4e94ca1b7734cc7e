from __future__ import annotations

import enum
import time
from typing import Any

from spaceserve.core.multimodal import MultiModalFeature
from spaceserve.core.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}


class Request:
    """A request as the schedulers see it: token ids, image spans, progress. No tensors are touched here.

    `mrope_positions` (3 x prompt length) and `mrope_position_delta` are computed by input processing and only
    read by the model runner; a generated token at sequence index i has position i + delta on every axis.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        eos_token_ids: tuple[int, ...] = (),
        mm_features: list[MultiModalFeature] | None = None,
        mrope_positions: Any = None,
        mrope_position_delta: int = 0,
        prompt: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.mm_features = sorted(mm_features or [], key=lambda f: f.placeholder.offset)
        self.mrope_positions = mrope_positions
        self.mrope_position_delta = mrope_position_delta
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time

        self.output_token_ids: list[int] = []
        self.output_logprobs: list[Any] | None = [] if sampling_params.logprobs is not None else None
        """One TokenLogprobs per output token when the request asked for log-probabilities."""
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        # tokens sampled by launched steps whose ids have not reached the host yet (overlapped scheduling); the
        # scheduler counts them as known, the runner feeds them from the device
        self.num_output_placeholders = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.block_hashes: list[bytes] = []
        # timestamps (time.monotonic) behind the per-request metrics: queue time, encoder wait, TTFT, latency
        self.first_scheduled_time: float | None = None
        self.encoder_enqueued_time: float | None = None
        self.encoder_scheduled_time: float | None = None
        self.encoder_end_time: float | None = None  # the encoder batch holding its last item finished
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.video_decode_start_time: float | None = None
        self.video_decode_end_time: float | None = None
        # (index in mm_features of the video's first chunk, opaque decode job) for each video whose frames input
        # processing left to the decode stage; the engine hands the jobs to the stage when the request arrives
        self.pending_mm_work: list[tuple[int, Any]] = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        """Known tokens plus those sampled on the device and not yet collected."""
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def set_mm_feature(self, index: int, feature: MultiModalFeature) -> None:
        """Fill in a video chunk the decode stage made (same span and grid, now with its pixel values)."""
        old = self.mm_features[index]
        if feature.placeholder != old.placeholder or feature.grid_thw != old.grid_thw:
            raise ValueError(f"feature {index} changed shape: {old.grid_thw} at {old.placeholder} -> {feature}")
        self.mm_features[index] = feature

    def append_output_token(self, token_id: int, logprobs: Any = None) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.output_logprobs is not None and logprobs is not None:
            self.output_logprobs.append(logprobs)

    def mm_features_overlapping(self, start: int, end: int) -> list[tuple[int, MultiModalFeature]]:
        """(index, feature) for each image whose placeholder intersects token range [start, end)."""
        return [
            (i, f) for i, f in enumerate(self.mm_features) if f.placeholder.offset < end and f.placeholder.end > start
        ]

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
