"""Qwen2.5-VL vision tower: RMSNorm + SwiGLU ViT with window attention, full attention in a few blocks.

Window attention works on a reordered patch sequence: merge units (merge x merge patches) are regrouped so
each window of ``window_size`` pixels is contiguous; the merger output is put back in the original order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from spaceserve.core.errors import ConfigError
from spaceserve.layers.attention.varlen import VarlenSegments, build_varlen_segments
from spaceserve.layers.norm import RMSNorm
from spaceserve.models.config import VisionConfig
from spaceserve.models.vision_common import (
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


class Qwen2_5_VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=True)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=True)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=True)
        self.act = activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen2_5_VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size)
        self.norm2 = RMSNorm(config.hidden_size)
        self.attn = VisionAttention(config.hidden_size, config.num_heads)
        self.mlp = Qwen2_5_VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: VarlenSegments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


def window_layout(grid_thw: torch.Tensor, config: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(window_order, cu_window_seqlens) for the whole batch of items.

    window_order[j] is the original index of the merge unit placed j-th: per item and frame, windows of
    ``side x side`` merge units in row-major window order, units row-major inside a window (edge windows
    are clipped). cu_window_seqlens counts patches (merge**2 per unit), one segment per non-empty window.
    """
    merge = config.spatial_merge_size
    side = config.window_size // (merge * config.patch_size)
    if side < 1:
        raise ConfigError(f"window_size {config.window_size} is smaller than one merge unit")
    order: list[torch.Tensor] = []
    window_units: list[torch.Tensor] = []
    offset = 0
    for t, h, w in grid_thw.tolist():
        units_h, units_w = h // merge, w // merge
        windows_h, windows_w = -(-units_h // side), -(-units_w // side)
        units = torch.arange(t * units_h * units_w).view(t, units_h, units_w)
        padded = F.pad(units, (0, windows_w * side - units_w, 0, windows_h * side - units_h), value=-1)
        windows = padded.view(t, windows_h, side, windows_w, side).permute(0, 1, 3, 2, 4).reshape(-1, side * side)
        valid = windows >= 0
        order.append(windows[valid] + offset)
        window_units.append(valid.sum(1))  # never zero: padding is less than one window per axis
        offset += t * units_h * units_w
    window_patches = torch.cat(window_units) * merge * merge
    return torch.cat(order), F.pad(window_patches.cumsum(0), (1, 0))


class Qwen2_5_VisionTransformer(nn.Module):
    """pixel_values [num_patches, patch_dim] + grid_thw [num_items, 3] -> [sum(t*h*w) / merge**2, out_hidden_size]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.full_attention_blocks = frozenset(config.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(Qwen2_5_VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(
            RMSNorm(config.hidden_size),
            context_dim=config.hidden_size,
            out_dim=config.out_hidden_size,
            merge=config.spatial_merge_size,
        )

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        check_vision_inputs(pixel_values, grid_thw, self.config)
        unit = self.config.spatial_merge_size**2
        window_order, cu_window_seqlens = window_layout(grid_thw, self.config)
        window_order = window_order.to(pixel_values.device)

        def to_window_order(rows: torch.Tensor) -> torch.Tensor:
            return rows.view(-1, unit, rows.shape[-1])[window_order].view(rows.shape)

        x = to_window_order(self.patch_embed(pixel_values))
        positions = merge_ordered_hw_positions(grid_thw, self.config.spatial_merge_size)
        cos, sin = (to_window_order(table) for table in vision_rotary_cos_sin(positions, self.config.head_dim, x.device))
        # Frames stay contiguous after the reordering (windows never straddle frames), so full attention keeps
        # the per-frame segments.
        head_dim = self.config.head_dim
        frames = build_varlen_segments(frame_cu_seqlens(grid_thw).tolist(), head_dim, x.device)
        windows = build_varlen_segments(cu_window_seqlens.tolist(), head_dim, x.device)
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if index in self.full_attention_blocks else windows)
        merged = self.merger(x)
        original_order = torch.empty_like(window_order)
        original_order[window_order] = torch.arange(window_order.numel(), device=window_order.device)
        return merged[original_order]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Names relative to the tower (``blocks.0.mlp.gate_proj.weight``); see ``vision_weight_name``."""
        return load_module_weights(self, weights)
