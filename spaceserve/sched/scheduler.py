"""The language-model scheduler: continuous batching with chunked prefill under a token budget, prefix-cache hits,
preemption by recompute when KV blocks run out, and prefill that stops just before an image whose embeddings are
not ready yet. The encoder has its own scheduler; this one only asks it for work and checks readiness.

Scheduling may run one step ahead of the results (overlapped scheduling): `schedule` advances each request's
`num_computed_tokens` at once and counts the token a sampling step will produce as a placeholder, so the next step
can be scheduled while this one runs; the runner feeds placeholders from the device. `update_from_output` then
appends the real tokens. A request is not scheduled past what its in-flight tokens can reach (max_tokens,
max_model_len), and a token sampled for a request that has finished meanwhile (EOS, a stop string, an abort) is
dropped, so outputs end at exactly the token they end at without overlap.

A second lane of prefill steps may run beside the decode steps, on other SMs (the SM allocator's PREFILL_SPLIT,
engine/prefill_lane.py): `schedule_prefill_lane` takes prompt chunks only, and its requests stay out of `schedule`
until `release_prefill_lane`; neither lane preempts a request of the lane, whose step may still write its blocks."""

from __future__ import annotations

import time

from collections import deque

from spaceserve.config import SchedulerConfig
from spaceserve.core.request import Request, RequestStatus
from spaceserve.core.scheduler_output import ModelRunnerOutput, ScheduledSequence, SchedulerOutput
from spaceserve.kvcache.encoder_cache import EncoderCache
from spaceserve.kvcache.kv_manager import KVCacheManager
from spaceserve.sched.encoder_scheduler import EncoderScheduler
from spaceserve.sched.stop import check_stop


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_manager: KVCacheManager,
        encoder_cache: EncoderCache,
        encoder_scheduler: EncoderScheduler,
    ) -> None:
        self.config = config
        self.kv_manager = kv_manager
        self.encoder_cache = encoder_cache
        self.encoder_scheduler = encoder_scheduler
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.in_prefill_lane: set[str] = set()
        """Requests whose prefill step runs in the prefill lane (not scheduled by `schedule` meanwhile)."""

    # ---- requests in and out -------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a validated request and start encoding the images its cached prefix does not already cover."""
        for feature in request.mm_features:
            self.encoder_cache.check_fits(feature.num_tokens)
        covered = self.kv_manager.num_cached_prefix_tokens(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)
        for index, feature in enumerate(request.mm_features):
            if feature.placeholder.end > covered:
                self.encoder_scheduler.request_encoding(request, index)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step --------------------------------------------------------------------------------------------

    def schedule(self, max_prefill_tokens: int | None = None) -> SchedulerOutput:
        """The next step. `max_prefill_tokens` caps the tokens of prefill chunks (everything but the one-token steps
        of requests already generating), e.g. to keep a decode step inside its TPOT budget (the SM allocator)."""
        budget = self.config.max_num_batched_tokens
        prefill_left = budget if max_prefill_tokens is None else max(0, max_prefill_tokens)
        scheduled: list[ScheduledSequence] = []
        preempted: list[str] = []

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            start = request.num_computed_tokens
            num_new = 0
            if request.request_id not in self.in_prefill_lane and not self._inflight_tokens_finish(request):
                remaining = request.num_tokens_with_placeholders - start
                decoding = _is_decoding(request, remaining)
                num_new = min(remaining, budget if decoding else min(budget, prefill_left))
                num_new = self._limit_to_ready_images(request, start, num_new)
                if not decoding:
                    prefill_left -= max(num_new, 0)
            if num_new <= 0:
                index += 1
                continue
            while not self.kv_manager.allocate_slots(request, num_new):
                victim = self._preemptible_victim()  # at worst `request` itself, which is not in the lane
                self.running.remove(victim)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break
            scheduled.append(self._scheduled(request, start, num_new))
            budget -= num_new
            index += 1

        if not preempted:
            self._admit_waiting(min(budget, prefill_left), scheduled)
        self._advance(scheduled)
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def schedule_prefill_lane(self, max_tokens: int) -> SchedulerOutput:
        """A prefill-only step for the prefill lane: prompt chunks (or a preempted request's recompute) of running
        requests, then of waiting ones, up to `max_tokens`. Never preempts: a chunk that finds no free KV blocks
        waits. Its requests stay out of `schedule` until `release_prefill_lane`."""
        budget = min(max(0, max_tokens), self.config.max_num_batched_tokens)
        scheduled: list[ScheduledSequence] = []
        for request in self.running:
            if budget <= 0:
                break
            if request.request_id in self.in_prefill_lane or request.num_output_placeholders:
                continue  # its previous step is still in flight
            start = request.num_computed_tokens
            remaining = request.num_tokens_with_placeholders - start
            if _is_decoding(request, remaining):
                continue
            num_new = self._limit_to_ready_images(request, start, min(remaining, budget))
            if num_new <= 0:
                continue
            if not self.kv_manager.allocate_slots(request, num_new):
                break
            scheduled.append(self._scheduled(request, start, num_new))
            budget -= num_new
        self._admit_waiting(budget, scheduled)
        self._advance(scheduled)
        self.in_prefill_lane.update(seq.request.request_id for seq in scheduled)
        return SchedulerOutput(tuple(scheduled))

    @staticmethod
    def _advance(scheduled: list[ScheduledSequence]) -> None:
        """Count the scheduled tokens as computed, and a sampling chunk's token as a placeholder (overlapped
        scheduling: the next step may be scheduled before this one's results)."""
        for seq in scheduled:
            seq.request.num_computed_tokens = seq.end
            if seq.samples:
                seq.request.num_output_placeholders += 1

    def release_prefill_lane(self, scheduled: SchedulerOutput) -> None:
        """The lane's step has finished on the device: its requests may be scheduled by either lane again."""
        for seq in scheduled.sequences:
            self.in_prefill_lane.discard(seq.request.request_id)

    def _preemptible_victim(self) -> Request:
        """The most recently admitted running request that is not in the prefill lane (its step may still write
        its blocks)."""
        return next(r for r in reversed(self.running) if r.request_id not in self.in_prefill_lane)

    def _inflight_tokens_finish(self, request: Request) -> bool:
        """The tokens already being sampled reach max_tokens or max_model_len: nothing more to schedule."""
        if not request.num_output_placeholders:
            return False
        if request.num_tokens_with_placeholders >= self.config.max_model_len:
            return True
        max_tokens = request.sampling_params.max_tokens
        return max_tokens is not None and request.num_output_tokens + request.num_output_placeholders >= max_tokens

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSequence]) -> None:
        blocked_on_images: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.popleft()
            hit_blocks, num_hit = self.kv_manager.get_computed_blocks(request)
            num_new = self._limit_to_ready_images(request, num_hit, min(request.num_tokens - num_hit, budget))
            if num_new <= 0:
                blocked_on_images.append(request)
                continue
            if not self.kv_manager.allocate_slots(request, num_new, hit_blocks, num_hit):
                self.waiting.appendleft(request)
                break
            request.num_computed_tokens = num_hit
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_hit, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(blocked_on_images))

    def _limit_to_ready_images(self, request: Request, start: int, num_new: int) -> int:
        """Cut the token range [start, start + num_new) just before the first image that is not encoded yet."""
        for index, feature in request.mm_features_overlapping(start, start + num_new):
            self.encoder_scheduler.request_encoding(request, index)  # holds a reference; queues it if evicted
            if not self.encoder_cache.is_ready(feature.mm_hash):
                return feature.placeholder.offset - start
        return num_new

    def _scheduled(self, request: Request, start: int, num_new: int) -> ScheduledSequence:
        block_ids = self.kv_manager.block_ids(request.request_id)
        samples = start + num_new == request.num_tokens_with_placeholders
        return ScheduledSequence(request, start, num_new, block_ids, samples=samples)

    def _preempt(self, request: Request) -> None:
        self.kv_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ---- results -------------------------------------------------------------------------------------------

    def update_from_output(self, scheduled: SchedulerOutput, output: ModelRunnerOutput) -> list[Request]:
        """Take a finished step's results; returns the requests that got a token (finished ones included).

        A request preempted after this step was launched still gets its token (the step ran on its old blocks);
        one that finished or was aborted meanwhile gets nothing."""
        updated = []
        for seq in scheduled.sequences:
            request = seq.request
            if request.is_finished:
                continue
            if seq.samples:
                request.num_output_placeholders -= 1
            if request.status == RequestStatus.RUNNING:
                self.kv_manager.cache_blocks(request, seq.end)
            self._release_consumed_images(request, seq.end)
            token = output.sampled_token_ids.get(request.request_id)
            if token is None:
                continue
            request.append_output_token(token, output.logprobs.get(request.request_id) if output.logprobs else None)
            status = check_stop(request, self.config.max_model_len)
            if status is not None:
                (self.running if request.status == RequestStatus.RUNNING else self.waiting).remove(request)
                self._finish(request, status)
            updated.append(request)
        return updated

    def _release_consumed_images(self, request: Request, computed: int) -> None:
        for feature in request.mm_features:
            if feature.placeholder.end <= computed:
                self.encoder_cache.release(feature.mm_hash, request.request_id)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.in_prefill_lane.discard(request.request_id)
        self.kv_manager.free(request)
        self.encoder_scheduler.cancel(request.request_id)
        del self.requests[request.request_id]


def _is_decoding(request: Request, remaining: int) -> bool:
    """The request's next step is one token of its output (not a prompt chunk or a recompute)."""
    return remaining == 1 and request.num_output_tokens + request.num_output_placeholders > 0
