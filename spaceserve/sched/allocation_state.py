"""The allocator's view of the engine's queues (allocation_types.AllocatorState), read from the LM scheduler and
the encoder scheduler before an encoder dispatch / LM step; the engine adds what only it knows (the batch in
flight and its predicted end, how long the decodes have waited).

- pending: every request without its first token, with the prompt tokens it has not computed (a waiting request
  counts its whole prompt: its prefix-cache hit is known only once it is admitted);
- decodes: running requests whose next step is one token, with their context and remaining tokens;
- the encoder queue in the encoder policy's order.
A preempted request that already had tokens is in neither list: its TTFT is behind it, and its recompute is
prefill work the forecast does not count.
"""

from __future__ import annotations

from spaceserve.core.request import Request, RequestStatus
from spaceserve.sched.allocation_types import AllocatorState, EncoderInFlight, EncoderItem, PendingRequest
from spaceserve.sched.encoder_scheduler import EncoderScheduler
from spaceserve.sched.scheduler import Scheduler


def allocator_state(
    scheduler: Scheduler,
    encoder_scheduler: EncoderScheduler,
    now: float,
    *,
    in_flight: EncoderInFlight | None = None,
    decode_stalled_ms: float = 0.0,
    lm_step_scales: tuple[float, float] = (1.0, 1.0),
    lm_step_host_ms: float | None = None,
) -> AllocatorState:
    """`lm_step_scales`: measured / curve LM step time on a split and on the whole device; `lm_step_host_ms`: the
    host time a decode gap adds to its step (None: not learned). The engine learns both."""
    pending, contexts, remaining = [], [], []
    for request in scheduler.requests.values():
        if request.is_finished:
            continue
        if request.num_output_tokens == 0:
            left = request.num_prompt_tokens - request.num_computed_tokens
            pending.append(PendingRequest(request.request_id, request.arrival_time, max(1, left)))
        elif request.status == RequestStatus.RUNNING and request.num_tokens - request.num_computed_tokens == 1:
            contexts.append(request.num_tokens)
            remaining.append(_remaining_tokens(request, scheduler.config.max_model_len))
    queue = tuple(
        EncoderItem(tuple(item.waiters), item.feature.num_patches, item.feature.num_tokens)
        for item in encoder_scheduler.ordered_queue()
    )
    return AllocatorState(
        now=now,
        encoder_queue=queue,
        pending=tuple(pending),
        decode_contexts=tuple(contexts),
        decode_remaining_tokens=tuple(remaining),
        encoder_in_flight=in_flight,
        decode_stalled_ms=decode_stalled_ms,
        lm_step_scale_split=lm_step_scales[0],
        lm_step_scale_whole=lm_step_scales[1],
        lm_step_host_ms=lm_step_host_ms,
    )


def _remaining_tokens(request: Request, max_model_len: int) -> int:
    limit = request.sampling_params.max_tokens
    by_length = max_model_len - request.num_tokens
    return max(0, by_length if limit is None else min(limit - request.num_output_tokens, by_length))
