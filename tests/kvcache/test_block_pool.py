import random

import pytest

from spaceserve.kvcache.block_pool import BlockPool, CacheIntegrityError, NoFreeBlocksError


def _hash(i: int) -> bytes:
    return random.Random(i).randbytes(32)


def test_fresh_pool_is_all_free_and_reserves_nothing():
    pool = BlockPool(8, enable_caching=True)
    assert pool.num_free_blocks == 8
    assert pool.usage == 0.0
    assert [b.block_id for b in pool.get_new_blocks(8)] == list(range(8))
    assert pool.num_free_blocks == 0
    assert pool.usage == 1.0


def test_allocate_and_free_track_ref_counts():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(2)
    assert [b.ref_cnt for b in blocks] == [1, 1]
    pool.touch(blocks)
    assert [b.ref_cnt for b in blocks] == [2, 2]
    pool.free_blocks(blocks)
    assert pool.num_free_blocks == 2
    pool.check_integrity()
    pool.free_blocks(blocks)
    assert [b.ref_cnt for b in blocks] == [0, 0]
    assert pool.num_free_blocks == 4
    pool.check_integrity(expect_idle=True)


def test_over_allocation_raises_and_changes_nothing():
    pool = BlockPool(3, enable_caching=True)
    pool.get_new_blocks(2)
    with pytest.raises(NoFreeBlocksError):
        pool.get_new_blocks(2)
    assert pool.num_free_blocks == 1
    pool.check_integrity()


def test_double_free_is_an_integrity_error():
    pool = BlockPool(2, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(CacheIntegrityError):
        pool.free_blocks([block])


def test_cached_blocks_are_evicted_in_the_order_they_were_freed():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(4)
    for block in blocks:
        assert pool.cache_full_block(block, _hash(block.block_id))
    freed_order = [blocks[2], blocks[0], blocks[3], blocks[1]]
    pool.free_blocks(freed_order)
    # Still cached while free: a prefix hit could revive them.
    assert all(pool.get_cached_block(_hash(b.block_id)) is b for b in blocks)

    for expected in freed_order:
        (reused,) = pool.get_new_blocks(1)
        assert reused is expected
        assert reused.block_hash is None
        assert pool.get_cached_block(_hash(expected.block_id)) is None
    pool.check_integrity()


def test_touching_a_free_cached_block_revives_it_out_of_the_free_queue():
    pool = BlockPool(3, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_block(blocks[0], _hash(0))
    pool.free_blocks(blocks)
    assert pool.num_free_blocks == 3

    hit = pool.get_cached_block(_hash(0))
    assert hit is blocks[0]
    pool.touch([hit])
    assert hit.ref_cnt == 1 and pool.num_free_blocks == 2
    fresh = pool.get_new_blocks(2)
    assert hit not in fresh
    assert pool.get_cached_block(_hash(0)) is hit
    pool.check_integrity()


def test_unhashed_blocks_are_reused_before_cached_ones():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(4)
    pool.cache_full_block(blocks[0], _hash(0))
    pool.cache_full_block(blocks[1], _hash(1))
    pool.free_blocks([blocks[0], blocks[2], blocks[1], blocks[3]])
    reuse_order = [b.block_id for b in pool.get_new_blocks(4)]
    assert reuse_order[:2] == [3, 2]  # unhashed first, most recently freed at the head
    assert reuse_order[2:] == [0, 1]  # then cached ones, least recently freed first


def test_duplicate_content_keeps_the_first_cached_copy():
    pool = BlockPool(2, enable_caching=True)
    first, second = pool.get_new_blocks(2)
    assert pool.cache_full_block(first, _hash(7))
    assert not pool.cache_full_block(second, _hash(7))
    assert second.block_hash is None
    assert pool.get_cached_block(_hash(7)) is first
    assert pool.cache_full_block(first, _hash(7))  # idempotent
    with pytest.raises(CacheIntegrityError):
        pool.cache_full_block(first, _hash(8))
    pool.check_integrity()


def test_caching_disabled_registers_nothing():
    pool = BlockPool(2, enable_caching=False)
    (block,) = pool.get_new_blocks(1)
    assert not pool.cache_full_block(block, _hash(1))
    assert pool.get_cached_block(_hash(1)) is None
    pool.free_blocks([block])
    pool.check_integrity(expect_idle=True)


def test_check_integrity_detects_corruption():
    pool = BlockPool(3, enable_caching=True)
    blocks = pool.get_new_blocks(2)
    with pytest.raises(CacheIntegrityError, match="idle"):
        pool.check_integrity(expect_idle=True)

    blocks[0].ref_cnt = 0  # leaked: unreferenced but not in the free queue
    with pytest.raises(CacheIntegrityError):
        pool.check_integrity()
    blocks[0].ref_cnt = 1

    blocks[1].block_hash = _hash(3)  # hash never registered in the map
    with pytest.raises(CacheIntegrityError):
        pool.check_integrity()


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(2, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_block(block, _hash(1))
    assert not pool.reset_prefix_cache()
    pool.free_blocks([block])
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(_hash(1)) is None and pool.num_cached_blocks == 0
    pool.check_integrity(expect_idle=True)
