"""Rotary embedding of q and k in one launch: one program per token rotates all its query and key heads.

cos/sin are the per-token tables [num_tokens, head_dim] that MRotaryEmbedding.cos_sin builds once per forward
(the M-RoPE sections already picked per token); their two halves are equal, so only the first is read. Rounds
like the torch reference x * cos + rotate_half(x) * sin in x's dtype: each product, then the sum."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spaceserve.layers.triton_ops.common import launch_options, round_to


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    token,
    token_stride,
    head_stride,
    cos,
    sin,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    first = x_ptr + token * token_stride + heads * head_stride + dims
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # rotate_half(x) = (-x2, x1); the reference rounds each product to dtype, then the sum
    out1 = round_to(round_to(x1 * cos, dtype) + round_to(-x2 * sin, dtype), dtype)
    out2 = round_to(round_to(x2 * cos, dtype) + round_to(x1 * sin, dtype), dtype)
    out = out_ptr + token * (NUM_HEADS * 2 * HALF) + heads * (2 * HALF) + dims
    tl.store(out, out1.to(dtype), mask=mask)
    tl.store(out + HALF, out2.to(dtype), mask=mask)


@triton.jit
def _rotary_qk_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    cos_token_stride,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)[None, :]
    table_mask = dims < HALF
    cos = tl.load(cos_ptr + token * cos_token_stride + dims, mask=table_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * cos_token_stride + dims, mask=table_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, token, q_token_stride, q_head_stride, cos, sin, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_D)
    _rotate_heads(k_ptr, k_out_ptr, token, k_token_stride, k_head_stride, cos, sin, NUM_K_HEADS, HALF, BLOCK_KH, BLOCK_D)


def _output(given: torch.Tensor | None, like: torch.Tensor, name: str) -> torch.Tensor:
    if given is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if given.shape != like.shape or given.dtype != like.dtype or given.device != like.device or not given.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {like.dtype} tensor of shape {tuple(like.shape)} on {like.device}")
    return given


def rotary_qk_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, Hq, D], k [N, Hk, D] (views into a wider qkv row are fine: each head's D elements contiguous);
    cos/sin [N, D] in q's dtype. Returns the rotated q and k: q_out/k_out when given (contiguous, q's shape and
    dtype), else new tensors. q and k are only read."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rotary expects q [N, Hq, D] and k [N, Hk, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    if head_dim % 2 or cos.shape != (num_tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [{num_tokens}, {head_dim}] (even head_dim), got {tuple(cos.shape)}")
    if q.dtype != k.dtype or cos.dtype != q.dtype or sin.dtype != q.dtype:
        raise ValueError(f"q, k, cos and sin must share a dtype, got {q.dtype}, {k.dtype}, {cos.dtype}, {sin.dtype}")
    if q.stride(2) != 1:
        q = q.contiguous()
    if k.stride(2) != 1:
        k = k.contiguous()
    if cos.stride(1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = _output(q_out, q, "q_out")
    k_out = _output(k_out, k, "k_out")
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_qk_kernel[(num_tokens,)](
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=k.shape[1],
        HALF=half,
        BLOCK_QH=triton.next_power_of_2(num_q_heads),
        BLOCK_KH=triton.next_power_of_2(k.shape[1]),
        BLOCK_D=triton.next_power_of_2(half),
        num_warps=4,
        **launch_options(),
    )
    return q_out, k_out
