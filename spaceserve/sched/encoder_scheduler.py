"""The encoder's own queue: which images to embed next, independent of the LM scheduler.

The LM scheduler asks for an image's embeddings with `request_encoding`; `schedule` hands batches to the encoder
runner and reserves their room in the encoder cache. An image already cached (pending or ready) or already queued
is never encoded twice: the asking request just joins its referencers / waiters.
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
        return bool(self._queue)

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
        if request.encoder_enqueued_time is None:
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
        """Take queued images in policy order while they fit the token budget and the encoder cache.

        The first image is always taken if the cache has room, even when it alone exceeds the budget (it then runs
        alone). The batch stops at the first image that does not fit: letting smaller images overtake it would
        break the policy's order and could starve a large image indefinitely.
        """
        if not self._queue:
            return None
        batch: list[MultiModalFeature] = []
        waiting: set[str] = set()
        batch_tokens = 0
        for mm_hash in self._ordered_hashes():
            item = self._queue[mm_hash]
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

    def pop_evicted(self) -> list[str]:
        """Hashes the encoder cache evicted since the last call: their tensors can be dropped."""
        evicted, self._evicted = self._evicted, []
        return evicted

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
