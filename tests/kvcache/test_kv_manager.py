import random

from spaceserve.kvcache.kv_manager import KVCacheManager
from tests.kvcache.requests import request_with_images

BLOCK = 16


def random_tokens(num_tokens, seed):
    rng = random.Random(seed)
    return [rng.randrange(1, 150_000) for _ in range(num_tokens)]


def make_request(request_id, tokens, images=()):
    return request_with_images(request_id, tokens, images)


def prefill(manager, request):
    """Admit the request with its prefix hits, 'run' the whole prompt and register its full blocks."""
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - num_hit_tokens, hit_blocks, num_hit_tokens)
    request.num_computed_tokens = request.num_tokens
    manager.cache_blocks(request, request.num_computed_tokens)
    return num_hit_tokens


def snapshot(manager):
    return (
        manager.num_free_blocks,
        list(manager.pool._free_queue),
        [(b.ref_cnt, b.block_hash) for b in manager.pool.blocks],
        {rid: manager.block_ids(rid) for rid in manager._tables},
        (manager.prefix_cache_stats.queries, manager.prefix_cache_stats.hits),
    )


def test_allocate_covers_tokens_and_free_returns_everything():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK, enable_prefix_caching=True)
    request = make_request("a", random_tokens(40, seed=1))
    assert manager.allocate_slots(request, 40)
    assert len(manager.block_ids("a")) == 3
    assert manager.num_free_blocks == 7
    assert abs(manager.usage - 0.3) < 1e-9
    manager.check_integrity()
    manager.free(request)
    assert manager.block_ids("a") == ()
    assert manager.num_free_blocks == 10
    manager.check_integrity()  # idle: free == total


def test_chunked_prefill_and_decode_grow_the_table_only_at_block_boundaries():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK)
    request = make_request("a", random_tokens(20, seed=2))
    assert manager.allocate_slots(request, 10)
    assert len(manager.block_ids("a")) == 1
    request.num_computed_tokens = 10
    assert manager.allocate_slots(request, 10)
    first_blocks = manager.block_ids("a")
    assert len(first_blocks) == 2
    request.num_computed_tokens = 20
    rng = random.Random(3)
    for _ in range(12):  # decode up to 32 tokens: still two blocks
        request.append_output_token(rng.randrange(150_000))
        assert manager.allocate_slots(request, 1)
        request.num_computed_tokens += 1
    assert manager.block_ids("a") == first_blocks
    request.append_output_token(rng.randrange(150_000))
    assert manager.allocate_slots(request, 1)
    assert manager.block_ids("a")[:2] == first_blocks and len(manager.block_ids("a")) == 3
    manager.free(request)
    manager.check_integrity()


def test_shared_prompt_hits_full_blocks_only():
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK)
    tokens = random_tokens(40, seed=4)
    first = make_request("a", tokens)
    assert prefill(manager, first) == 0
    first_block_ids = manager.block_ids("a")
    manager.free(first)

    shares_35 = make_request("b", tokens[:35] + random_tokens(10, seed=5))
    assert manager.num_cached_prefix_tokens(shares_35) == 32
    shares_20 = make_request("c", tokens[:20] + random_tokens(30, seed=6))
    assert manager.num_cached_prefix_tokens(shares_20) == 16
    differs_early = make_request("d", tokens[:5] + random_tokens(40, seed=7))
    assert manager.num_cached_prefix_tokens(differs_early) == 0

    blocks, num_tokens = manager.get_computed_blocks(shares_35)
    assert [b.block_id for b in blocks] == list(first_block_ids[:2]) and num_tokens == 32
    assert all(b.ref_cnt == 0 for b in blocks)  # a peek takes no references
    assert prefill(manager, shares_35) == 32
    assert manager.block_ids("b")[:2] == first_block_ids[:2]
    manager.free(shares_35)
    manager.check_integrity()


def test_hit_is_capped_to_leave_one_token_to_compute():
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK)
    tokens = random_tokens(48, seed=8)
    first = make_request("a", tokens)
    prefill(manager, first)
    manager.free(first)
    assert manager.num_cached_prefix_tokens(make_request("b", tokens[:32])) == 16  # 31 -> one block
    assert manager.num_cached_prefix_tokens(make_request("c", tokens[:33])) == 32
    assert manager.num_cached_prefix_tokens(make_request("d", tokens)) == 32
    identical = make_request("e", tokens)
    assert prefill(manager, identical) == 32  # the last block is recomputed to produce logits


def test_running_requests_share_prefix_blocks_with_ref_counts():
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK)
    tokens = random_tokens(50, seed=9)
    first = make_request("a", tokens)
    prefill(manager, first)
    second = make_request("b", tokens[:40] + random_tokens(8, seed=10))
    assert prefill(manager, second) == 32
    shared = manager.block_ids("a")[:2]
    assert manager.block_ids("b")[:2] == shared
    assert [manager.pool.blocks[i].ref_cnt for i in shared] == [2, 2]
    manager.check_integrity()
    manager.free(first)
    assert [manager.pool.blocks[i].ref_cnt for i in shared] == [1, 1]
    manager.check_integrity()
    manager.free(second)
    manager.check_integrity()
    assert manager.num_free_blocks == 20


def test_same_tokens_different_image_share_no_block():
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK)
    tokens = random_tokens(64, seed=11)
    prefill(manager, make_request("a", tokens, images=[(0, 40, "cat")]))
    dog = make_request("b", tokens, images=[(0, 40, "dog")])
    cat = make_request("c", tokens, images=[(0, 40, "cat")])
    assert dog.all_token_ids == cat.all_token_ids
    assert manager.num_cached_prefix_tokens(dog) == 0
    assert manager.num_cached_prefix_tokens(cat) == 48
    assert prefill(manager, cat) == 48
    assert manager.block_ids("c")[:3] == manager.block_ids("a")[:3]
    # An image later in the prompt: only the blocks before it are shared.
    later_dog = make_request("d", tokens, images=[(20, 20, "dog")])
    later_cat = make_request("e", tokens, images=[(20, 20, "cat")])
    prefill(manager, later_cat)
    assert manager.num_cached_prefix_tokens(later_dog) == 16


def test_generated_tokens_become_cacheable():
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK)
    request = make_request("a", random_tokens(30, seed=12))
    prefill(manager, request)
    rng = random.Random(13)
    for _ in range(10):
        request.append_output_token(rng.randrange(150_000))
        assert manager.allocate_slots(request, 1)
        request.num_computed_tokens += 1
        manager.cache_blocks(request, request.num_computed_tokens)
    assert manager.pool.num_cached_blocks == 2  # 40 tokens: two full blocks
    follow_up = make_request("b", request.all_token_ids + random_tokens(5, seed=14))
    assert manager.num_cached_prefix_tokens(follow_up) == 32


def test_cache_blocks_is_idempotent_and_skips_partial_blocks():
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK)
    request = make_request("a", random_tokens(40, seed=15))
    assert manager.allocate_slots(request, 40)
    manager.cache_blocks(request, 20)
    assert manager.pool.num_cached_blocks == 1
    manager.cache_blocks(request, 20)
    manager.cache_blocks(request, 10)
    assert manager.pool.num_cached_blocks == 1
    manager.cache_blocks(request, 40)
    assert manager.pool.num_cached_blocks == 2
    manager.check_integrity()


def test_allocate_failure_changes_nothing():
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK)
    tokens = random_tokens(48, seed=16)
    prefill(manager, make_request("a", tokens))
    manager.free(make_request("a", tokens))
    holder = make_request("h", random_tokens(32, seed=17))
    assert manager.allocate_slots(holder, 32)  # 2 blocks held: 4 free, 3 of them cached
    # Reusing 2 cached blocks (which are free) + 3 fresh blocks needs 5 free blocks: only 4.
    greedy = make_request("g", tokens[:40] + random_tokens(40, seed=18))
    blocks, num_tokens = manager.get_computed_blocks(greedy)
    assert num_tokens == 32
    before = snapshot(manager)
    assert not manager.allocate_slots(greedy, greedy.num_tokens - num_tokens, blocks, num_tokens)
    assert snapshot(manager) == before
    manager.check_integrity()
    # Exactly enough (2 revived + 2 fresh) succeeds.
    modest = make_request("m", tokens[:40] + random_tokens(24, seed=19))
    blocks, num_tokens = manager.get_computed_blocks(modest)
    assert manager.allocate_slots(modest, modest.num_tokens - num_tokens, blocks, num_tokens)
    assert manager.num_free_blocks == 0


def test_free_evicts_a_prefix_tail_before_its_head():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK)
    tokens = random_tokens(64, seed=20)
    prefill(manager, make_request("a", tokens))
    manager.free(make_request("a", tokens))
    evicting = make_request("x", random_tokens(16, seed=21))
    assert manager.allocate_slots(evicting, 16)  # takes the tail block of the cached prefix
    assert manager.num_cached_prefix_tokens(make_request("b", tokens + [7])) == 48


def test_prefix_caching_disabled():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK, enable_prefix_caching=False)
    tokens = random_tokens(40, seed=22)
    assert prefill(manager, make_request("a", tokens)) == 0
    assert manager.get_computed_blocks(make_request("b", tokens)) == ([], 0)
    assert manager.pool.num_cached_blocks == 0
    manager.free(make_request("a", tokens))
    manager.check_integrity()


def test_prefix_cache_stats_count_tokens_once_per_admission():
    manager = KVCacheManager(num_blocks=20, block_size=BLOCK)
    tokens = random_tokens(40, seed=23)
    first = make_request("a", tokens)
    prefill(manager, first)
    manager.free(first)
    second = make_request("b", tokens)
    prefill(manager, second)
    assert manager.allocate_slots(second, 0)  # a later step of the same request is not a query
    assert (manager.prefix_cache_stats.queries, manager.prefix_cache_stats.hits) == (80, 32)
    assert manager.prefix_cache_stats.hit_rate == 32 / 80


def test_random_workload_keeps_invariants_and_ends_idle():
    rng = random.Random(24)
    manager = KVCacheManager(num_blocks=40, block_size=4)
    shared_prefixes = [random_tokens(rng.randrange(4, 20), seed=100 + i) for i in range(3)]
    running = {}
    for step in range(300):
        if running and (len(running) > 6 or rng.random() < 0.3):
            request = running.pop(rng.choice(sorted(running)))
            manager.free(request)
        else:
            prefix = rng.choice(shared_prefixes)
            tail = random_tokens(rng.randrange(1, 12), seed=1000 + step)
            request = make_request(f"r{step}", prefix + tail)
            hit_blocks, num_hit = manager.get_computed_blocks(request)
            assert num_hit < request.num_tokens and num_hit % 4 == 0
            if manager.allocate_slots(request, request.num_tokens - num_hit, hit_blocks, num_hit):
                request.num_computed_tokens = request.num_tokens
                manager.cache_blocks(request, request.num_tokens)
                running[request.request_id] = request
        manager.check_integrity()
    for request in running.values():
        manager.free(request)
    manager.check_integrity()
    assert manager.num_free_blocks == 40
    assert manager.prefix_cache_stats.hits > 0
