"""RMSNorm, optionally after a residual add, in one pass over each row (one program per row).

Rounds like the torch reference (spaceserve.layers.norm): the residual sum is rounded to the input dtype before
it is normalised, the normalised row is rounded to the input dtype before the weight multiplies it, and the
product is rounded to the output dtype. Everything between is float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from spaceserve.layers.triton_ops.common import launch_options, precise_math, round_to, row_block


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
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
    variance = tl.sum(x * x, axis=0) * (1.0 / HIDDEN)
    if PRECISE:
        inv_rms = libdevice.rsqrt(variance + eps)
    else:
        inv_rms = tl.math.rsqrt(variance + eps)
    normed = round_to(x * inv_rms, x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * HIDDEN + cols, round_to(weight * normed, out_dtype).to(out_dtype), mask=mask)


def _output(
    given: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype, device: torch.device, name: str
) -> torch.Tensor:
    if given is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if given.shape != shape or given.dtype != dtype or given.device != device or not given.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, "
            f"got {given.dtype} {tuple(given.shape)} on {given.device}"
        )
    return given


def _rows(x: torch.Tensor, hidden: int) -> torch.Tensor:
    rows = x.reshape(-1, hidden)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight * normalise(x [+ residual]), x + residual or None), shaped like x, written into out/residual_out
    (contiguous) when given, else into new tensors. x and residual are only read.

    The output dtype is torch's promotion of weight and x, as in the reference; residual must have x's dtype."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"RMSNorm weight has shape {tuple(weight.shape)}, the input rows have {hidden} elements")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} does not match the input {tuple(x.shape)} {x.dtype}"
        )
    rows = _rows(x, hidden)
    num_rows = rows.shape[0]
    out = _output(out, x.shape, torch.promote_types(weight.dtype, x.dtype), x.device, "out")
    if residual is None:
        residual_rows, residual_out = rows, out  # unused by the kernel
    else:
        residual_rows = _rows(residual, hidden)
        residual_out = _output(residual_out, x.shape, x.dtype, x.device, "residual_out")
    if num_rows == 0:
        return out, (residual_out if residual is not None else None)
    block = row_block(hidden)
    _rms_norm_kernel[(num_rows,)](
        rows,
        residual_rows,
        weight,
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
