"""Decode attention over the paged KV cache, split along the context (flash-decoding).

A split is a run of ``split_tokens`` context tokens (more for contexts past ``MAX_SPLITS * split_tokens``), taken
against all query heads of one KV head's group, so GQA reads every K/V row once. Programs of one (sequence, KV
head) stride over that sequence's splits: their number comes from tensor shapes and the SM count, never from
lengths, so a CUDA graph replays them over new lengths, and a large batch gets one program per (sequence, KV
head) instead of a grid of mostly empty ones. A second kernel merges the splits by their log-sum-exp, all
splits of a row in one load. The split size depends only on the sequence's own length, so its result does not
depend on what else is in the batch.

A sequence that fits in one split is finished by the split kernel (acc / l, exactly what the merge of one split
gives), and the merge kernel skips it; when no sequence can have two splits the merge kernel is not launched.
Rows whose query length is not 1 belong to the prefill kernel and are skipped here; a row with seq_len 0 (a
padded graph row) writes zeros.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from spaceserve.layers.attention.triton.common import LOG2E, DecodeConfig, dot_precision, interpreting


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
    out_ptr,
    partial_out_ptr,  # [B, H, num_splits, HEAD_DIM] float32
    partial_lse_ptr,  # [B, H, num_splits] float32, log2 domain
    query_token_stride,
    query_head_stride,
    out_token_stride,
    out_head_stride,
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
        if BLOCK_D == HEAD_DIM:
            row_mask = head_mask[:, None]
        else:
            row_mask = head_mask[:, None] & (dims < HEAD_DIM)[None, :]
        out_rows = out_ptr + query_row.to(tl.int64) * out_token_stride + heads[:, None] * out_head_stride + dims[None, :]
        if used_splits == 0:
            if tl.program_id(2) == 0:
                tl.store(out_rows, tl.zeros([BLOCK_H, BLOCK_D], tl.float32).to(out_ptr.dtype.element_ty), mask=row_mask)
        q = tl.load(
            query_ptr + query_row.to(tl.int64) * query_token_stride + heads[:, None] * query_head_stride + dims[None, :],
            mask=row_mask,
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
                if BLOCK_D == HEAD_DIM:
                    kv_mask = token_mask[:, None]
                else:
                    kv_mask = token_mask[:, None] & (dims < HEAD_DIM)[None, :]
                k = tl.load(cache_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
                scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                scores = tl.where(token_mask[None, :], scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, 1) * qk_scale)
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(scores * qk_scale - m_new[:, None])
                l = l * alpha + tl.sum(p, 1)
                v = tl.load(cache_ptr + cache_kv_stride + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
                m = m_new
            if used_splits == 1:
                tl.store(out_rows, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=row_mask)
            else:
                partial = partial_base + split
                tl.store(partial_out_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc / l[:, None], mask=row_mask)
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
    BLOCK_S: tl.constexpr,  # >= max_splits: fixed per config, so the merge order never depends on the table width
    SPLIT_TOKENS: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Merge the splits of every row that has two or more (the split kernel wrote the others)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    query_row = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_row
    seq_len = tl.load(seq_lens_ptr + seq)
    split_size = _split_size(seq_len, SPLIT_TOKENS, MAX_SPLITS, BLOCK_N)
    used_splits = tl.minimum(tl.cdiv(seq_len, split_size), num_splits)
    if query_len == 1:
        if used_splits > 1:
            splits = tl.arange(0, BLOCK_S)
            split_mask = splits < used_splits
            dims = tl.arange(0, BLOCK_D)
            first = (seq * num_heads + head).to(tl.int64) * num_splits
            lse = tl.load(partial_lse_ptr + first + splits, mask=split_mask, other=float("-inf"))
            weights = tl.exp2(lse - tl.max(lse, 0))
            if BLOCK_D == HEAD_DIM:
                part_mask = split_mask[:, None]
            else:
                part_mask = split_mask[:, None] & (dims < HEAD_DIM)[None, :]
            parts = tl.load(partial_out_ptr + (first + splits)[:, None] * HEAD_DIM + dims[None, :], mask=part_mask, other=0.0)
            merged = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
            tl.store(
                out_ptr + query_row.to(tl.int64) * out_token_stride + head * out_head_stride + dims,
                merged.to(out_ptr.dtype.element_ty),
                mask=dims < HEAD_DIM,
            )


def num_decode_splits(block_tables: torch.Tensor, block_size: int, config: DecodeConfig) -> int:
    """Partial results kept per (sequence, head): enough for the widest context block_tables can describe, at most
    config.max_splits; a shape, never a device value."""
    return max(1, min(config.max_splits, triton.cdiv(block_tables.shape[1] * block_size, config.split_tokens)))


@functools.cache
def _num_sms(device: torch.device) -> int:
    """The interpreter counts as one small SM: each program costs it time."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    config: DecodeConfig,
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
    num_splits = num_decode_splits(block_tables, block_size, config)
    target_programs = config.programs_per_sm * _num_sms(query.device)
    split_programs = min(num_splits, max(1, triton.cdiv(target_programs, num_seqs * num_kv_heads)))
    block_d = triton.next_power_of_2(head_dim)
    block_n = min(config.block_n, config.split_tokens)
    num_warps = 1 if interpreting() else config.num_warps
    partial_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
    partial_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, split_programs)](
        query,
        kv_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        partial_out,
        partial_lse,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
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
        SPLIT_TOKENS=config.split_tokens,
        MAX_SPLITS=config.max_splits,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=num_warps,
        num_stages=config.num_stages,
    )
    if num_splits == 1:  # every row was finished by the split kernel
        return
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
        BLOCK_S=triton.next_power_of_2(config.max_splits),
        SPLIT_TOKENS=config.split_tokens,
        MAX_SPLITS=config.max_splits,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
