"""SiLU-and-mul (SwiGLU's activation): silu(gate) * up from the fused gate_up projection's output [..., 2I].

Rounds like the torch reference F.silu(gate) * up: silu in float32 as x / (1 + exp(-x)) rounded to the input
dtype, then the product rounded."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from spaceserve.layers.triton_ops.common import launch_options, precise_math, round_to

_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,
    out_ptr,
    row_stride,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < WIDTH
    gate = tl.load(gate_up_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * row_stride + WIDTH + cols, mask=mask, other=0.0).to(tl.float32)
    if PRECISE:
        silu = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate))
    else:
        silu = gate / (1.0 + tl.exp(-gate))
    dtype = out_ptr.dtype.element_ty
    silu = round_to(silu, dtype)
    tl.store(out_ptr + row * WIDTH + cols, round_to(silu * up, dtype).to(dtype), mask=mask)


def silu_and_mul_triton(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [..., 2I] -> silu(gate_up[..., :I]) * gate_up[..., I:] [..., I], written into out (contiguous)
    when given, else into a new tensor."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension (gate and up halves), got {gate_up.shape[-1]}")
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    shape = (*gate_up.shape[:-1], width)
    if out is None:
        out = torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != shape or out.dtype != gate_up.dtype or out.device != gate_up.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {gate_up.dtype} tensor of shape {shape} on {gate_up.device}")
    if rows.shape[0] == 0 or width == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(width))
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(width, block))](
        rows,
        out,
        rows.stride(0),
        WIDTH=width,
        BLOCK=block,
        PRECISE=precise_math(),
        num_warps=4,
        **launch_options(),
    )
    return out
