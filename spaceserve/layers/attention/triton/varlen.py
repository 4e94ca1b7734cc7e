"""Full (non-causal) attention inside variable-length segments of one packed batch, for the vision towers: every
image, frame or window of a batch in one launch.

The host lists (segment, first query row) work items once per tower forward (build_work_list); the head
dimension is padded to a power of two with masked loads (the towers use 80).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spaceserve.layers.attention.triton.common import LOG2E, AttentionTiling, dot_precision


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
    BLOCK_D: tl.constexpr,
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
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(
        query_ptr + (seg_start + offs_m).to(tl.int64)[:, None] * query_token_stride + head * query_head_stride + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end = (seg_len // BLOCK_N) * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        tokens = (seg_start + start + tl.arange(0, BLOCK_N)).to(tl.int64)
        k = tl.load(
            key_ptr + tokens[:, None] * key_token_stride + head * key_head_stride + dims[None, :],
            mask=dim_mask[None, :],
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(
            value_ptr + tokens[:, None] * value_token_stride + head * value_head_stride + dims[None, :],
            mask=dim_mask[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    if full_end < seg_len:
        offs_n = full_end + tl.arange(0, BLOCK_N)
        token_mask = offs_n < seg_len
        tokens = (seg_start + offs_n).to(tl.int64)
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        k = tl.load(key_ptr + tokens[:, None] * key_token_stride + head * key_head_stride + dims[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(
            value_ptr + tokens[:, None] * value_token_stride + head * value_head_stride + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    tl.store(
        out_ptr + (seg_start + offs_m).to(tl.int64)[:, None] * out_token_stride + head * out_head_stride + dims[None, :],
        (acc / l[:, None]).to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )


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
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=tiling.block_m,
        BLOCK_N=tiling.block_n,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
    return out
