"""Qwen2-VL vision tower: patch embedding, 2-D rotary ViT blocks with per-frame attention, patch merger."""

from __future__ import annotations

import torch
from torch import nn

from spaceserve.layers.layer_norm import LayerNorm
from spaceserve.layers.linear import ColumnParallelLinear, RowParallelLinear
from spaceserve.models.config import VisionConfig
from spaceserve.models.vision_common import (
    VISION_NORM_EPS,
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


class Qwen2VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(dim, hidden_dim)
        self.fc2 = RowParallelLinear(hidden_dim, dim)
        activation(hidden_act)  # an unknown name fails here, at construction
        self.hidden_act = hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(apply_activation(self.fc1(x), self.hidden_act))


class Qwen2VisionBlock(PreNormVisionBlock):
    """LayerNorm and a two-layer MLP."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(
            LayerNorm(config.hidden_size, eps=VISION_NORM_EPS),
            LayerNorm(config.hidden_size, eps=VISION_NORM_EPS),
            VisionAttention(config.hidden_size, config.num_heads),
            Qwen2VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act),
        )


class Qwen2VisionTransformer(VisionTower):
    """pixel_values [num_patches, patch_dim] + grid_thw [num_items, 3] -> [sum(t*h*w) / merge**2, out_hidden_size].

    Every frame attends only to itself; item i's output rows follow item i-1's.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(Qwen2VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(
            LayerNorm(config.hidden_size, eps=VISION_NORM_EPS),
            context_dim=config.hidden_size,
            out_dim=config.out_hidden_size,
            merge=config.spatial_merge_size,
        )

    def forward_prepared(self, pixel_values: torch.Tensor, inputs: VisionInputs) -> torch.Tensor:
        hidden = self.patch_embed(pixel_values)
        cos, sin = vision_rotary_cos_sin(inputs.positions, self.config.head_dim)
        residual = None
        for block in self.blocks:
            hidden, residual = block(hidden, residual, cos, sin, inputs.frames)
        return self.merger(hidden, residual)
