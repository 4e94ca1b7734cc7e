import pytest

from spaceserve.core.errors import InvalidInputError
from spaceserve.kvcache.block_pool import CacheIntegrityError
from spaceserve.kvcache.encoder_cache import EncoderCache, EncoderCacheFullError, EncoderCacheTooSmallError


def state(cache):
    return (
        cache.num_free_tokens,
        cache.num_evictable_tokens,
        cache.num_entries,
        {h: (e.num_tokens, set(e.request_ids), e.ready) for h, e in cache._entries.items()},
        list(cache._evictable),
    )


def ready_entry(cache, mm_hash, num_tokens, request_ids=()):
    assert cache.allocate(mm_hash, num_tokens, request_ids) == []
    cache.mark_ready(mm_hash)


def test_allocate_ref_release_and_accounting():
    cache = EncoderCache(100)
    assert cache.allocate("a", 30, ["r1", "r2"]) == []
    assert cache.contains("a") and not cache.is_ready("a")
    assert cache.request_ids("a") == {"r1", "r2"}
    assert cache.num_free_tokens == 70 and cache.usage == pytest.approx(0.3)
    cache.mark_ready("a")
    assert cache.is_ready("a")
    cache.release("a", "r1")
    assert cache.num_evictable_tokens == 0  # still referenced by r2
    cache.release("a", "r2")
    cache.release("a", "r2")  # releasing twice is a no-op
    assert cache.contains("a") and cache.num_evictable_tokens == 30  # kept for reuse
    assert cache.can_allocate(100) and not cache.can_allocate(101)
    cache.check_integrity(expect_idle=True)


def test_too_large_item_is_rejected_with_a_clear_error_and_nothing_changes():
    cache = EncoderCache(16384)
    ready_entry(cache, "a", 100, ["r1"])
    before = state(cache)
    with pytest.raises(EncoderCacheTooSmallError) as excinfo:
        cache.check_fits(20736)
    assert isinstance(excinfo.value, InvalidInputError)
    message = str(excinfo.value)
    assert "20736" in message and "16384" in message and "cache_tokens" in message and "max_pixels" in message
    with pytest.raises(EncoderCacheTooSmallError):
        cache.allocate("huge", 20736, ["r2"])
    assert state(cache) == before
    cache.check_fits(16384)  # exactly the capacity fits


def test_eviction_is_lru_by_when_entries_became_unreferenced():
    cache = EncoderCache(100)
    ready_entry(cache, "a", 30, ["r1"])
    ready_entry(cache, "b", 30, ["r2"])
    ready_entry(cache, "c", 30, ["r3"])
    cache.release("c", "r3")
    cache.release("a", "r1")
    cache.release("b", "r2")
    assert cache.allocate("d", 50, ["r4"]) == ["c", "a"]  # needs 10 free + 30 + 30
    assert cache.contains("b") and not cache.contains("c") and not cache.contains("a")
    cache.check_integrity(expect_idle=False)


def test_referenced_entries_are_never_evicted_and_re_referencing_protects_again():
    cache = EncoderCache(100)
    ready_entry(cache, "a", 50, ["r1"])
    ready_entry(cache, "b", 50, ["r2"])
    cache.release("a", "r1")
    cache.add_ref("a", "r3")  # a prefix hit on a cached image makes it unevictable again
    assert cache.num_evictable_tokens == 0
    assert not cache.can_allocate(1)
    with pytest.raises(EncoderCacheFullError):
        cache.allocate("c", 1, ["r4"])
    cache.release_request("r3")
    assert cache.allocate("c", 1, ["r4"]) == ["a"]


def test_pending_entries_are_never_evicted_even_when_unreferenced():
    cache = EncoderCache(100)
    cache.allocate("pending", 60, ["r1"])
    cache.release_request("r1")  # the request was cancelled while its image was being encoded
    assert cache.num_evictable_tokens == 0
    assert not cache.can_allocate(41)
    cache.mark_ready("pending")  # once written, it becomes evictable
    assert cache.can_allocate(100)
    assert cache.allocate("next", 100, ["r2"]) == ["pending"]


def test_release_request_drops_all_its_references():
    cache = EncoderCache(100)
    ready_entry(cache, "a", 10, ["r1", "r2"])
    ready_entry(cache, "b", 10, ["r1"])
    cache.add_ref("b", "r1")  # idempotent
    cache.release_request("r1")
    assert cache.request_ids("a") == {"r2"} and cache.request_ids("b") == frozenset()
    assert cache.num_evictable_tokens == 10
    with pytest.raises(CacheIntegrityError, match="idle"):
        cache.check_integrity()
    cache.release_request("r2")
    cache.check_integrity()


def test_duplicate_allocation_and_unknown_hashes_are_errors():
    cache = EncoderCache(100)
    cache.allocate("a", 10, [])
    with pytest.raises(ValueError):
        cache.allocate("a", 10, [])
    with pytest.raises(KeyError):
        cache.add_ref("missing", "r1")
    with pytest.raises(KeyError):
        cache.mark_ready("missing")
    assert not cache.is_ready("missing")


def test_drop_frees_the_entry_and_its_references():
    cache = EncoderCache(100)
    cache.allocate("a", 40, ["r1", "r2"])
    assert cache.drop("a") == {"r1", "r2"}
    assert not cache.contains("a") and cache.num_free_tokens == 100
    cache.check_integrity()


def test_check_integrity_detects_broken_accounting():
    cache = EncoderCache(100)
    ready_entry(cache, "a", 40)
    cache._free_tokens += 1
    with pytest.raises(CacheIntegrityError):
        cache.check_integrity()
