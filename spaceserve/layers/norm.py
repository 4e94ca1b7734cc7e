"""RMSNorm as Qwen2 defines it, optionally fused with the residual add before it (vLLM's layout: the decoder
layers carry the residual stream separately, and each norm adds the sublayer output into it)."""

from __future__ import annotations

import torch
from torch import nn

from spaceserve.layers.triton_ops import use_fused_ops


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' Qwen2RMSNorm numerics: the row normalised in float32, rounded back to the input dtype, then
    scaled by the weight. With a residual, the rounded sum x + residual is what gets normalised and returned."""
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(dtype), residual


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x) alone, or with a residual (normed(x + residual), x + residual)."""
        if use_fused_ops(x) and (residual is None or residual.dtype == x.dtype):
            from spaceserve.layers.triton_ops.rms_norm import rms_norm_triton

            out, residual_out = rms_norm_triton(x, self.weight, self.eps, residual)
        else:
            out, residual_out = rms_norm_reference(x, self.weight, self.eps, residual)
        return out if residual is None else (out, residual_out)
