"""Pieces shared by the Qwen2-VL and Qwen2.5-VL vision towers (inference only).

Patch rows arrive in the order the image processor emits them: per item, frame by frame, and inside a frame
grouped by spatial-merge window (``merge x merge`` neighbouring patches are consecutive rows). Everything here
keeps that order, so the merger can fold each run of ``merge**2`` rows into one language-model token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from spaceserve.core.errors import ConfigError, InvalidInputError
from spaceserve.layers.attention.varlen import VarlenSegments, varlen_attention
from spaceserve.models.config import VisionConfig

# Both towers rotate with theta 10000; no published config overrides it, so VisionConfig does not carry it.
VISION_ROPE_THETA = 10_000.0
VISION_NORM_EPS = 1e-6

# Published Hub checkpoints (and transformers 5.x save_pretrained) name the tower ``visual.``; saves made by
# transformers 4.52-4.57 name it ``model.visual.``.
VISION_CHECKPOINT_PREFIXES: tuple[str, ...] = ("visual.", "model.visual.")

# Derived buffers some older saves include; recomputed here, so accepted and skipped (not reported as loaded).
_DERIVED_WEIGHT_NAMES = frozenset({"rotary_pos_emb.inv_freq"})


def vision_weight_name(checkpoint_name: str) -> str | None:
    """The name relative to the vision tower if ``checkpoint_name`` belongs to it, else None."""
    for prefix in VISION_CHECKPOINT_PREFIXES:
        if checkpoint_name.startswith(prefix):
            return checkpoint_name[len(prefix) :]
    return None


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unsupported vision hidden_act {name!r}; known: {sorted(_ACTIVATIONS)}") from None


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d has kernel == stride over one flattened patch, so it is a plain matmul.

    The weight keeps the Conv3d shape [embed, channels, temporal, patch, patch] so checkpoints load unchanged;
    a patch row is flattened in the same (channels, temporal, patch, patch) order.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)
        return F.linear(pixel_values.to(weight.dtype), weight)


def check_vision_inputs(pixel_values: torch.Tensor, grid_thw: torch.Tensor, config: VisionConfig) -> None:
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise InvalidInputError(f"grid_thw must have shape [num_items, 3], got {tuple(grid_thw.shape)}")
    grids = grid_thw.tolist()
    merge = config.spatial_merge_size
    for t, h, w in grids:
        if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
            raise InvalidInputError(f"grid (t={t}, h={h}, w={w}) must be positive with h, w multiples of {merge}")
    expected = (sum(t * h * w for t, h, w in grids), config.patch_dim)
    if tuple(pixel_values.shape) != expected:
        raise InvalidInputError(f"pixel_values has shape {tuple(pixel_values.shape)}, grid_thw implies {expected}")


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Cumulative boundaries of one attention segment per frame: every item contributes t segments of h*w."""
    frame_lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(frame_lengths.cumsum(0), (1, 0)).to(device="cpu", dtype=torch.int64)


def merge_ordered_hw_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """[num_patches, 2] (row, column) of every patch, in the processor's merge-window order."""
    positions = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # (block_row, row_in_block, block_col, col_in_block) -> blocks outermost, then the patches inside one.
        frame = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)
        positions.append(frame.repeat(t, 1))
    return torch.cat(positions)


def vision_rotary_cos_sin(
    hw_positions: torch.Tensor, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2-D rotary tables, float32 [num_patches, head_dim].

    Each axis rotates head_dim/4 frequency pairs; the angles are laid out [rows | columns] and that half is
    repeated, matching the rotate-half convention.
    """
    axis_dim = head_dim // 2
    inv_freq = 1.0 / (VISION_ROPE_THETA ** (torch.arange(0, axis_dim, 2, dtype=torch.float32, device=device) / axis_dim))
    angles = hw_positions.to(device=device, dtype=torch.float32)[..., None] * inv_freq  # [N, 2, head_dim/4]
    angles = angles.flatten(1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_patches, heads, head_dim]; rotated in float32 and cast back."""
    x32 = x.float()
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: VarlenSegments) -> torch.Tensor:
        num_patches = x.shape[0]
        q, k, v = self.qkv(x).view(num_patches, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_vision_rotary(q, cos, sin), apply_vision_rotary(k, cos, sin)
        return self.proj(varlen_attention(q, k, v, segments).reshape(num_patches, -1))


class PatchMerger(nn.Module):
    """Folds each run of merge**2 patch rows into one language-model token: norm, concat, MLP."""

    def __init__(self, ln_q: nn.Module, context_dim: int, out_dim: int, merge: int) -> None:
        super().__init__()
        self.merged_dim = context_dim * merge * merge
        self.ln_q = ln_q
        # Sequential keeps the checkpoint names mlp.0 / mlp.2.
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(), nn.Linear(self.merged_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.merged_dim))


@torch.no_grad()
def load_module_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Copy named tensors into ``module``'s parameters (cast to each parameter's dtype); returns the names loaded."""
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if name in _DERIVED_WEIGHT_NAMES:
            continue
        param = params.get(name)
        if param is None:
            raise ConfigError(f"unknown vision tower weight {name!r} ({type(module).__name__})")
        if tuple(tensor.shape) != tuple(param.shape):
            raise ConfigError(
                f"vision tower weight {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
            )
        param.copy_(tensor.to(dtype=param.dtype))
        loaded.add(name)
    return loaded
