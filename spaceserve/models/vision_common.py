"""Pieces shared by the Qwen2-VL and Qwen2.5-VL vision towers (inference only).

Patch rows arrive in the order the image processor emits them: per item, frame by frame, and inside a frame
grouped by spatial-merge window (``merge x merge`` neighbouring patches are consecutive rows). Everything here
keeps that order, so the merger can fold each run of ``merge**2`` rows into one language-model token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spaceserve.core.errors import ConfigError, InvalidInputError
from spaceserve.layers.attention.varlen import VarlenSegments, varlen_attention
from spaceserve.layers.triton_ops import use_fused_ops
from spaceserve.layers.linear import QKVParallelLinear, RowParallelLinear, load_parameter, shard_layout
from spaceserve.models.config import VisionConfig
from spaceserve.models.vision_inputs import VisionInputs, prepare_inputs
from spaceserve.models.vision_layout import VisionLayout, build_vision_layout

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


def check_vision_grids(grids: np.ndarray, config: VisionConfig) -> np.ndarray:
    """grids [items, 3] (t, h, w) as int64 numpy, after checking each is positive with h, w multiples of the merge."""
    grids = np.asarray(grids, dtype=np.int64)
    if grids.ndim != 2 or grids.shape[1] != 3:
        raise InvalidInputError(f"grid_thw must have shape [num_items, 3], got {tuple(grids.shape)}")
    merge = config.spatial_merge_size
    bad = (grids < 1).any(axis=1) | (grids[:, 1] % merge != 0) | (grids[:, 2] % merge != 0)
    if bad.any():
        t, h, w = grids[int(np.argmax(bad))].tolist()
        raise InvalidInputError(f"grid (t={t}, h={h}, w={w}) must be positive with h, w multiples of {merge}")
    return grids


def check_vision_inputs(pixel_values: torch.Tensor, grid_thw: torch.Tensor, config: VisionConfig) -> np.ndarray:
    """The grids as an int64 numpy array [items, 3], after checking them against each other and the pixels."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise InvalidInputError(f"grid_thw must have shape [num_items, 3], got {tuple(grid_thw.shape)}")
    grids = check_vision_grids(grid_thw.detach().to("cpu", torch.int64).numpy(), config)
    expected = (int(grids.prod(axis=1).sum()), config.patch_dim)
    if tuple(pixel_values.shape) != expected:
        raise InvalidInputError(f"pixel_values has shape {tuple(pixel_values.shape)}, grid_thw implies {expected}")
    return grids


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Cumulative boundaries of one attention segment per frame: every item contributes t segments of h*w."""
    frame_lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(frame_lengths.cumsum(0), (1, 0)).to(device="cpu", dtype=torch.int64)


def vision_rotary_cos_sin(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2-D rotary tables, float32 [num_rows, head_dim], on positions' device (positions [num_rows, 2]).

    Each axis rotates head_dim/4 frequency pairs; the angles are laid out [rows | columns] and that half is
    repeated, matching the rotate-half convention.
    """
    axis_dim = head_dim // 2
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float32, device=positions.device) / axis_dim
    inv_freq = 1.0 / (VISION_ROPE_THETA**exponents)
    angles = (positions.to(torch.float32)[..., None] * inv_freq).flatten(1)  # [N, 2 * head_dim/4]
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


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_fused_ops(q):
        from spaceserve.layers.triton_ops.vision_ops import vision_rotary_triton

        return vision_rotary_triton(q, k, cos, sin)
    return apply_vision_rotary(q, cos, sin), apply_vision_rotary(k, cos, sin)


def apply_activation(x: torch.Tensor, name: str, up: torch.Tensor | None = None) -> torch.Tensor:
    """act(x), times up when given (SwiGLU); one fused launch on CUDA."""
    if use_fused_ops(x):
        from spaceserve.layers.triton_ops.vision_ops import ACTIVATIONS, activation_triton

        if name in ACTIVATIONS:
            return activation_triton(x, name, up)
    out = activation(name)(x)
    return out if up is None else out * up


class VisionAttention(nn.Module):
    """Split by heads across the vision group's ranks in the weights mode (qkv column-, proj row-parallel)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        self.qkv = QKVParallelLinear(dim, self.head_dim, num_heads, num_heads, bias=True)
        self.num_heads = self.qkv.num_heads  # this rank's
        self.proj = RowParallelLinear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: VarlenSegments) -> torch.Tensor:
        num_patches = x.shape[0]
        q, k, v = self.qkv(x).view(num_patches, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = rotate_qk(q, k, cos, sin)
        return self.proj(varlen_attention(q, k, v, segments).reshape(num_patches, -1))


class PreNormVisionBlock(nn.Module):
    """x + attn(norm1(x)), then + mlp(norm2(.)), with each residual add folded into the norm after it: the block
    takes the previous block's MLP output and the residual stream before it (None at the first block, where x is
    the stream) and returns its own MLP output and stream. The models give the norms and the MLP."""

    def __init__(self, norm1: nn.Module, norm2: nn.Module, attn: VisionAttention, mlp: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2, self.attn, self.mlp = norm1, norm2, attn, mlp

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: VarlenSegments,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = x, self.norm1(x)
        else:
            hidden, residual = self.norm1(x, residual)
        hidden, residual = self.norm2(self.attn(hidden, cos, sin, segments), residual)
        return self.mlp(hidden), residual


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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Merges x, or the residual stream x + residual (the last block's output folded in by the norm)."""
        normed = self.ln_q(x) if residual is None else self.ln_q(x, residual)[0]
        return self.mlp(normed.reshape(-1, self.merged_dim))


class VisionTower(nn.Module):
    """What both towers share: the eager forward over a batch of items, and the pieces a CUDA graph of a padded
    bucket uses (layout on the host, forward over prepared inputs on the device)."""

    config: VisionConfig

    @property
    def window_side(self) -> int | None:
        """Window edge in merge units (Qwen2.5-VL), None without window attention."""
        return None

    @property
    def max_window_rows(self) -> int | None:
        side = self.window_side
        return None if side is None else side * side * self.config.spatial_merge_size**2

    def layout(self, grids: np.ndarray, num_rows: int | None = None) -> VisionLayout:
        return build_vision_layout(grids, self.config.spatial_merge_size, self.window_side, num_rows)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [num_patches, patch_dim] + grid_thw [num_items, 3] (on the host) -> [num_patches / merge**2,
        out_hidden_size]: item i's rows follow item i-1's."""
        layout = self.layout(check_vision_inputs(pixel_values, grid_thw, self.config))
        inputs = prepare_inputs(layout, pixel_values.device)
        return self.forward_prepared(pixel_values, inputs)

    def forward_prepared(self, pixel_values: torch.Tensor, inputs: VisionInputs) -> torch.Tensor:
        """[inputs.num_rows, patch_dim] -> [num_rows / merge**2, out_hidden_size], original order. Device work only
        (no host sync, shapes fixed by inputs.num_rows), so a CUDA graph can capture it."""
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Names relative to the tower (``blocks.0.attn.qkv.weight``); see ``vision_weight_name``."""
        return load_module_weights(self, weights)


@torch.no_grad()
def load_module_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Copy named tensors (or safetensors slices) into ``module``'s parameters, each reading the slice its rank
    holds and cast to the parameter's dtype; returns the names loaded."""
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if name in _DERIVED_WEIGHT_NAMES:
            continue
        param = params.get(name)
        if param is None:
            raise ConfigError(f"unknown vision tower weight {name!r} ({type(module).__name__})")
        expected = shard_layout(param).full_shape  # a rank's shard is loaded from the unsharded tensor
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())
        if shape != tuple(expected):
            raise ConfigError(
                f"vision tower weight {name!r} has shape {shape}, the model expects {tuple(expected)}"
            )
        load_parameter(param, tensor, name)
        loaded.add(name)
    return loaded
