"""Write one step's K/V rows into the paged cache at their slots; a negative slot marks a padded row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_mapping_ptr,
    key_token_stride,
    value_token_stride,
    cache_kv_stride,
    ROW: tl.constexpr,  # num_kv_heads * head_dim: one token's row, contiguous in the cache and in key/value
    BLOCK_ROW: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        offsets = tl.arange(0, BLOCK_ROW)
        mask = offsets < ROW
        key = tl.load(key_ptr + token.to(tl.int64) * key_token_stride + offsets, mask=mask)
        value = tl.load(value_ptr + token.to(tl.int64) * value_token_stride + offsets, mask=mask)
        tl.store(cache_ptr + slot * ROW + offsets, key, mask=mask)
        tl.store(cache_ptr + cache_kv_stride + slot * ROW + offsets, value, mask=mask)


def token_rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, heads, head_dim] with each token's heads contiguous (a row may be a view into a wider tensor)."""
    if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        x = x.contiguous()
    return x


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value [N, Hkv, D] -> kv_cache [2, num_blocks, block_size, Hkv, D] at slot_mapping [N] (< 0: skipped)."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    key, value = token_rows(key), token_rows(value)
    row = key.shape[1] * key.shape[2]
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        value.stride(0),
        kv_cache.stride(0),
        ROW=row,
        BLOCK_ROW=triton.next_power_of_2(row),
    )
