"""SiLU-and-mul, SwiGLU's activation over a fused gate_up projection: silu(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spaceserve.layers.triton_ops import use_fused_ops


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if use_fused_ops(gate_up):
        from spaceserve.layers.triton_ops.silu_mul import silu_and_mul_triton

        return silu_and_mul_triton(gate_up)
    return silu_and_mul_reference(gate_up)


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(gate_up)
