"""Per-request block tables on top of the block pool, with prefix caching of full blocks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from spaceserve.core.request import Request
from spaceserve.kvcache.block_pool import BlockPool, CacheIntegrityError, KVBlock
from spaceserve.kvcache.prefix_hash import extend_block_hashes


@dataclass
class PrefixCacheStats:
    """Counted once per admission (a request's first allocation, again after a preemption), in tokens."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.prefix_cache_stats = PrefixCacheStats()
        self._tables: dict[str, list[KVBlock]] = {}
        # How many leading blocks of each table are already registered in the prefix cache.
        self._num_cached_blocks: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of the request, in whole blocks, leaving at least one token to compute.

        Takes no references: pass the result to `allocate_slots` before anything else allocates.
        """
        if not self.enable_prefix_caching:
            return [], 0
        extend_block_hashes(request, self.block_size)
        # The last token must run through the model to produce logits, so a fully cached prompt still recomputes it.
        max_hit_blocks = max(0, request.num_tokens - 1) // self.block_size
        hit_blocks: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hit_blocks.append(block)
        return hit_blocks, len(hit_blocks) * self.block_size

    def num_cached_prefix_tokens(self, request: Request) -> int:
        return self.get_computed_blocks(request)[1]

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVBlock] = (),
        num_new_computed_tokens: int = 0,
    ) -> bool:
        """Grow the request's table to cover computed + new computed + new tokens; False (nothing changed) if the
        free blocks don't suffice. `new_computed_blocks` are prefix hits from `get_computed_blocks`, only valid
        for a request that holds no blocks yet."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        if num_new_computed_tokens != len(new_computed_blocks) * self.block_size:
            raise ValueError(
                f"{num_new_computed_tokens} new computed tokens do not fill {len(new_computed_blocks)} blocks "
                f"of {self.block_size}"
            )
        request_id = request.request_id
        table = self._tables.get(request_id, [])
        if new_computed_blocks and (table or request.num_computed_tokens):
            raise ValueError(f"prefix hits for {request_id!r}, which already has computed tokens")

        num_tokens = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_blocks_needed = -(-num_tokens // self.block_size)
        num_fresh_blocks = max(0, num_blocks_needed - len(table) - len(new_computed_blocks))
        # Reviving a free cached block takes it out of the free queue, so it costs a free block too.
        num_revived = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_fresh_blocks + num_revived > self.pool.num_free_blocks:
            return False

        is_admission = request_id not in self._tables
        self.pool.touch(new_computed_blocks)
        table = table + list(new_computed_blocks) + self.pool.get_new_blocks(num_fresh_blocks)
        if not table:
            return True
        self._tables[request_id] = table
        if is_admission:
            self._num_cached_blocks[request_id] = len(new_computed_blocks)
            if self.enable_prefix_caching:
                self.prefix_cache_stats.queries += request.num_tokens
                self.prefix_cache_stats.hits += num_new_computed_tokens
        return True

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the hashes of the request's blocks that are full once `num_computed_tokens` have KV."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(request.request_id)
        if table is None:
            return
        num_full_blocks = min(num_computed_tokens // self.block_size, len(table))
        first_uncached = self._num_cached_blocks[request.request_id]
        if num_full_blocks <= first_uncached:
            return
        extend_block_hashes(request, self.block_size)
        for index in range(first_uncached, num_full_blocks):
            self.pool.cache_full_block(table[index], request.block_hashes[index])
        self._num_cached_blocks[request.request_id] = num_full_blocks

    def free(self, request: Request) -> None:
        """Release the request's blocks tail first, so a prefix's tail is evicted before its head."""
        table = self._tables.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        self.pool.free_blocks(reversed(table))

    def block_ids(self, request_id: str) -> tuple[int, ...]:
        return tuple(block.block_id for block in self._tables.get(request_id, ()))

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes; only when no request holds blocks (returns False otherwise)."""
        return self.pool.reset_prefix_cache()

    def check_integrity(self) -> None:
        """Raise CacheIntegrityError unless each block's ref count equals the number of tables holding it and
        the pool's invariants hold; with no request holding blocks, every block must be free."""
        holders = Counter(block.block_id for table in self._tables.values() for block in table)
        for block in self.pool.blocks:
            if block.ref_cnt != holders.get(block.block_id, 0):
                raise CacheIntegrityError(
                    f"{block!r} has ref count {block.ref_cnt} but {holders.get(block.block_id, 0)} tables hold it"
                )
        for request_id, num_cached in self._num_cached_blocks.items():
            if num_cached > len(self._tables.get(request_id, ())):
                raise CacheIntegrityError(f"{request_id!r}: {num_cached} cached blocks exceed its table")
        self.pool.check_integrity(expect_idle=not self._tables)
