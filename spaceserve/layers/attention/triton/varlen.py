"""Full (non-causal) attention inside variable-length segments of one packed batch, for the vision towers: every
image, frame or window of a batch in one launch.

The host lists (segment, first query row) work items; the kernel reads how many are valid from `work_count` on the
device and its grid has a fixed number of programs along the items (`num_programs`), each striding over the items.
So one launch configuration serves any batch that fits the buffers, which is what a CUDA graph needs: programs
past the real work exit at once, and a batch with more items than programs loops.

The head dimension is covered by one or two power-of-two parts (`head_dim_parts`): "padded" rounds it up to one
part with masked columns (80 -> 128: 37.5% of the dot work on zeros); "split" uses the largest power of two below
it plus a part of 16 for the rest (80 -> 64 + 16: no wasted dot work), "split32" a rest part of 32 (80 -> 64 +
32). Every load is masked by its row bounds (and its column bounds where a part runs past the head), so no
address outside a segment's rows is formed for a load, whatever the tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spaceserve.layers.attention.triton import common
from spaceserve.layers.attention.triton.common import LOG2E, AttentionTiling, dot_precision, head_dim_parts


@triton.jit
def _load_rows(base, row_offsets, row_mask, cols, HEAD_DIM: tl.constexpr, MASK_COLS: tl.constexpr):
    """A [rows, cols] tile; row_offsets are element offsets (int64) of each row from base."""
    ptrs = base + row_offsets[:, None] + cols[None, :]
    if MASK_COLS:
        return tl.load(ptrs, mask=row_mask[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    return tl.load(ptrs, mask=row_mask[:, None], other=0.0)


@triton.jit
def _attend_keys(
    q0,
    q1,
    acc0,
    acc1,
    m,
    l,
    key_base,
    value_base,
    key_offsets,
    value_offsets,
    key_mask,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D_MAIN: tl.constexpr,
    D_REST: tl.constexpr,
    LAST_TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over a tile of keys. q1/acc1 (the rest part) are ignored when D_REST is 0; only the
    last tile of a segment can hold keys past its end, so only there are scores masked."""
    d0 = tl.arange(0, D_MAIN)
    k0 = _load_rows(key_base, key_offsets, key_mask, d0, HEAD_DIM, D_MAIN > HEAD_DIM)
    scores = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
    if D_REST > 0:
        d1 = D_MAIN + tl.arange(0, D_REST)
        k1 = _load_rows(key_base, key_offsets, key_mask, d1, HEAD_DIM, D_MAIN + D_REST > HEAD_DIM)
        scores = tl.dot(q1, tl.trans(k1), scores, input_precision=DOT_PRECISION)
    if LAST_TILE:
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1) * qk_scale)
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores * qk_scale - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    v0 = _load_rows(value_base, value_offsets, key_mask, d0, HEAD_DIM, D_MAIN > HEAD_DIM)
    p = p.to(v0.dtype)
    acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
    if D_REST > 0:
        v1 = _load_rows(value_base, value_offsets, key_mask, d1, HEAD_DIM, D_MAIN + D_REST > HEAD_DIM)
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
    work_count_ptr,
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
    head = tl.program_id(1)
    num_items = tl.load(work_count_ptr)
    q_base = query_ptr + head * query_head_stride
    key_base = key_ptr + head * key_head_stride
    value_base = value_ptr + head * value_head_stride
    out_base = out_ptr + head * out_head_stride
    d0 = tl.arange(0, D_MAIN)
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        segment = tl.load(work_ptr + 2 * item)
        block_start = tl.load(work_ptr + 2 * item + 1)
        seg_start = tl.load(cu_seqlens_ptr + segment)
        seg_len = tl.load(cu_seqlens_ptr + segment + 1) - seg_start

        offs_m = block_start + tl.arange(0, BLOCK_M)
        row_mask = offs_m < seg_len
        rows = (seg_start + offs_m).to(tl.int64)
        q0 = _load_rows(q_base, rows * query_token_stride, row_mask, d0, HEAD_DIM, D_MAIN > HEAD_DIM)
        acc0 = tl.zeros([BLOCK_M, D_MAIN], tl.float32)
        if D_REST > 0:
            d1 = D_MAIN + tl.arange(0, D_REST)
            q1 = _load_rows(q_base, rows * query_token_stride, row_mask, d1, HEAD_DIM, D_MAIN + D_REST > HEAD_DIM)
            acc1 = tl.zeros([BLOCK_M, D_REST], tl.float32)
        else:  # placeholders the key step ignores
            q1 = q0
            acc1 = acc0
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        full_end = (seg_len // BLOCK_N) * BLOCK_N
        for start in range(0, full_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            tokens = (seg_start + offs_n).to(tl.int64)
            acc0, acc1, m, l = _attend_keys(
                q0, q1, acc0, acc1, m, l, key_base, value_base,
                tokens * key_token_stride, tokens * value_token_stride, offs_n < seg_len, qk_scale,
                HEAD_DIM, D_MAIN, D_REST, False, DOT_PRECISION,
            )  # fmt: skip
        if full_end < seg_len:
            offs_n = full_end + tl.arange(0, BLOCK_N)
            tokens = (seg_start + offs_n).to(tl.int64)
            acc0, acc1, m, l = _attend_keys(
                q0, q1, acc0, acc1, m, l, key_base, value_base,
                tokens * key_token_stride, tokens * value_token_stride, offs_n < seg_len, qk_scale,
                HEAD_DIM, D_MAIN, D_REST, True, DOT_PRECISION,
            )  # fmt: skip
        out_rows = out_base + (rows * out_token_stride)[:, None]
        out_dtype = out_ptr.dtype.element_ty
        if D_MAIN > HEAD_DIM:
            tl.store(out_rows + d0[None, :], (acc0 / l[:, None]).to(out_dtype), mask=row_mask[:, None] & (d0 < HEAD_DIM)[None, :])
        else:
            tl.store(out_rows + d0[None, :], (acc0 / l[:, None]).to(out_dtype), mask=row_mask[:, None])
        if D_REST > 0:
            out1 = (acc1 / l[:, None]).to(out_dtype)
            if D_MAIN + D_REST > HEAD_DIM:
                tl.store(out_rows + d1[None, :], out1, mask=row_mask[:, None] & (d1 < HEAD_DIM)[None, :])
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
    *,
    work_count: torch.Tensor | None = None,
    num_programs: int | None = None,
    head_split: str | None = None,
) -> torch.Tensor:
    """query/key/value [total, H, D] (last dim contiguous); cu_seqlens [S + 1] int32 on the device; work [W, 2]
    int32 (segment, first row) items made for tiling.block_m (build_work_list) -> out [total, H, D].

    work_count: a [1] int32 device tensor saying how many rows of `work` are valid (default: all of them);
    num_programs: programs along the work items (default: one per row of `work`); head_split: "padded", "split"
    or "split32" (default common.VARLEN_HEAD_SPLIT, read per call). Rows of `out` outside every listed item are
    left untouched."""
    for x in (query, key, value):
        if x.stride(2) != 1:
            raise ValueError("varlen attention needs the head dimension contiguous")
    if work.dim() != 2 or work.shape[1] != 2 or work.dtype != torch.int32:
        raise ValueError(f"work must be an int32 [items, 2] tensor, got {work.dtype} {tuple(work.shape)}")
    out = torch.empty_like(query) if out is None else out
    if out.shape != query.shape or out.stride(2) != 1:
        raise ValueError(f"out must have the query's shape {tuple(query.shape)} with the head dimension contiguous")
    num_programs = work.shape[0] if num_programs is None else num_programs
    if num_programs == 0:
        return out
    if work_count is None:
        work_count = torch.full((1,), work.shape[0], dtype=torch.int32, device=work.device)
    num_heads, head_dim = query.shape[1], query.shape[2]
    d_main, d_rest = head_dim_parts(head_dim, head_split or common.VARLEN_HEAD_SPLIT)
    _varlen_attention_kernel[(num_programs, num_heads)](
        out,
        query,
        key,
        value,
        cu_seqlens,
        work,
        work_count,
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
