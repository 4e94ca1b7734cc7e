"""The encoder's outputs: each image's (or video chunk's) embedding rows on the device, by content hash.

The encoder cache (kvcache/encoder_cache.py) decides what is kept; this store only holds the tensors, and drops an
entry when the cache evicts it. The model runner reads rows from it when a prefill reaches an image's span.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch


class EmbeddingStore(Mapping[str, torch.Tensor]):
    def __init__(self) -> None:
        self._rows: dict[str, torch.Tensor] = {}

    def put(self, mm_hash: str, rows: torch.Tensor) -> None:
        self._rows[mm_hash] = rows

    def drop(self, mm_hashes: Iterable[str]) -> None:
        for mm_hash in mm_hashes:
            self._rows.pop(mm_hash, None)

    def __getitem__(self, mm_hash: str) -> torch.Tensor:
        try:
            return self._rows[mm_hash]
        except KeyError:
            raise KeyError(f"no embeddings stored for {mm_hash!r} (not encoded yet, or evicted)") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def num_bytes(self) -> int:
        return sum(rows.numel() * rows.element_size() for rows in self._rows.values())
