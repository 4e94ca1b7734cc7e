"""Full (non-causal) attention inside variable-length segments of one packed batch, for the vision towers: every
image, frame or window of a batch in one launch.

The host lists (segment, first query row) work items once per tower forward (build_work_list). The head
dimension is covered by a power-of-two part and a small remainder part (split_head_dim: the towers' 80 is
64 + 16), each with its own dots, so no dot runs over padding columns; only the last key tile of a segment is
masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spaceserve.layers.attention.triton.common import LOG2E, AttentionTiling, dot_precision, split_head_dim


@triton.jit
def _load_tile(ptrs, row_mask, col_mask, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a 2-D tile with only the masks that can be false, so unmasked loads stay 16 bytes wide."""
    if MASK_ROWS:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    else:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=col_mask[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _attend_key_tile(
    q0,
    q1,
    acc0,
    acc1,
    m,
    l,
    key_rows,  # [BLOCK_N, 1] pointers to each key's row of this head
    value_rows,
    key_mask,  # [BLOCK_N]; used only when MASKED
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D_MAIN: tl.constexpr,
    D_REST: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over a tile of keys; q1/acc1 (the remainder columns) are ignored when D_REST is 0."""
    d0 = tl.arange(0, D_MAIN)
    k0 = _load_tile(key_rows + d0[None, :], key_mask, d0, MASKED, False)
    scores = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
    if D_REST > 0:
        d1 = D_MAIN + tl.arange(0, D_REST)
        rest_mask = d1 < HEAD_DIM
        k1 = _load_tile(key_rows + d1[None, :], key_mask, rest_mask, MASKED, D_MAIN + D_REST != HEAD_DIM)
        scores = tl.dot(q1, tl.trans(k1), scores, input_precision=DOT_PRECISION)
    if MASKED:
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1) * qk_scale)
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores * qk_scale - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    v0 = _load_tile(value_rows + d0[None, :], key_mask, d0, MASKED, False)
    p = p.to(v0.dtype)
    acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
    if D_REST > 0:
        v1 = _load_tile(value_rows + d1[None, :], key_mask, rest_mask, MASKED, D_MAIN + D_REST != HEAD_DIM)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
    return acc0, acc1, m_new, l


@triton.jit
def _varlen_attention_kernel(
    out_ptr,
    query_ptr,
    key_ptr,
    value_ptr,
    cu_seqlens_ptr,
    work_ptr,
    out_token_stride,
    out_head_stride,
    query_token_stride,
    query_head_stride,
    key_token_stride,
    key_head_stride,
    value_token_stride,
    value_head_stride,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D_MAIN: tl.constexpr,
    D_REST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0)
    item = tl.program_id(1)
    segment = tl.load(work_ptr + 2 * item)
    block_start = tl.load(work_ptr + 2 * item + 1)
    seg_start = tl.load(cu_seqlens_ptr + segment)
    seg_len = tl.load(cu_seqlens_ptr + segment + 1) - seg_start

    offs_m = block_start + tl.arange(0, BLOCK_M)
    row_mask = offs_m < seg_len
    rows = (seg_start + offs_m).to(tl.int64)[:, None]
    query_rows = query_ptr + rows * query_token_stride + head * query_head_stride
    d0 = tl.arange(0, D_MAIN)
    q0 = tl.load(query_rows + d0[None, :], mask=row_mask[:, None], other=0.0)
    acc0 = tl.zeros([BLOCK_M, D_MAIN], tl.float32)
    if D_REST > 0:
        d1 = D_MAIN + tl.arange(0, D_REST)
        rest_mask = d1 < HEAD_DIM
        q1 = _load_tile(query_rows + d1[None, :], row_mask, rest_mask, True, D_MAIN + D_REST != HEAD_DIM)
        acc1 = tl.zeros([BLOCK_M, D_REST], tl.float32)
    else:  # placeholders the tile step ignores
        q1 = q0
        acc1 = acc0
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    key_base = key_ptr + head * key_head_stride
    value_base = value_ptr + head * value_head_stride
    full_end = (seg_len // BLOCK_N) * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        tokens = (seg_start + start + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None]
        acc0, acc1, m, l = _attend_key_tile(
            q0, q1, acc0, acc1, m, l,
            key_base + tokens * key_token_stride, value_base + tokens * value_token_stride, tokens, qk_scale,
            HEAD_DIM, D_MAIN, D_REST, False, DOT_PRECISION,
        )  # fmt: skip
    if full_end < seg_len:
        offs_n = full_end + tl.arange(0, BLOCK_N)
        tokens = (seg_start + offs_n).to(tl.int64)[:, None]
        acc0, acc1, m, l = _attend_key_tile(
            q0, q1, acc0, acc1, m, l,
            key_base + tokens * key_token_stride, value_base + tokens * value_token_stride, offs_n < seg_len, qk_scale,
            HEAD_DIM, D_MAIN, D_REST, True, DOT_PRECISION,
        )  # fmt: skip
    out_rows = out_ptr + rows * out_token_stride + head * out_head_stride
    tl.store(out_rows + d0[None, :], (acc0 / l[:, None]).to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    if D_REST > 0:
        out1 = (acc1 / l[:, None]).to(out_ptr.dtype.element_ty)
        if D_MAIN + D_REST != HEAD_DIM:
            tl.store(out_rows + d1[None, :], out1, mask=row_mask[:, None] & rest_mask[None, :])
        else:
            tl.store(out_rows + d1[None, :], out1, mask=row_mask[:, None])


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    work: torch.Tensor,
    scale: float,
    tiling: AttentionTiling,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """query/key/value [total, H, D] (last dim contiguous); cu_seqlens [S + 1] int32 on the device; work from
    build_work_list(lengths, tiling.block_m, 1, device) -> out [total, H, D]."""
    for x in (query, key, value):
        if x.stride(2) != 1:
            raise ValueError("varlen attention needs the head dimension contiguous")
    out = torch.empty_like(query) if out is None else out
    if work.shape[0] == 0:
        return out
    num_heads, head_dim = query.shape[1], query.shape[2]
    d_main, d_rest = split_head_dim(head_dim)
    _varlen_attention_kernel[(num_heads, work.shape[0])](
        out,
        query,
        key,
        value,
        cu_seqlens,
        work,
        out.stride(0),
        out.stride(1),
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        scale * LOG2E,
        HEAD_DIM=head_dim,
        D_MAIN=d_main,
        D_REST=d_rest,
        BLOCK_M=tiling.block_m,
        BLOCK_N=tiling.block_n,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
    return out
