"""The encoder's own queue: which images and video chunks to embed next, independent of the LM scheduler.

The LM scheduler asks for an item's embeddings with `request_encoding`; `schedule` hands batches to the encoder
runner and reserves their room in the encoder cache. An item already cached (pending or ready) or already queued
is never encoded twice: the asking request just joins its referencers / waiters.

A video chunk is queued as soon as its request arrives, before its frames are decoded (`inputs_pending`): it is not
run until the engine hands over its pixel values (`provide_inputs`), but its patches count in its requests'
remaining work from the start, so TWSRFT sees a long video as long even while only its first chunks can run. The
chunks of one video are allocated in order: a chunk whose inputs are pending holds back the later chunks of its
video, so they cannot fill the encoder cache ahead of the chunk the LM needs first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from spaceserve.config import EncoderConfig
from spaceserve.core.multimodal import MultiModalFeature
from spaceserve.core.request import Request
from spaceserve.core.scheduler_output import EncoderBatch
from spaceserve.kvcache.encoder_cache import EncoderCache
from spaceserve.sched.encoder_policies import QueueState, SortKey, WaitingRequest, get_policy


@dataclass
class EncoderWorkItem:
    feature: MultiModalFeature
    enqueue_time: float
    waiters: dict[str, WaitingRequest] = field(default_factory=dict)
    """request id -> how that request waits for this image; insertion-ordered."""


class EncoderScheduler:
    def __init__(
        self, config: EncoderConfig, cache: EncoderCache, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.cache = cache
        self.clock = clock
        self._policy = get_policy(config.policy)
        self._queue: dict[str, EncoderWorkItem] = {}  # mm_hash -> item, in enqueue order
        self._queued_hashes_of_request: dict[str, set[str]] = {}
        self._request_order: dict[str, int] = {}
        self._next_request_order = 0
        self._window_origin: float | None = None
        self._evicted: list[str] = []

    @property
    def num_queued_items(self) -> int:
        return len(self._queue)

    @property
    def num_queued_patches(self) -> int:
        return sum(item.feature.num_patches for item in self._queue.values())

    @property
    def has_work(self) -> bool:
        """Some queued item can run now (its inputs are there, and those of the earlier chunks of its video)."""
        first_pending = self._first_pending_chunks()
        return any(_can_run(item.feature, first_pending) for item in self._queue.values())

    @property
    def num_pending_items(self) -> int:
        """Queued video chunks still waiting for their frames."""
        return sum(item.feature.inputs_pending for item in self._queue.values())

    def is_queued(self, mm_hash: str) -> bool:
        return mm_hash in self._queue

    def queued_item(self, mm_hash: str) -> EncoderWorkItem | None:
        return self._queue.get(mm_hash)

    def request_encoding(self, request: Request, feature_index: int) -> None:
        """Make sure request.mm_features[feature_index] gets embedded and stays cached for this request.

        Raises EncoderCacheTooSmallError (changing nothing) if the image can never fit in the encoder cache.
        """
        feature = request.mm_features[feature_index]
        self.cache.check_fits(feature.num_tokens)
        request_id = request.request_id
        if self.cache.contains(feature.mm_hash):
            self.cache.add_ref(feature.mm_hash, request_id)
            return
        item = self._queue.get(feature.mm_hash)
        if item is None:
            item = EncoderWorkItem(feature=feature, enqueue_time=self.clock())
            self._queue[feature.mm_hash] = item
        elif item.feature.inputs_pending and not feature.inputs_pending:
            item.feature = feature
        if request.encoder_enqueued_time is None and not item.feature.inputs_pending:
            request.encoder_enqueued_time = self.clock()
        if request_id in item.waiters:
            return
        if self._window_origin is None:
            self._window_origin = request.arrival_time
        if request_id not in self._request_order:
            self._request_order[request_id] = self._next_request_order
            self._next_request_order += 1
        item.waiters[request_id] = WaitingRequest(
            request_id=request_id,
            arrival_time=request.arrival_time,
            feature_index=feature_index,
            request_order=self._request_order[request_id],
        )
        self._queued_hashes_of_request.setdefault(request_id, set()).add(feature.mm_hash)

    def provide_inputs(self, feature: MultiModalFeature) -> frozenset[str]:
        """A video chunk's pixel values are ready: a queued item waiting for them may run. Returns the requests
        waiting for it (none when it is not queued: cached already, or nobody asked for it)."""
        item = self._queue.get(feature.mm_hash)
        if item is None:
            return frozenset()
        if item.feature.inputs_pending and not feature.inputs_pending:
            item.feature = feature
        return frozenset(item.waiters)

    def cancel(self, request_id: str) -> None:
        """Forget the request: leave the queue entries it waits for (dropping those nobody else waits for) and
        release its encoder cache references."""
        for mm_hash in self._queued_hashes_of_request.pop(request_id, ()):
            item = self._queue[mm_hash]
            del item.waiters[request_id]
            if not item.waiters:
                del self._queue[mm_hash]
        self._request_order.pop(request_id, None)
        self.cache.release_request(request_id)

    def schedule(self) -> EncoderBatch | None:
        """Take queued items in policy order while they fit the token budget and the encoder cache.

        The first item is always taken if the cache has room, even when it alone exceeds the budget (it then runs
        alone). The batch stops at the first item that does not fit: letting smaller items overtake it would
        break the policy's order and could starve a large image indefinitely. Video chunks still waiting for their
        frames are passed over, and so are the later chunks of their video.
        """
        if not self._queue:
            return None
        batch: list[MultiModalFeature] = []
        waiting: set[str] = set()
        batch_tokens = 0
        first_pending = self._first_pending_chunks()
        for mm_hash in self._ordered_hashes():
            item = self._queue[mm_hash]
            if not _can_run(item.feature, first_pending):
                continue
            num_tokens = item.feature.num_tokens
            if batch and batch_tokens + num_tokens > self.config.budget_tokens:
                break
            if not self.cache.can_allocate(num_tokens):
                break
            self._evicted.extend(self.cache.allocate(mm_hash, num_tokens, item.waiters.keys()))
            self._dequeue(mm_hash)
            batch.append(item.feature)
            waiting.update(item.waiters)
            batch_tokens += num_tokens
        return EncoderBatch(items=tuple(batch), request_ids=frozenset(waiting)) if batch else None

    def ordered_queue(self) -> list[EncoderWorkItem]:
        """The queued items in the order `schedule` would take them (the policy's order)."""
        return [self._queue[mm_hash] for mm_hash in self._ordered_hashes()] if self._queue else []

    def pop_evicted(self) -> list[str]:
        """Hashes the encoder cache evicted since the last call: their tensors can be dropped."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def _first_pending_chunks(self) -> dict[str, int]:
        """video hash -> the index of its first queued chunk still waiting for frames."""
        first: dict[str, int] = {}
        for item in self._queue.values():
            chunk = item.feature.chunk
            if item.feature.inputs_pending and chunk is not None:
                first[chunk.video_hash] = min(first.get(chunk.video_hash, chunk.index), chunk.index)
        return first

    def _ordered_hashes(self) -> list[str]:
        remaining: dict[str, int] = {}
        for item in self._queue.values():
            for request_id in item.waiters:
                remaining[request_id] = remaining.get(request_id, 0) + item.feature.num_patches
        assert self._window_origin is not None  # set by the first request_encoding that queued anything
        state = QueueState(remaining, self.config.window_s, self._window_origin)

        def item_key(mm_hash: str) -> SortKey:
            return min(self._policy(waiter, state) for waiter in self._queue[mm_hash].waiters.values())

        return sorted(self._queue, key=item_key)

    def _dequeue(self, mm_hash: str) -> None:
        item = self._queue.pop(mm_hash)
        for request_id in item.waiters:
            hashes = self._queued_hashes_of_request[request_id]
            hashes.discard(mm_hash)
            if not hashes:
                del self._queued_hashes_of_request[request_id]
                self._request_order.pop(request_id, None)


def _can_run(feature: MultiModalFeature, first_pending_chunks: dict[str, int]) -> bool:
    """Its inputs are there and, for a video chunk, no earlier chunk of its video still waits for frames."""
    if feature.inputs_pending:
        return False
    chunk = feature.chunk
    return chunk is None or chunk.index < first_pending_chunks.get(chunk.video_hash, chunk.num_chunks)
