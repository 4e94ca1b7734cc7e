"""Bookkeeping of the encoder cache: which images' and video chunks' embeddings are (or are being) stored, and who
needs them. A video is stored as its chunks, one entry each, released one by one as the LM consumes them.

The tensors live with the encoder runner, keyed by mm_hash; this class decides what is stored and evicted.
An entry is pending from `allocate` until `mark_ready`; pending entries are never evicted (the encoder is writing
them). An entry nobody references stays cached for reuse and, once ready, is evictable in LRU order of when it
became unreferenced.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from spaceserve.core.errors import InvalidInputError
from spaceserve.kvcache.block_pool import CacheIntegrityError


class EncoderCacheTooSmallError(InvalidInputError):
    """An image needs more encoder tokens than the whole encoder cache holds, so it could never be encoded."""


class EncoderCacheFullError(RuntimeError):
    """`allocate` was called without room; callers check `can_allocate` first."""


def check_fits_encoder_cache(num_tokens: int, capacity_tokens: int, item: str = "image") -> None:
    """Raise EncoderCacheTooSmallError if an item of `num_tokens` embedding rows could never be cached."""
    if num_tokens > capacity_tokens:
        raise EncoderCacheTooSmallError(
            f"{item} needs {num_tokens} encoder tokens but the encoder cache holds {capacity_tokens}; "
            "raise encoder cache_tokens or lower max_pixels"
        )


@dataclass
class EncoderCacheEntry:
    mm_hash: str
    num_tokens: int
    request_ids: set[str] = field(default_factory=set)
    ready: bool = False


class EncoderCache:
    def __init__(self, capacity_tokens: int) -> None:
        if capacity_tokens < 1:
            raise ValueError(f"capacity_tokens must be >= 1, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        self._entries: dict[str, EncoderCacheEntry] = {}
        self._evictable: OrderedDict[str, None] = OrderedDict()  # unreferenced ready entries, LRU first
        self._evictable_tokens = 0
        self._free_tokens = capacity_tokens
        self._hashes_of_request: dict[str, set[str]] = {}

    @property
    def num_free_tokens(self) -> int:
        """Capacity held by no entry (evictable entries not counted)."""
        return self._free_tokens

    @property
    def num_evictable_tokens(self) -> int:
        return self._evictable_tokens

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    @property
    def usage(self) -> float:
        """Fraction of capacity held by entries, evictable ones included."""
        return 1.0 - self._free_tokens / self.capacity_tokens

    def check_fits(self, num_tokens: int, item: str = "image") -> None:
        check_fits_encoder_cache(num_tokens, self.capacity_tokens, item)

    def contains(self, mm_hash: str) -> bool:
        return mm_hash in self._entries

    def is_ready(self, mm_hash: str) -> bool:
        entry = self._entries.get(mm_hash)
        return entry is not None and entry.ready

    def request_ids(self, mm_hash: str) -> frozenset[str]:
        return frozenset(self._entry(mm_hash).request_ids)

    def add_ref(self, mm_hash: str, request_id: str) -> None:
        entry = self._entry(mm_hash)
        if not entry.request_ids and mm_hash in self._evictable:
            del self._evictable[mm_hash]
            self._evictable_tokens -= entry.num_tokens
        entry.request_ids.add(request_id)
        self._hashes_of_request.setdefault(request_id, set()).add(mm_hash)

    def release(self, mm_hash: str, request_id: str) -> None:
        """Drop the request's reference; a no-op if it held none."""
        entry = self._entries.get(mm_hash)
        if entry is None or request_id not in entry.request_ids:
            return
        entry.request_ids.discard(request_id)
        hashes = self._hashes_of_request[request_id]
        hashes.discard(mm_hash)
        if not hashes:
            del self._hashes_of_request[request_id]
        if not entry.request_ids and entry.ready:
            self._make_evictable(entry)

    def release_request(self, request_id: str) -> None:
        for mm_hash in list(self._hashes_of_request.get(request_id, ())):
            self.release(mm_hash, request_id)

    def can_allocate(self, num_tokens: int) -> bool:
        return num_tokens <= self._free_tokens + self._evictable_tokens

    def allocate(self, mm_hash: str, num_tokens: int, request_ids: Iterable[str]) -> list[str]:
        """Add a pending entry referenced by `request_ids`, evicting LRU unreferenced ready entries as needed.

        Returns the evicted hashes so the owner can drop their tensors.
        """
        if mm_hash in self._entries:
            raise ValueError(f"encoder cache already holds {mm_hash!r}")
        self.check_fits(num_tokens)
        if not self.can_allocate(num_tokens):
            raise EncoderCacheFullError(
                f"{num_tokens} tokens do not fit: {self._free_tokens} free, {self._evictable_tokens} evictable"
            )
        evicted = []
        while self._free_tokens < num_tokens:
            victim_hash, _ = self._evictable.popitem(last=False)
            victim = self._entries.pop(victim_hash)
            self._evictable_tokens -= victim.num_tokens
            self._free_tokens += victim.num_tokens
            evicted.append(victim_hash)
        self._free_tokens -= num_tokens
        self._entries[mm_hash] = EncoderCacheEntry(mm_hash, num_tokens)
        for request_id in request_ids:
            self.add_ref(mm_hash, request_id)
        return evicted

    def mark_ready(self, mm_hash: str) -> None:
        entry = self._entry(mm_hash)
        if entry.ready:
            return
        entry.ready = True
        if not entry.request_ids:
            self._make_evictable(entry)

    def drop(self, mm_hash: str) -> set[str]:
        """Remove an entry outright (e.g. its encode failed); returns the requests that referenced it."""
        entry = self._entries.pop(mm_hash, None)
        if entry is None:
            return set()
        if mm_hash in self._evictable:
            del self._evictable[mm_hash]
            self._evictable_tokens -= entry.num_tokens
        self._free_tokens += entry.num_tokens
        for request_id in entry.request_ids:
            hashes = self._hashes_of_request[request_id]
            hashes.discard(mm_hash)
            if not hashes:
                del self._hashes_of_request[request_id]
        return entry.request_ids

    def check_integrity(self, expect_idle: bool = True) -> None:
        """Raise CacheIntegrityError unless capacity and reference accounting agree and, with `expect_idle` (no
        request in flight, the default), no entry is referenced. Pass expect_idle=False while requests run."""
        used = sum(entry.num_tokens for entry in self._entries.values())
        if used + self._free_tokens != self.capacity_tokens or self._free_tokens < 0:
            raise CacheIntegrityError(
                f"entries hold {used} tokens and {self._free_tokens} are free, capacity {self.capacity_tokens}"
            )
        evictable = {h for h, e in self._entries.items() if e.ready and not e.request_ids}
        if set(self._evictable) != evictable:
            raise CacheIntegrityError(f"evictable set {list(self._evictable)} should be {sorted(evictable)}")
        if self._evictable_tokens != sum(self._entries[h].num_tokens for h in evictable):
            raise CacheIntegrityError(f"evictable token count {self._evictable_tokens} is stale")
        refs = {(r, h) for h, e in self._entries.items() for r in e.request_ids}
        indexed = {(r, h) for r, hashes in self._hashes_of_request.items() for h in hashes}
        if refs != indexed:
            raise CacheIntegrityError("per-request index disagrees with entry references")
        if expect_idle and refs:
            raise CacheIntegrityError(f"idle but entries are still referenced: {sorted(refs)[:8]}")

    def _entry(self, mm_hash: str) -> EncoderCacheEntry:
        entry = self._entries.get(mm_hash)
        if entry is None:
            raise KeyError(f"encoder cache holds no entry {mm_hash!r}")
        return entry

    def _make_evictable(self, entry: EncoderCacheEntry) -> None:
        self._evictable[entry.mm_hash] = None
        self._evictable_tokens += entry.num_tokens
