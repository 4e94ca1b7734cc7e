"""What the engine core tells the front about a request after a step (EngineCoreOutput): its new token ids, their
log-probabilities if asked for, how it ended, and the timestamps of its life in the core."""

from __future__ import annotations

from spaceserve.core.engine_messages import EngineCoreOutput, FinishReason
from spaceserve.core.request import Request, RequestStatus

REQUEST_TIMESTAMPS = (
    "arrival_time",
    "video_decode_start_time",
    "video_decode_end_time",
    "first_scheduled_time",
    "encoder_enqueued_time",
    "encoder_scheduled_time",
    "encoder_end_time",
    "first_token_time",
    "finished_time",
)
FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}
STATUS_OF_REASON = {reason: status for status, reason in FINISH_REASONS.items()}


def core_output(
    request: Request, new_token_ids: list[int], error: str | None = None, with_timestamps: bool = False
) -> EngineCoreOutput:
    """The request's delta; its timestamps go with its first token and with the output that finishes it."""
    timestamps = None
    if with_timestamps or request.is_finished:
        timestamps = {name: value for name in REQUEST_TIMESTAMPS if (value := getattr(request, name)) is not None}
    logprobs = None  # the new tokens' log-probabilities, for a request that asked (SamplingParams.logprobs)
    if request.output_logprobs and new_token_ids:
        logprobs = request.output_logprobs[-len(new_token_ids) :]
    if not request.is_finished:
        return EngineCoreOutput(request.request_id, new_token_ids, timestamps=timestamps, new_logprobs=logprobs)
    return EngineCoreOutput(
        request.request_id,
        new_token_ids,
        finish_reason=FINISH_REASONS[request.status],
        stop_reason=request.stop_reason,
        error=error,
        timestamps=timestamps,
        new_logprobs=logprobs,
    )
