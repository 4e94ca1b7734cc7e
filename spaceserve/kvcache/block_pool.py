"""The physical KV blocks, their reference counts, the free queue and the prefix-cache hash map.

A block is in exactly one of three states:
  * in use: ref_cnt > 0, not in the free queue (it may or may not hold a cached hash);
  * free and cached: ref_cnt == 0, in the free queue, still in the hash map, so a prefix hit can revive it;
  * free and empty: ref_cnt == 0, in the free queue, no hash.
The free queue is in eviction order: allocation takes from the head. Cached blocks are freed to the tail (least
recently used first out); blocks without a hash go to the head, since reusing them first loses no cached prefix.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


class CacheIntegrityError(RuntimeError):
    """A cache's bookkeeping broke an invariant: a bug in spaceserve, never a user error."""


class NoFreeBlocksError(RuntimeError):
    """More blocks were requested than are free; callers check `num_free_blocks` first."""


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    """Set while the block's content is registered in the prefix cache; kept after it is freed until evicted."""

    def __repr__(self) -> str:
        cached = self.block_hash.hex()[:8] if self.block_hash is not None else None
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={cached})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(block_id=i) for i in range(num_blocks)]
        # block_id -> block, head = next to be allocated. OrderedDict gives O(1) pop-head, append and removal.
        self._free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_queue)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose content is registered in the prefix cache (in use or free)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Take `num_blocks` from the head of the free queue with ref_cnt 1, evicting any hash they still held."""
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(f"asked for {num_blocks} blocks, only {self.num_free_blocks} free")
        new_blocks = []
        for _ in range(num_blocks):
            _, block = self._free_queue.popitem(last=False)
            self._evict_hash(block)
            block.ref_cnt = 1
            new_blocks.append(block)
        return new_blocks

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on each block, reviving it out of the free queue if nobody held it."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free_queue[block.block_id]
            block.ref_cnt += 1

    def cache_full_block(self, block: KVBlock, block_hash: bytes) -> bool:
        """Register a full, written block under `block_hash`; True if the block is now the cached copy.

        Two requests can compute the same content at once into different blocks; the first registered stays the
        cached copy and the other stays unhashed (freed like any private block).
        """
        if not self.enable_caching:
            return False
        if block.ref_cnt < 1:
            raise CacheIntegrityError(f"caching {block!r} that no request holds")
        if block.block_hash is not None:
            if block.block_hash != block_hash:
                raise CacheIntegrityError(f"{block!r} is already cached under a different hash")
            return True
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each block; unreferenced blocks join the free queue in the order given."""
        for block in blocks:
            if block.ref_cnt < 1:
                raise CacheIntegrityError(f"freeing {block!r} that has no reference")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue[block.block_id] = block
                if block.block_hash is None:
                    self._free_queue.move_to_end(block.block_id, last=False)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no request holds a block (returns False otherwise)."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        return True

    def check_integrity(self, expect_idle: bool = False) -> None:
        """Raise CacheIntegrityError unless every invariant holds; `expect_idle`: no request holds any block."""
        for block in self.blocks:
            if block.ref_cnt < 0:
                raise CacheIntegrityError(f"negative ref count: {block!r}")
            in_free_queue = self._free_queue.get(block.block_id) is block
            if in_free_queue != (block.ref_cnt == 0):
                raise CacheIntegrityError(f"{block!r} free-queue membership disagrees with its ref count")
            if block.block_hash is not None and self._cached.get(block.block_hash) is not block:
                raise CacheIntegrityError(f"{block!r} holds a hash the map does not point back from")
        if len(self._free_queue) != sum(1 for b in self.blocks if b.ref_cnt == 0):
            raise CacheIntegrityError("free queue holds unknown or duplicate blocks")
        for block_hash, block in self._cached.items():
            if block.block_hash != block_hash:
                raise CacheIntegrityError(f"hash map entry points at {block!r} holding another hash")
        if self._cached and not self.enable_caching:
            raise CacheIntegrityError("blocks cached while prefix caching is disabled")
        if expect_idle and self.num_free_blocks != self.num_blocks:
            held = [b for b in self.blocks if b.ref_cnt > 0]
            raise CacheIntegrityError(f"idle but {len(held)} blocks are still held: {held[:8]}")

    def _evict_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
