"""The paged KV cache: one [2, num_blocks, block_size, kv_heads, head_dim] tensor per layer. How many blocks is
decided by memory_planner.py. A tensor-parallel rank holds its own KV heads only (`kv_heads_per_rank`)."""

from __future__ import annotations

import torch

from spaceserve.models.config import TextConfig


def kv_heads_per_rank(text: TextConfig, tensor_parallel_size: int = 1) -> int:
    """KV heads split across the ranks, or one per rank when there are fewer heads than ranks (replicated)."""
    return max(1, text.num_key_value_heads // tensor_parallel_size)


def kv_bytes_per_block(text: TextConfig, block_size: int, dtype: torch.dtype, tensor_parallel_size: int = 1) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    heads = kv_heads_per_rank(text, tensor_parallel_size)
    return 2 * text.num_hidden_layers * block_size * heads * text.head_dim * element


def allocate_kv_caches(
    text: TextConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    tensor_parallel_size: int = 1,
) -> list[torch.Tensor]:
    shape = (2, num_blocks, block_size, kv_heads_per_rank(text, tensor_parallel_size), text.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text.num_hidden_layers)]
