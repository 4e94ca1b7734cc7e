"""LayerNorm (with bias), optionally after a residual add, in one pass over each row (one program per row): the
Qwen2-VL vision blocks' norms, which fold each sublayer's residual add into the next norm.

Rounds like the torch reference (spaceserve.layers.layer_norm): the residual sum is rounded to the input dtype and
that rounded row is normalised; mean, variance and the affine map are float32, rounded once to the output dtype.
Only the order of the float32 sums differs from torch's kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from spaceserve.layers.triton_ops.common import launch_options, precise_math, round_to, row_block


@triton.jit
def _layer_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    residual_out_ptr,
    x_row_stride,
    residual_row_stride,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = round_to(x + residual, residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * HIDDEN + cols, x.to(residual_out_ptr.dtype.element_ty), mask=mask)
    mean = tl.sum(x, axis=0) * (1.0 / HIDDEN)
    centred = tl.where(mask, x - mean, 0.0)
    variance = tl.sum(centred * centred, axis=0) * (1.0 / HIDDEN)
    if PRECISE:
        inv_std = libdevice.rsqrt(variance + eps)
    else:
        inv_std = tl.math.rsqrt(variance + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    normed = centred * inv_std * weight + bias
    tl.store(out_ptr + row * HIDDEN + cols, round_to(normed, out_dtype).to(out_dtype), mask=mask)


def _rows(x: torch.Tensor, hidden: int) -> torch.Tensor:
    rows = x.reshape(-1, hidden)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(layer_norm(x [+ residual]), x + residual or None), shaped like x, in x's dtype; x and residual are only
    read. weight and bias [hidden] may be of another dtype (they are read in float32)."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or bias.shape != (hidden,):
        raise ValueError(f"LayerNorm weight/bias have shapes {tuple(weight.shape)}/{tuple(bias.shape)}, rows have {hidden}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} does not match the input {tuple(x.shape)} {x.dtype}"
        )
    rows = _rows(x, hidden)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_rows, residual_out = rows, out  # unused by the kernel without a residual
    if residual is not None:
        residual_rows = _rows(residual, hidden)
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = row_block(hidden)
        _layer_norm_kernel[(rows.shape[0],)](
            rows,
            residual_rows,
            weight,
            bias,
            out,
            residual_out,
            rows.stride(0),
            residual_rows.stride(0),
            eps,
            HIDDEN=hidden,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            PRECISE=precise_math(),
            num_warps=min(max(block // 256, 1), 16),
            **launch_options(),
        )
    return out, (residual_out if residual is not None else None)
