"""Qwen2.5-VL vision tower: RMSNorm + SwiGLU ViT with window attention, full attention in a few blocks.

Window attention works on a reordered patch sequence: merge units (merge x merge patches) are regrouped so
each window of ``window_size`` pixels is contiguous; the merger output is put back in the original order. The
order and the window segments come from the batch's VisionLayout (vision_layout.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spaceserve.core.errors import ConfigError
from spaceserve.layers.linear import ColumnParallelLinear, RowParallelLinear
from spaceserve.layers.norm import RMSNorm
from spaceserve.models.config import VisionConfig
from spaceserve.models.vision_common import (
    PatchEmbed,
    PatchMerger,
    PreNormVisionBlock,
    VisionAttention,
    VisionTower,
    activation,
    apply_activation,
    vision_rotary_cos_sin,
)
from spaceserve.models.vision_inputs import VisionInputs
from spaceserve.models.vision_layout import build_vision_layout


class Qwen2_5_VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(dim, hidden_dim, bias=True)
        self.up_proj = ColumnParallelLinear(dim, hidden_dim, bias=True)
        self.down_proj = RowParallelLinear(hidden_dim, dim, bias=True)
        activation(hidden_act)  # an unknown name fails here, at construction
        self.hidden_act = hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(apply_activation(self.gate_proj(x), self.hidden_act, up=self.up_proj(x)))


class Qwen2_5_VisionBlock(PreNormVisionBlock):
    """RMSNorm and a SwiGLU MLP."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(
            RMSNorm(config.hidden_size),
            RMSNorm(config.hidden_size),
            VisionAttention(config.hidden_size, config.num_heads),
            Qwen2_5_VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act),
        )


def window_side(config: VisionConfig) -> int:
    side = config.window_size // (config.spatial_merge_size * config.patch_size)
    if side < 1:
        raise ConfigError(f"window_size {config.window_size} is smaller than one merge unit")
    return side


def window_layout(grid_thw: torch.Tensor, config: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(window_order, cu_window_seqlens) for the whole batch of items.

    window_order[j] is the original index of the merge unit placed j-th: per item and frame, windows of
    ``side x side`` merge units in row-major window order, units row-major inside a window (edge windows
    are clipped). cu_window_seqlens counts patches (merge**2 per unit), one segment per non-empty window.
    """
    layout = build_vision_layout(grid_thw.numpy(), config.spatial_merge_size, window_side(config))
    lengths = torch.from_numpy(layout.window_lengths)
    return torch.from_numpy(layout.window_order).long(), F.pad(lengths.cumsum(0), (1, 0))


class Qwen2_5_VisionTransformer(VisionTower):
    """pixel_values [num_patches, patch_dim] + grid_thw [num_items, 3] -> [sum(t*h*w) / merge**2, out_hidden_size]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self._window_side = window_side(config)
        self.full_attention_blocks = frozenset(config.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(Qwen2_5_VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(
            RMSNorm(config.hidden_size),
            context_dim=config.hidden_size,
            out_dim=config.out_hidden_size,
            merge=config.spatial_merge_size,
        )

    @property
    def window_side(self) -> int:
        return self._window_side

    def forward_prepared(self, pixel_values: torch.Tensor, inputs: VisionInputs) -> torch.Tensor:
        unit = self.config.spatial_merge_size**2
        embedded = self.patch_embed(pixel_values)
        # to window order (the positions already are); frames stay contiguous there: windows never straddle frames
        hidden = embedded.view(-1, unit, embedded.shape[-1]).index_select(0, inputs.window_order).view(embedded.shape)
        cos, sin = vision_rotary_cos_sin(inputs.positions, self.config.head_dim)
        residual = None
        for index, block in enumerate(self.blocks):
            segments = inputs.frames if index in self.full_attention_blocks else inputs.windows
            hidden, residual = block(hidden, residual, cos, sin, segments)
        return self.merger(hidden, residual).index_select(0, inputs.window_inverse)
