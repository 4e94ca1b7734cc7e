"""The language-model scheduler: continuous batching with chunked prefill under a token budget, prefix-cache hits,
preemption by recompute when KV blocks run out, and prefill that stops just before an image whose embeddings are
not ready yet. The encoder has its own scheduler; this one only asks it for work and checks readiness.

Scheduling may run one step ahead of the results (overlapped scheduling): `schedule` advances each request's
`num_computed_tokens` at once and counts the token a sampling step will produce as a placeholder, so the next step
can be scheduled while this one runs; the runner feeds placeholders from the device. `update_from_output` then
appends the real tokens. A request is not scheduled past what its in-flight tokens can reach (max_tokens,
max_model_len), and a token sampled for a request that has finished meanwhile (EOS, a stop string, an abort) is
dropped, so outputs end at exactly the token they end at without overlap."""

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
            if not self._inflight_tokens_finish(request):
                remaining = request.num_tokens_with_placeholders - start
                decoding = remaining == 1 and request.num_output_tokens + request.num_output_placeholders > 0
                num_new = min(remaining, budget if decoding else min(budget, prefill_left))
                num_new = self._limit_to_ready_images(request, start, num_new)
                if not decoding:
                    prefill_left -= max(num_new, 0)
            if num_new <= 0:
                index += 1
                continue
            while not self.kv_manager.allocate_slots(request, num_new):
                victim = self.running.pop()
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
        for seq in scheduled:
            seq.request.num_computed_tokens = seq.end
            if seq.samples:
                seq.request.num_output_placeholders += 1
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

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
        self.kv_manager.free(request)
        self.encoder_scheduler.cancel(request.request_id)
        del self.requests[request.request_id]
