import random

import pytest

from spaceserve.config import EncoderConfig
from spaceserve.core import MultiModalFeature, PlaceholderRange, Request, SamplingParams
from spaceserve.kvcache.encoder_cache import EncoderCache, EncoderCacheTooSmallError
from spaceserve.sched.encoder_scheduler import EncoderScheduler

IMAGE_PAD = 151655


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_request(request_id, arrival_time, image_lengths, hashes=None, seed=0):
    """A prompt with one image per entry of `image_lengths` (in tokens), each after 3 text tokens."""
    rng = random.Random(seed)
    tokens, features = [], []
    for index, length in enumerate(image_lengths):
        tokens += [rng.randrange(1, 150_000) for _ in range(3)]
        mm_hash = hashes[index] if hashes else f"{request_id}-img{index}"
        placeholder = PlaceholderRange(len(tokens), length)
        features.append(MultiModalFeature(mm_hash, "image", placeholder, 4 * length, (1, 2, 2 * length)))
        tokens += [IMAGE_PAD] * length
    tokens += [rng.randrange(1, 150_000) for _ in range(3)]
    return Request(request_id, tokens, SamplingParams(), mm_features=features, arrival_time=arrival_time)


def make_scheduler(policy="fcfs", window_s=1.0, budget=10_000, cache_tokens=100_000):
    config = EncoderConfig(policy=policy, window_s=window_s, budget_tokens=budget, cache_tokens=cache_tokens)
    cache = EncoderCache(config.cache_tokens)
    return EncoderScheduler(config, cache, clock=FakeClock()), cache


def request_all(scheduler, *requests):
    for request in requests:
        for index in range(len(request.mm_features)):
            scheduler.request_encoding(request, index)


def drain(scheduler):
    """The mm_hashes in the order the scheduler hands them to the encoder, one batch per schedule()."""
    order = []
    while (batch := scheduler.schedule()) is not None:
        order += [item.mm_hash for item in batch.items]
        for item in batch.items:
            scheduler.cache.mark_ready(item.mm_hash)
    return order


def test_fcfs_orders_by_arrival_then_prompt_order():
    scheduler, _ = make_scheduler("fcfs")
    late = make_request("late", 5.0, [10, 10])
    early = make_request("early", 1.0, [20, 5])
    request_all(scheduler, late, early)
    assert scheduler.num_queued_items == 4
    assert scheduler.num_queued_patches == 4 * (10 + 10 + 20 + 5)
    assert drain(scheduler) == ["early-img0", "early-img1", "late-img0", "late-img1"]
    assert not scheduler.has_work


def test_twsrft_serves_fewest_remaining_patches_first_within_a_window():
    scheduler, _ = make_scheduler("twsrft", window_s=1.0)
    big = make_request("big", 0.1, [50, 50])
    small = make_request("small", 0.6, [30])
    request_all(scheduler, big, small)
    assert drain(scheduler) == ["small-img0", "big-img0", "big-img1"]


def test_twsrft_counts_remaining_not_total_patches():
    scheduler, _ = make_scheduler("twsrft", window_s=1.0, budget=40)
    first = make_request("first", 0.0, [40, 40, 40])
    scheduler.request_encoding(first, 0)
    assert [f.mm_hash for f in scheduler.schedule().items] == ["first-img0"]
    scheduler.request_encoding(first, 1)
    scheduler.request_encoding(first, 2)
    second = make_request("second", 0.5, [50, 50])
    request_all(scheduler, second)
    # first: 80 tokens (320 patches) remaining of 120 total; second: 100 tokens (400 patches).
    assert drain(scheduler) == ["first-img1", "first-img2", "second-img0", "second-img1"]


def test_twsrft_later_window_never_overtakes_an_earlier_one():
    scheduler, _ = make_scheduler("twsrft", window_s=1.0)
    huge_early = make_request("huge", 0.2, [200, 200])
    tiny_late = make_request("tiny", 1.3, [1])
    mid_early = make_request("mid", 0.9, [100])
    request_all(scheduler, huge_early, tiny_late, mid_early)  # windows start at the first arrival seen: 0.2
    assert drain(scheduler) == ["mid-img0", "huge-img0", "huge-img1", "tiny-img0"]


def test_twsrft_with_zero_window_equals_fcfs():
    rng = random.Random(7)
    requests = [
        make_request(f"r{i}", rng.uniform(0, 3), [rng.randrange(1, 60) for _ in range(rng.randrange(1, 4))], seed=i)
        for i in range(12)
    ]
    orders = []
    for policy in ("fcfs", "twsrft"):
        scheduler, _ = make_scheduler(policy, window_s=0.0, budget=64)
        request_all(scheduler, *requests)
        orders.append(drain(scheduler))
    assert orders[0] == orders[1]
    by_arrival = sorted(requests, key=lambda r: r.arrival_time)
    assert orders[0] == [f.mm_hash for r in by_arrival for f in r.mm_features]


def test_budget_is_respected_and_an_oversize_item_runs_alone():
    scheduler, _ = make_scheduler("fcfs", budget=64)
    request = make_request("r", 0.0, [30, 30, 30, 100, 10])
    request_all(scheduler, request)
    batches = []
    while (batch := scheduler.schedule()) is not None:
        batches.append([f.num_tokens for f in batch.items])
    assert batches == [[30, 30], [30], [100], [10]]
    assert all(sum(b) <= 64 or len(b) == 1 for b in batches)


def test_batch_stops_at_the_first_item_the_cache_cannot_hold():
    scheduler, cache = make_scheduler("fcfs", budget=1000, cache_tokens=100)
    holder = make_request("holder", 0.0, [60])
    request_all(scheduler, holder)
    drain(scheduler)  # 60 tokens held by "holder"
    waiting = make_request("w", 1.0, [30, 20, 5])
    request_all(scheduler, waiting)
    batch = scheduler.schedule()
    assert [f.mm_hash for f in batch.items] == ["w-img0"]  # 20 doesn't fit; 5 may not overtake it
    assert scheduler.schedule() is None
    assert scheduler.num_queued_items == 2
    scheduler.cancel("holder")  # its entry becomes evictable once released
    assert [f.mm_hash for f in scheduler.schedule().items] == ["w-img1", "w-img2"]
    assert scheduler.pop_evicted() == ["holder-img0"]
    assert scheduler.pop_evicted() == []


def test_same_image_for_two_requests_is_encoded_once_and_referenced_by_both():
    scheduler, cache = make_scheduler("fcfs")
    first = make_request("a", 0.0, [20], hashes=["shared"])
    second = make_request("b", 1.0, [20, 10], hashes=["shared", "own"], seed=1)
    request_all(scheduler, first, second)
    assert scheduler.num_queued_items == 2
    batch = scheduler.schedule()
    assert [f.mm_hash for f in batch.items] == ["shared", "own"]
    assert cache.request_ids("shared") == {"a", "b"}
    cache.mark_ready("shared")
    # A third request asking after it is cached just takes a reference.
    third = make_request("c", 2.0, [20], hashes=["shared"], seed=2)
    scheduler.request_encoding(third, 0)
    assert not scheduler.has_work
    assert cache.request_ids("shared") == {"a", "b", "c"}
    scheduler.request_encoding(third, 0)  # asking again is harmless
    assert cache.request_ids("shared") == {"a", "b", "c"}


def test_shared_image_runs_at_its_most_urgent_requesters_priority():
    scheduler, _ = make_scheduler("fcfs")
    late = make_request("late", 9.0, [10], hashes=["shared"])
    middle = make_request("middle", 5.0, [10])
    early = make_request("early", 1.0, [10], hashes=["shared"])
    request_all(scheduler, late, middle, early)
    assert drain(scheduler) == ["shared", "middle-img0"]


def test_cancel_drops_queued_work_nobody_else_waits_for():
    scheduler, cache = make_scheduler("fcfs", budget=10)
    first = make_request("a", 0.0, [10, 10], hashes=["shared", "a-own"])
    second = make_request("b", 1.0, [10], hashes=["shared"], seed=1)
    request_all(scheduler, first, second)
    scheduler.cancel("a")
    assert scheduler.num_queued_items == 1 and scheduler.is_queued("shared")
    assert [f.mm_hash for f in scheduler.schedule().items] == ["shared"]
    assert cache.request_ids("shared") == {"b"}
    scheduler.cancel("b")
    assert cache.request_ids("shared") == frozenset()
    cache.mark_ready("shared")
    assert not scheduler.has_work and scheduler.schedule() is None
    cache.check_integrity()


def test_impossible_item_raises_and_changes_nothing():
    scheduler, cache = make_scheduler("fcfs", cache_tokens=16384)
    request = make_request("r", 0.0, [20736])
    with pytest.raises(EncoderCacheTooSmallError, match="20736 encoder tokens"):
        scheduler.request_encoding(request, 0)
    assert not scheduler.has_work and cache.num_entries == 0


def test_empty_queue_schedules_nothing():
    scheduler, _ = make_scheduler()
    assert scheduler.schedule() is None
    assert scheduler.num_queued_items == 0 and scheduler.num_queued_patches == 0


def test_queued_item_records_requester_and_enqueue_time():
    scheduler, _ = make_scheduler()
    scheduler.clock.now = 123.5
    request = make_request("r", 42.0, [8])
    scheduler.request_encoding(request, 0)
    item = scheduler.queued_item("r-img0")
    assert item.enqueue_time == 123.5
    assert item.waiters["r"].arrival_time == 42.0 and item.waiters["r"].feature_index == 0
