"""The interface every attention implementation fills: store this step's K/V into the paged cache and attend.

A step's tokens are packed: sequence b owns query rows query_start_loc[b]:query_start_loc[b+1] and, after this
step, seq_lens[b] tokens of context whose K/V live in the blocks listed in block_tables[b]. The new tokens are the
last query_len of them, so prefill, chunked prefill over a cached prefix and decode are one case.

Graphed decode passes persistent padded tensors: query_start_loc = arange, seq_lens 0 and slot_mapping -1 in the
padding rows, block_tables [B_graph, max_blocks_per_seq] padded with 0, query_lens_cpu = (1,) * B_graph, and a
seq_lens_cpu that is stale between replays. A backend's decode path (max_query_len == 1) therefore reads only the
device tensors, skips slots < 0, and never uses seq_lens_cpu or max_seq_len (the torch reference does, so it is
not graph-capturable).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_lens_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]

    @property
    def num_sequences(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)


def build_attention_metadata(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    query_start = [0]
    slots: list[int] = []
    for query_len, seq_len, table in zip(query_lens, seq_lens, block_tables):
        query_start.append(query_start[-1] + query_len)
        for index in range(seq_len - query_len, seq_len):
            slots.append(table[index // block_size] * block_size + index % block_size)
    width = max((len(t) for t in block_tables), default=0)
    padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
    return AttentionMetadata(
        query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(padded), width),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
    )


class AttentionBackend(ABC):
    name: str

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """query [N, H, D], key/value [N, Hkv, D], kv_cache [2, num_blocks, block_size, Hkv, D] -> [N, H, D]."""
