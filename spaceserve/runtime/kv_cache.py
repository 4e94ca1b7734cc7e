"""The paged KV cache: one [2, num_blocks, block_size, kv_heads, head_dim] tensor per layer. How many blocks is
decided by memory_planner.py."""

from __future__ import annotations

import torch

from spaceserve.models.config import TextConfig


def kv_bytes_per_block(text: TextConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * block_size * text.num_key_value_heads * text.head_dim * element


def allocate_kv_caches(
    text: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    shape = (2, num_blocks, block_size, text.num_key_value_heads, text.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text.num_hidden_layers)]
