"""Full (bidirectional) attention restricted to the segments of a packed batch: the vision towers' per-frame and
per-window attention. Segment boundaries are prepared once per forward (VarlenSegments) and shared by every
layer, so no layer loops over segments on the host or copies indices to the device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from spaceserve.layers.attention.triton.common import AttentionTiling


@dataclass(frozen=True)
class VarlenSegments:
    """Segment i covers rows cu_seqlens[i]:cu_seqlens[i+1] of the packed batch."""

    cu_seqlens: tuple[int, ...]
    max_seqlen: int
    cu_seqlens_device: torch.Tensor  # [S + 1] int32
    # the Triton kernel's (segment, first row) work list and tiles; None on the torch path
    triton_work: torch.Tensor | None
    triton_tiling: AttentionTiling | None
    # the torch path: one (rows [segments, length]) index per distinct segment length
    torch_groups: tuple[torch.Tensor, ...]

    @property
    def num_rows(self) -> int:
        return self.cu_seqlens[-1]

    @property
    def uses_triton(self) -> bool:
        return self.triton_work is not None


def build_varlen_segments(
    cu_seqlens: Sequence[int],
    head_dim: int,
    device: torch.device,
    use_triton: bool | None = None,
    tiling: AttentionTiling | None = None,
) -> VarlenSegments:
    """use_triton None: the Triton kernel on CUDA when triton is installed, else the torch reference. tiling None:
    the kernel's default tiles for the longest segment (short windows get smaller ones)."""
    bounds = tuple(int(b) for b in cu_seqlens)
    if not bounds or bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {list(bounds)[:8]}...")
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    device = torch.device(device)
    if use_triton is None:
        from spaceserve.layers.attention import triton_available

        use_triton = device.type == "cuda" and triton_available()
    work, tiling, groups = None, None, ()
    if use_triton:
        from spaceserve.layers.attention.triton import build_work_list, varlen_tiling

        tiling = tiling or varlen_tiling(max(lengths, default=0))
        work = build_work_list(lengths, tiling.block_m, min_length=1, device=device)
    else:
        starts = torch.tensor(bounds[:-1], dtype=torch.int64)
        lengths_t = torch.tensor(lengths, dtype=torch.int64)
        groups = tuple(
            (starts[lengths_t == length][:, None] + torch.arange(length)).to(device)
            for length in sorted(set(lengths))
            if length > 0
        )
    return VarlenSegments(
        cu_seqlens=bounds,
        max_seqlen=max(lengths, default=0),
        cu_seqlens_device=torch.tensor(bounds, dtype=torch.int32, device=device),
        triton_work=work,
        triton_tiling=tiling,
        torch_groups=groups,
    )


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VarlenSegments, scale: float | None = None
) -> torch.Tensor:
    """q, k, v [total, heads, head_dim] -> [total, heads, head_dim]; scale defaults to head_dim ** -0.5."""
    if q.shape[0] != segments.num_rows:
        raise ValueError(f"the segments cover {segments.num_rows} rows, the batch has {q.shape[0]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if segments.uses_triton:
        from spaceserve.layers.attention.triton import varlen_attention as triton_varlen_attention

        return triton_varlen_attention(q, k, v, segments.cu_seqlens_device, segments.triton_work, scale, segments.triton_tiling)
    return varlen_attention_reference(q, k, v, segments, scale)


def varlen_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VarlenSegments, scale: float | None = None
) -> torch.Tensor:
    """Plain PyTorch: segments of equal length go through one batched SDPA call, so the loop runs over distinct
    lengths (full windows, edge windows, frame sizes), not over segments."""
    groups = segments.torch_groups
    if segments.uses_triton:  # built for the kernel; the reference is being asked to check it
        rebuilt = build_varlen_segments(segments.cu_seqlens, q.shape[-1], q.device, use_triton=False)
        groups = rebuilt.torch_groups
    out = torch.empty_like(q)
    for rows in groups:
        q_seg, k_seg, v_seg = (x[rows].transpose(1, 2) for x in (q, k, v))  # [segments, heads, length, dim]
        out[rows] = F.scaled_dot_product_attention(q_seg, k_seg, v_seg, scale=scale).transpose(1, 2)
    return out
