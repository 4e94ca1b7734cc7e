"""Qwen2-VL vision tower: patch embedding, 2-D rotary ViT blocks with per-frame attention, patch merger."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from spaceserve.layers.attention.varlen import VarlenSegments, build_varlen_segments
from spaceserve.models.config import VisionConfig
from spaceserve.models.vision_common import (
    VISION_NORM_EPS,
    PatchEmbed,
    PatchMerger,
    VisionAttention,
    activation,
    check_vision_inputs,
    frame_cu_seqlens,
    load_module_weights,
    merge_ordered_hw_positions,
    vision_rotary_cos_sin,
)


class Qwen2VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen2VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=VISION_NORM_EPS)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=VISION_NORM_EPS)
        self.attn = VisionAttention(config.hidden_size, config.num_heads)
        self.mlp = Qwen2VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: VarlenSegments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class Qwen2VisionTransformer(nn.Module):
    """pixel_values [num_patches, patch_dim] + grid_thw [num_items, 3] -> [sum(t*h*w) / merge**2, out_hidden_size].

    Every frame attends only to itself; item i's output rows follow item i-1's.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(Qwen2VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(
            nn.LayerNorm(config.hidden_size, eps=VISION_NORM_EPS),
            context_dim=config.hidden_size,
            out_dim=config.out_hidden_size,
            merge=config.spatial_merge_size,
        )

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        check_vision_inputs(pixel_values, grid_thw, self.config)
        x = self.patch_embed(pixel_values)
        positions = merge_ordered_hw_positions(grid_thw, self.config.spatial_merge_size)
        cos, sin = vision_rotary_cos_sin(positions, self.config.head_dim, x.device)
        frames = build_varlen_segments(frame_cu_seqlens(grid_thw).tolist(), self.config.head_dim, x.device)
        for block in self.blocks:
            x = block(x, cos, sin, frames)
        return self.merger(x)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Names relative to the tower (``blocks.0.attn.qkv.weight``); see ``vision_weight_name``."""
        return load_module_weights(self, weights)
