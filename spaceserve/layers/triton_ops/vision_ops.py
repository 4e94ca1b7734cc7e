"""The vision blocks' elementwise work as one launch each: the 2-D rotary on q and k (read straight from the qkv
projection's output), and the MLP activation (QuickGELU, or SiLU times the up projection).

Each rounds where its torch reference (spaceserve.models.vision_common) rounds. The vision rotary works in float32
and rounds once (apply_vision_rotary), so the kernel matches it exactly. The activations round every op of their
reference's formula to the input dtype (QuickGELU is x * sigmoid(1.702 x): three rounded ops); exp may differ from
torch's by an ulp in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from spaceserve.layers.triton_ops.common import launch_options, precise_math, round_to

ACTIVATIONS = ("quick_gelu", "silu")  # what the towers' configs use; others take the torch path
_ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
_BLOCK = 1024


@triton.jit
def _rotate_heads(x_ptr, out_ptr, token, token_stride, head_stride, cos, sin,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    first = x_ptr + token * token_stride + heads * head_stride + dims
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    # float32 x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product and the sum rounded in float32
    out = out_ptr + token * (NUM_HEADS * 2 * HALF) + heads * (2 * HALF) + dims
    dtype = out_ptr.dtype.element_ty
    tl.store(out, round_to(x1 * cos + (-x2) * sin, dtype).to(dtype), mask=mask)
    tl.store(out + HALF, round_to(x2 * cos + x1 * sin, dtype).to(dtype), mask=mask)


@triton.jit
def _vision_rotary_kernel(
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
    table_stride,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)[None, :]
    table_mask = dims < HALF
    cos = tl.load(cos_ptr + token * table_stride + dims, mask=table_mask, other=0.0)
    sin = tl.load(sin_ptr + token * table_stride + dims, mask=table_mask, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, token, q_token_stride, q_head_stride, cos, sin, NUM_HEADS, HALF, BLOCK_H, BLOCK_D)
    _rotate_heads(k_ptr, k_out_ptr, token, k_token_stride, k_head_stride, cos, sin, NUM_HEADS, HALF, BLOCK_H, BLOCK_D)


def vision_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [N, H, D] (views into the qkv output are fine: each head's D elements contiguous); cos/sin [N, D]
    float32 whose two halves are equal (vision_rotary_cos_sin). Returns new contiguous rotated q and k."""
    if q.dim() != 3 or q.shape != k.shape or q.dtype != k.dtype:
        raise ValueError(f"vision rotary expects q and k [N, H, D] alike, got {tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    if head_dim % 2 or cos.shape != (num_tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [{num_tokens}, {head_dim}] (even head_dim), got {tuple(cos.shape)}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"vision rotary tables are float32, got {cos.dtype} and {sin.dtype}")
    q = q if q.stride(2) == 1 else q.contiguous()
    k = k if k.stride(2) == 1 else k.contiguous()
    if cos.stride(1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        half = head_dim // 2
        _vision_rotary_kernel[(num_tokens,)](
            q, k, cos, sin, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
            NUM_HEADS=num_heads, HALF=half,
            BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(half),
            num_warps=4, **launch_options(),
        )  # fmt: skip
    return q_out, k_out


@triton.jit
def _activation(x, ACT: tl.constexpr, DTYPE: tl.constexpr, PRECISE: tl.constexpr):
    """float32 x (already of DTYPE's values) -> the activation, rounded like the reference's ops."""
    if ACT == 0:  # quick_gelu: x * sigmoid(1.702 * x), each op rounded
        scaled = round_to(x * 1.702, DTYPE)
        if PRECISE:
            gate = tl.math.div_rn(1.0, 1.0 + libdevice.exp(-scaled))
        else:
            gate = 1.0 / (1.0 + tl.exp(-scaled))
        out = x * round_to(gate, DTYPE)
    else:  # silu, in float32
        if PRECISE:
            out = tl.math.div_rn(x, 1.0 + libdevice.exp(-x))
        else:
            out = x / (1.0 + tl.exp(-x))
    return round_to(out, DTYPE)


@triton.jit
def _activation_kernel(
    x_ptr,
    up_ptr,
    out_ptr,
    x_row_stride,
    up_row_stride,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
    ACT: tl.constexpr,
    HAS_UP: tl.constexpr,
    PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < WIDTH
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = _activation(x, ACT, dtype, PRECISE)
    if HAS_UP:
        up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        out = round_to(out * up, dtype)
    tl.store(out_ptr + row * WIDTH + cols, out.to(dtype), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(1) == 1 else rows.contiguous()


def activation_triton(x: torch.Tensor, name: str, up: torch.Tensor | None = None) -> torch.Tensor:
    """act(x) (times up when given: SwiGLU's act(gate) * up) as a new tensor shaped like x."""
    if name not in _ACT_CODES:
        raise ValueError(f"no fused kernel for activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype):
        raise ValueError(f"up {tuple(up.shape)} {up.dtype} does not match {tuple(x.shape)} {x.dtype}")
    rows = _rows(x)
    up_rows = _rows(up) if up is not None else rows
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    width = x.shape[-1]
    if rows.shape[0] and width:
        block = min(_BLOCK, triton.next_power_of_2(width))
        _activation_kernel[(rows.shape[0], triton.cdiv(width, block))](
            rows, up_rows, out, rows.stride(0), up_rows.stride(0),
            WIDTH=width, BLOCK=block, ACT=_ACT_CODES[name], HAS_UP=up is not None, PRECISE=precise_math(),
            num_warps=4, **launch_options(),
        )  # fmt: skip
    return out
