"""LayerNorm with bias, optionally fused with the residual add before it (the layout RMSNorm in norm.py uses: the
blocks carry the residual stream separately and each norm adds the sublayer output into it). The checkpoint names
stay nn.LayerNorm's (weight, bias)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spaceserve.layers.triton_ops import use_fused_ops


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's layer_norm of x, or of the rounded sum x + residual, which is also returned."""
    if residual is not None:
        x = x + residual
        residual = x
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps), residual


class LayerNorm(nn.LayerNorm):
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x) alone, or with a residual (normed(x + residual), x + residual)."""
        if use_fused_ops(x) and (residual is None or residual.dtype == x.dtype):
            from spaceserve.layers.triton_ops.layer_norm import layer_norm_triton

            out, residual_out = layer_norm_triton(x, self.weight, self.bias, self.eps, residual)
        else:
            out, residual_out = layer_norm_reference(x, self.weight, self.bias, self.eps, residual)
        return out if residual is None else (out, residual_out)
