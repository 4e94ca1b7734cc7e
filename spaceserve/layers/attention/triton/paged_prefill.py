"""Prefill and chunked prefill over the paged KV cache: a sequence's new tokens attend causally to its cached
prefix and to themselves (already stored), FlashAttention-2 style with an online softmax.

One launch covers every sequence with more than one new token. The host lists the work once per step as
(sequence, first query row of the block) pairs, so the grid has no empty programs however ragged the batch is;
blocks that see the most keys come first. Key tiles entirely below the causal diagonal run without masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spaceserve.layers.attention.triton.common import LOG2E, AttentionTiling, dot_precision


@triton.jit
def _paged_prefill_kernel(
    out_ptr,
    query_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    work_ptr,
    out_token_stride,
    out_head_stride,
    query_token_stride,
    query_head_stride,
    cache_kv_stride,
    block_table_stride,
    qk_scale,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0)
    item = tl.program_id(1)
    seq = tl.load(work_ptr + 2 * item)
    block_start = tl.load(work_ptr + 2 * item + 1)
    query_row = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_row
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len
    kv_head = head // GROUP

    offs_m = block_start + tl.arange(0, BLOCK_M)
    row_mask = offs_m < query_len
    dims = tl.arange(0, BLOCK_D)
    if BLOCK_D == HEAD_DIM:  # no column mask, so K/V loads stay 16 bytes wide
        q_mask = row_mask[:, None]
    else:
        q_mask = row_mask[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(
        query_ptr + (query_row + offs_m).to(tl.int64)[:, None] * query_token_stride + head * query_head_stride + dims[None, :],
        mask=q_mask,
        other=0.0,
    )
    positions = context_len + offs_m
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    head_offset = kv_head * HEAD_DIM
    # keys below every row's position need no mask: only the tiles on the causal diagonal take the second loop
    unmasked_end = ((context_len + block_start + 1) // BLOCK_N) * BLOCK_N
    for start in range(0, unmasked_end, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        pages = tl.load(table + tokens // PAGE).to(tl.int64)
        rows = (pages * PAGE + tokens % PAGE) * (NUM_KV_HEADS * HEAD_DIM) + head_offset
        if BLOCK_D == HEAD_DIM:
            k = tl.load(cache_ptr + rows[:, None] + dims[None, :])
        else:
            k = tl.load(cache_ptr + rows[:, None] + dims[None, :], mask=(dims < HEAD_DIM)[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        m_new = tl.maximum(m, tl.max(scores, 1) * qk_scale)
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores * qk_scale - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        if BLOCK_D == HEAD_DIM:
            v = tl.load(cache_ptr + cache_kv_stride + rows[:, None] + dims[None, :])
        else:
            v = tl.load(cache_ptr + cache_kv_stride + rows[:, None] + dims[None, :], mask=(dims < HEAD_DIM)[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m = m_new
    keys_end = context_len + tl.minimum(block_start + BLOCK_M, query_len)
    for start in range(unmasked_end, keys_end, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        token_mask = tokens < keys_end
        pages = tl.load(table + tokens // PAGE, mask=token_mask, other=0).to(tl.int64)
        rows = (pages * PAGE + tokens % PAGE) * (NUM_KV_HEADS * HEAD_DIM) + head_offset
        if BLOCK_D == HEAD_DIM:
            kv_mask = token_mask[:, None]
        else:
            kv_mask = token_mask[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(cache_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        visible = (tokens[None, :] <= positions[:, None]) & token_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1) * qk_scale)
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores * qk_scale - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(cache_ptr + cache_kv_stride + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m = m_new
    tl.store(
        out_ptr + (query_row + offs_m).to(tl.int64)[:, None] * out_token_stride + head * out_head_stride + dims[None, :],
        (acc / l[:, None]).to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


def paged_prefill(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    work: torch.Tensor,
    scale: float,
    tiling: AttentionTiling,
) -> None:
    """Fill the rows of every (sequence, query block) in work; K/V of the new tokens must already be cached."""
    if work.shape[0] == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    _paged_prefill_kernel[(num_heads, work.shape[0])](
        out,
        query,
        kv_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        work,
        out.stride(0),
        out.stride(1),
        query.stride(0),
        query.stride(1),
        kv_cache.stride(0),
        block_tables.stride(0),
        scale * LOG2E,
        NUM_KV_HEADS=num_kv_heads,
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE=block_size,
        BLOCK_M=tiling.block_m,
        BLOCK_N=tiling.block_n,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
