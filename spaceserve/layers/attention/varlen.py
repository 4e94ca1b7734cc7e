"""Full (bidirectional) attention restricted to the segments of a packed batch: the vision towers' per-frame and
per-window attention. Segment boundaries are prepared once per forward (VarlenSegments) and shared by every
layer, so no layer loops over segments on the host or copies indices to the device.

Segments come in two shapes. Built for one batch (build_varlen_segments, or the towers' eager path) they know
their boundaries on the host too. Made for a CUDA graph they are fixed-size device buffers refilled before each
replay: the Triton work list with its valid count on the device and a fixed number of programs, or (the torch
path, for CPU tests of the graph path) the segment of every row."""

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

    num_rows: int
    cu_seqlens_device: torch.Tensor  # [S + 1] int32 (a graph's: room for more segments than a batch uses)
    cu_seqlens: tuple[int, ...] | None = None
    """The boundaries on the host; None for a graph's segments, which change between replays."""
    # the Triton kernel: (segment, first row) work items, how many are valid (a [1] device tensor), the programs
    # launched along them, and the tiles; None on the torch path
    triton_work: torch.Tensor | None = None
    triton_work_count: torch.Tensor | None = None
    triton_num_programs: int = 0
    triton_tiling: AttentionTiling | None = None
    # the torch path: one (rows [segments, length]) index per distinct segment length (a batch's), or the segment
    # of every row (a graph's)
    torch_groups: tuple[torch.Tensor, ...] = ()
    row_segments: torch.Tensor | None = None

    @property
    def uses_triton(self) -> bool:
        return self.triton_work is not None

    @property
    def max_seqlen(self) -> int:
        if self.cu_seqlens is None:
            raise ValueError("a graph's segments do not know their lengths on the host")
        return max((b - a for a, b in zip(self.cu_seqlens, self.cu_seqlens[1:])), default=0)


def _check_bounds(cu_seqlens: Sequence[int]) -> tuple[int, ...]:
    bounds = tuple(int(b) for b in cu_seqlens)
    if not bounds or bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {list(bounds)[:8]}...")
    return bounds


def torch_segment_groups(bounds: Sequence[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    starts = torch.tensor(bounds[:-1], dtype=torch.int64)
    lengths = torch.tensor(bounds[1:], dtype=torch.int64) - starts
    return tuple(
        (starts[lengths == length][:, None] + torch.arange(length)).to(device)
        for length in sorted(set(lengths.tolist()))
        if length > 0
    )


def build_varlen_segments(
    cu_seqlens: Sequence[int],
    head_dim: int,
    device: torch.device,
    use_triton: bool | None = None,
    tiling: AttentionTiling | None = None,
) -> VarlenSegments:
    """use_triton None: the Triton kernel on CUDA when triton is installed, else the torch reference. tiling None:
    the kernel's default tiles for the longest segment (short windows get smaller ones)."""
    bounds = _check_bounds(cu_seqlens)
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    device = torch.device(device)
    if use_triton is None:
        use_triton = default_use_triton(device)
    cu_device = torch.tensor(bounds, dtype=torch.int32, device=device)
    if not use_triton:
        return VarlenSegments(bounds[-1], cu_device, bounds, torch_groups=torch_segment_groups(bounds, device))
    from spaceserve.layers.attention.triton import build_work_list, varlen_tiling

    tiling = tiling or varlen_tiling(max(lengths, default=0))
    work = build_work_list(lengths, tiling.block_m, min_length=1, device=device)
    count = torch.tensor([work.shape[0]], dtype=torch.int32, device=device)
    return VarlenSegments(bounds[-1], cu_device, bounds, work, count, work.shape[0], tiling)


def default_use_triton(device: torch.device) -> bool:
    from spaceserve.layers.attention import triton_available

    return torch.device(device).type == "cuda" and triton_available()


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VarlenSegments, scale: float | None = None
) -> torch.Tensor:
    """q, k, v [total, heads, head_dim] -> [total, heads, head_dim]; scale defaults to head_dim ** -0.5."""
    if q.shape[0] != segments.num_rows:
        raise ValueError(f"the segments cover {segments.num_rows} rows, the batch has {q.shape[0]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if segments.uses_triton:
        from spaceserve.layers.attention.triton import varlen_attention as triton_varlen_attention

        return triton_varlen_attention(
            q, k, v, segments.cu_seqlens_device, segments.triton_work, scale, segments.triton_tiling,
            work_count=segments.triton_work_count, num_programs=segments.triton_num_programs,
        )  # fmt: skip
    if segments.row_segments is not None:
        return masked_varlen_attention(q, k, v, segments.row_segments, scale)
    return varlen_attention_reference(q, k, v, segments, scale)


def varlen_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VarlenSegments, scale: float | None = None
) -> torch.Tensor:
    """Plain PyTorch: segments of equal length go through one batched SDPA call, so the loop runs over distinct
    lengths (full windows, edge windows, frame sizes), not over segments."""
    groups = segments.torch_groups
    if not groups:  # built for the kernel (or a graph); the reference is being asked to check it
        if segments.cu_seqlens is None:
            raise ValueError("the reference needs segments that know their boundaries on the host")
        groups = torch_segment_groups(segments.cu_seqlens, q.device)
    out = torch.empty_like(q)
    for rows in groups:
        q_seg, k_seg, v_seg = (x[rows].transpose(1, 2) for x in (q, k, v))  # [segments, heads, length, dim]
        out[rows] = F.scaled_dot_product_attention(q_seg, k_seg, v_seg, scale=scale).transpose(1, 2)
    return out


def masked_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_segments: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense attention under a same-segment mask: fixed shapes for any segments (a graph's torch path). Memory grows
    with rows squared, so it serves CPU tests of the graph path, never a real batch."""
    mask = row_segments[:, None] == row_segments[None, :]
    out = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)
