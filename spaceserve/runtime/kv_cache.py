"""Sizing and allocating the paged KV cache: one [2, num_blocks, block_size, kv_heads, head_dim] tensor per layer."""

from __future__ import annotations

import torch

from spaceserve.config import CacheConfig, SchedulerConfig
from spaceserve.core.errors import ConfigError
from spaceserve.models.config import TextConfig

_DEFAULT_CPU_KV_BYTES = 1 << 30


def kv_bytes_per_block(text: TextConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * block_size * text.num_key_value_heads * text.head_dim * element


def plan_num_blocks(
    cache: CacheConfig, scheduler: SchedulerConfig, text: TextConfig, dtype: torch.dtype, device: torch.device
) -> int:
    if cache.num_gpu_blocks is not None:
        return cache.num_gpu_blocks
    per_block = kv_bytes_per_block(text, cache.block_size, dtype)
    blocks_per_seq = -(-scheduler.max_model_len // cache.block_size)
    if cache.kv_cache_memory_bytes is not None:
        budget = cache.kv_cache_memory_bytes
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # memory this process's allocator holds but does not use is ours to reuse; the rest is someone else's
        used_by_others = total - free - torch.cuda.memory_reserved(device)
        budget = int(total * cache.gpu_memory_utilization) - used_by_others - torch.cuda.memory_allocated(device)
    else:
        budget = min(_DEFAULT_CPU_KV_BYTES, blocks_per_seq * scheduler.max_num_seqs * per_block)
    num_blocks = max(budget, 0) // per_block
    if num_blocks < blocks_per_seq:
        raise ConfigError(
            f"the KV cache fits {num_blocks} blocks of {cache.block_size} tokens, fewer than one sequence of "
            f"max_model_len={scheduler.max_model_len} needs ({blocks_per_seq}); lower max_model_len or give it memory"
        )
    return int(num_blocks)


def allocate_kv_caches(
    text: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    shape = (2, num_blocks, block_size, text.num_key_value_heads, text.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text.num_hidden_layers)]
