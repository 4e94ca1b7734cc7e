"""Decode attention over the paged KV cache, split along the context (flash-decoding).

A split is a run of ``split_tokens`` context tokens (more for contexts past ``MAX_SPLITS * split_tokens``), taken
against all query heads of one KV head's group, so GQA reads every K/V row once. Programs of one (sequence, KV
head) stride over that sequence's splits: their number comes from tensor shapes and the SM count, never from
lengths, so a CUDA graph replays them over new lengths, and a large batch gets one program per (sequence, KV
head) instead of a grid of mostly empty ones. A second kernel merges the splits by their log-sum-exp. The split
size depends only on the sequence's own length, so its result does not depend on what else is in the batch.

Rows whose query length is not 1 belong to the prefill kernel and are skipped here; a row with seq_len 0 (a
padded graph row) writes zeros.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from spaceserve.layers.attention.triton.common import LOG2E, dot_precision


MAX_SPLITS = 32


@triton.jit
def _split_size(seq_len, SPLIT_TOKENS: tl.constexpr, MAX_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Context tokens per split for a sequence of seq_len tokens: SPLIT_TOKENS, grown in BLOCK_N steps so that
    no sequence needs more than MAX_SPLITS splits."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, MAX_SPLITS), BLOCK_N) * BLOCK_N, SPLIT_TOKENS)


@triton.jit
def _decode_split_kernel(
    query_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    partial_out_ptr,  # [B, H, num_splits, HEAD_DIM] float32
    partial_lse_ptr,  # [B, H, num_splits] float32, log2 domain
    query_token_stride,
    query_head_stride,
    cache_kv_stride,
    block_table_stride,
    num_heads,
    num_splits,
    qk_scale,  # softmax scale * log2(e)
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,  # the cache's block_size
    SPLIT_TOKENS: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    query_row = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_row
    seq_len = tl.load(seq_lens_ptr + seq)
    if query_len == 1:
        split_size = _split_size(seq_len, SPLIT_TOKENS, MAX_SPLITS, BLOCK_N)
        used_splits = tl.minimum(tl.cdiv(seq_len, split_size), num_splits)
        group = tl.arange(0, BLOCK_H)
        heads = kv_head * GROUP + group
        head_mask = group < GROUP
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < HEAD_DIM
        q = tl.load(
            query_ptr + query_row.to(tl.int64) * query_token_stride + heads[:, None] * query_head_stride + dims[None, :],
            mask=head_mask[:, None] & dim_mask[None, :],
            other=0.0,
        )
        table = block_tables_ptr + seq.to(tl.int64) * block_table_stride
        partial_base = (seq * num_heads + heads).to(tl.int64) * num_splits
        for split in range(tl.program_id(2), used_splits, tl.num_programs(2)):
            token_begin = split * split_size
            token_end = tl.minimum(token_begin + split_size, seq_len)
            m = tl.full([BLOCK_H], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_H], tl.float32)
            acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
            for start in range(token_begin, token_end, BLOCK_N):
                tokens = start + tl.arange(0, BLOCK_N)
                token_mask = tokens < token_end
                pages = tl.load(table + tokens // PAGE, mask=token_mask, other=0).to(tl.int64)
                rows = (pages * PAGE + tokens % PAGE) * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM
                kv_mask = token_mask[:, None] & dim_mask[None, :]
                k = tl.load(cache_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
                scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
                scores = tl.where(token_mask[None, :], scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, 1))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(scores - m_new[:, None])
                l = l * alpha + tl.sum(p, 1)
                v = tl.load(cache_ptr + cache_kv_stride + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                m = m_new
            partial = partial_base + split
            tl.store(
                partial_out_ptr + partial[:, None] * HEAD_DIM + dims[None, :],
                acc / l[:, None],
                mask=head_mask[:, None] & dim_mask[None, :],
            )
            tl.store(partial_lse_ptr + partial, m + tl.log2(l), mask=head_mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    out_token_stride,
    out_head_stride,
    num_heads,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_TOKENS: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    query_row = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_row
    if query_len == 1:
        seq_len = tl.load(seq_lens_ptr + seq)
        split_size = _split_size(seq_len, SPLIT_TOKENS, MAX_SPLITS, BLOCK_N)
        used_splits = tl.minimum(tl.cdiv(seq_len, split_size), num_splits)
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < HEAD_DIM
        out = out_ptr + query_row.to(tl.int64) * out_token_stride + head * out_head_stride + dims
        if used_splits == 0:
            tl.store(out, tl.zeros([BLOCK_D], tl.float32).to(out_ptr.dtype.element_ty), mask=dim_mask)
        else:
            first = (seq * num_heads + head).to(tl.int64) * num_splits
            m = tl.load(partial_lse_ptr + first)
            acc = tl.load(partial_out_ptr + first * HEAD_DIM + dims, mask=dim_mask, other=0.0)
            weight_sum = tl.full([], 1.0, tl.float32)
            for split in range(1, used_splits):
                lse = tl.load(partial_lse_ptr + first + split)
                part = tl.load(partial_out_ptr + (first + split) * HEAD_DIM + dims, mask=dim_mask, other=0.0)
                m_new = tl.maximum(m, lse)
                alpha = tl.exp2(m - m_new)
                weight = tl.exp2(lse - m_new)
                acc = acc * alpha + part * weight
                weight_sum = weight_sum * alpha + weight
                m = m_new
            tl.store(out, (acc / weight_sum).to(out_ptr.dtype.element_ty), mask=dim_mask)


def num_decode_splits(block_tables: torch.Tensor, block_size: int, split_tokens: int) -> int:
    """Partial results kept per (sequence, head): enough for the widest context block_tables can describe, at most
    MAX_SPLITS; a shape, never a device value."""
    return min(MAX_SPLITS, triton.cdiv(block_tables.shape[1] * block_size, split_tokens))


@functools.cache
def _target_programs(device: torch.device) -> int:
    """Enough programs to give every SM a few; the interpreter gets few, as each costs it time."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def paged_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    split_tokens: int,
    block_n: int,
    num_warps: int = 4,
    num_stages: int = 2,
) -> None:
    """Fill out[query_start_loc[b]] for every sequence b whose query length is 1.

    query/out [N, H, D]; kv_cache [2, num_blocks, block_size, Hkv, D] contiguous; block_tables [B, W] int32.
    Scratch is allocated from shapes only, so this can be captured in a CUDA graph.
    """
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    num_splits = max(num_decode_splits(block_tables, block_size, split_tokens), 1)
    split_programs = min(num_splits, max(1, triton.cdiv(_target_programs(query.device), num_seqs * num_kv_heads)))
    block_d = triton.next_power_of_2(head_dim)
    partial_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
    partial_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, split_programs)](
        query,
        kv_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        partial_out,
        partial_lse,
        query.stride(0),
        query.stride(1),
        kv_cache.stride(0),
        block_tables.stride(0),
        num_heads,
        num_splits,
        scale * LOG2E,
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE=block_size,
        SPLIT_TOKENS=split_tokens,
        MAX_SPLITS=MAX_SPLITS,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _decode_reduce_kernel[(num_seqs, num_heads)](
        out,
        partial_out,
        partial_lse,
        seq_lens,
        query_start_loc,
        out.stride(0),
        out.stride(1),
        num_heads,
        num_splits,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        SPLIT_TOKENS=split_tokens,
        MAX_SPLITS=MAX_SPLITS,
        BLOCK_N=block_n,
    )
