"""A vision batch's metadata on the device: one int32 buffer, filled on the host from a VisionLayout and moved by
one host-to-device copy, viewed as the positions, the attention segments of each kind (frames; Qwen2.5-VL's
windows) and the window order.

The same packing serves both paths. Eager: a buffer sized for exactly this batch. CUDA graphs: a buffer per
padded bucket sized for any batch that fits it (`bucket_spec`: room for every segment and work item such a batch
can have), viewed once when the graph is captured and refilled before each replay; the Triton kernels run a fixed
number of programs (`graph_num_programs`) and read the valid work count from the buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from spaceserve.layers.attention.varlen import VarlenSegments, default_use_triton, torch_segment_groups
from spaceserve.models.vision_layout import VisionLayout, cu_seqlens, work_items

if TYPE_CHECKING:
    from spaceserve.layers.attention.triton.common import AttentionTiling


@dataclass(frozen=True)
class VisionInputs:
    """What the towers' blocks read besides the patch rows; every tensor is on the tower's device."""

    num_rows: int
    positions: torch.Tensor  # [num_rows, 2] int32
    frames: VarlenSegments
    windows: VarlenSegments | None = None
    window_order: torch.Tensor | None = None  # [num_rows / unit] int32
    window_inverse: torch.Tensor | None = None


@dataclass(frozen=True)
class AttentionPlan:
    """How one kind of segments is attended: Triton tiles and the programs launched along the work items, or the
    torch path (tiling None)."""

    tiling: AttentionTiling | None
    num_programs: int = 0


@dataclass(frozen=True)
class StagingSpec:
    """Where each field sits in the int32 buffer: name -> (offset, length)."""

    num_rows: int
    unit: int
    plans: dict[str, AttentionPlan]
    row_segments: bool
    """The torch path of a graph: the segment of every row (instead of work lists)."""
    fields: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return max((offset + length for offset, length in self.fields.values()), default=0)

    @property
    def has_windows(self) -> bool:
        return "windows" in self.plans


def _spec(
    num_rows: int,
    unit: int,
    plans: dict[str, AttentionPlan],
    segments: dict[str, int],
    work: dict[str, int],
    row_segments: bool,
) -> StagingSpec:
    fields: dict[str, tuple[int, int]] = {}
    offset = 0

    def add(name: str, length: int) -> None:
        nonlocal offset
        fields[name] = (offset, length)
        offset += length

    add("positions", 2 * num_rows)
    for kind, plan in plans.items():
        add(f"{kind}.cu_seqlens", segments[kind] + 1)
        if plan.tiling is not None:
            add(f"{kind}.work", 2 * work[kind])
            add(f"{kind}.work_count", 1)
        elif row_segments:
            add(f"{kind}.row_segments", num_rows)
    if "windows" in plans:
        add("window_order", num_rows // unit)
        add("window_inverse", num_rows // unit)
    return StagingSpec(num_rows, unit, plans, row_segments, fields)


def _lengths(layout: VisionLayout, kind: str) -> np.ndarray:
    return layout.frame_lengths if kind == "frames" else layout.window_lengths


def exact_spec(layout: VisionLayout, use_triton: bool) -> StagingSpec:
    """A buffer for exactly this batch (the eager path)."""
    from_kinds = ["frames"] + (["windows"] if layout.window_lengths is not None else [])
    plans, segments, work = {}, {}, {}
    for kind in from_kinds:
        lengths = _lengths(layout, kind)
        segments[kind] = len(lengths)
        tiling = None
        if use_triton:
            from spaceserve.layers.attention.triton import varlen_tiling

            tiling = varlen_tiling(int(lengths.max(initial=0)))
            work[kind] = int((-(-lengths // tiling.block_m)).sum())
        plans[kind] = AttentionPlan(tiling, work.get(kind, 0))
    return _spec(layout.num_rows, layout.unit, plans, segments, work, row_segments=False)


def graph_num_programs(num_rows: int, block_m: int) -> int:
    """Programs along the work items in a graph: enough for one item each when the batch's segments are at least
    about 512 rows (images, frames) or are full windows, with padding in 64-row segments; a batch with more items
    loops over them."""
    return -(-num_rows // min(block_m, 64)) + -(-num_rows // 512)


def bucket_spec(num_rows: int, unit: int, max_window_rows: int | None, use_triton: bool) -> StagingSpec:
    """A buffer for any batch of at most num_rows rows: every segment has at least `unit` rows, so there are at
    most num_rows / unit of them, and at most that many plus num_rows / block_m work items."""
    kinds = {"frames": num_rows} if max_window_rows is None else {"frames": num_rows, "windows": max_window_rows}
    plans, segments, work = {}, {}, {}
    for kind, longest in kinds.items():
        segments[kind] = num_rows // unit
        tiling = None
        if use_triton:
            from spaceserve.layers.attention.triton import varlen_tiling

            tiling = varlen_tiling(longest)
            work[kind] = segments[kind] + -(-num_rows // tiling.block_m)
        num_programs = graph_num_programs(num_rows, tiling.block_m) if tiling is not None else 0
        plans[kind] = AttentionPlan(tiling, num_programs)
    return _spec(num_rows, unit, plans, segments, work, row_segments=not use_triton)


def pack(layout: VisionLayout, spec: StagingSpec, out: np.ndarray) -> None:
    """Write the layout into `out` (int32, at least spec.size elements). Entries past what this batch uses keep
    whatever they held: nothing reads them (the work count bounds the items, items name only real segments)."""
    if layout.num_rows != spec.num_rows:
        raise ValueError(f"the layout has {layout.num_rows} rows, the buffer is laid out for {spec.num_rows}")

    def put(name: str, values: np.ndarray) -> None:
        offset, length = spec.fields[name]
        if values.size > length:
            raise ValueError(f"{name} needs {values.size} entries, the buffer has room for {length}")
        out[offset : offset + values.size] = values.reshape(-1)

    put("positions", layout.positions)
    for kind, plan in spec.plans.items():
        lengths = _lengths(layout, kind)
        put(f"{kind}.cu_seqlens", cu_seqlens(lengths))
        if plan.tiling is not None:
            items = work_items(lengths, plan.tiling.block_m)
            put(f"{kind}.work", items)
            put(f"{kind}.work_count", np.array([len(items)]))
        elif spec.row_segments:
            put(f"{kind}.row_segments", np.repeat(np.arange(len(lengths)), lengths))
    if spec.has_windows:
        put("window_order", layout.window_order)
        put("window_inverse", layout.window_inverse)


def view_inputs(buffer: torch.Tensor, spec: StagingSpec, layout: VisionLayout | None = None) -> VisionInputs:
    """VisionInputs viewing a device buffer packed with `spec`. With the batch's layout (the eager path) the segments
    also know their host boundaries, and the torch path gets its per-length groups."""

    def view(name: str, *shape: int) -> torch.Tensor:
        offset, length = spec.fields[name]
        return buffer[offset : offset + length].view(*shape) if shape else buffer[offset : offset + length]

    segments = {}
    for kind, plan in spec.plans.items():
        cu = view(f"{kind}.cu_seqlens")
        bounds = tuple(int(b) for b in cu_seqlens(_lengths(layout, kind))) if layout is not None else None
        if plan.tiling is not None:
            segments[kind] = VarlenSegments(
                spec.num_rows, cu, bounds, view(f"{kind}.work", -1, 2), view(f"{kind}.work_count"),
                plan.num_programs, plan.tiling,
            )  # fmt: skip
        elif spec.row_segments:
            segments[kind] = VarlenSegments(spec.num_rows, cu, bounds, row_segments=view(f"{kind}.row_segments"))
        elif bounds is not None:
            segments[kind] = VarlenSegments(spec.num_rows, cu, bounds, torch_groups=torch_segment_groups(bounds, buffer.device))
        else:
            raise ValueError("the eager torch path needs the batch's layout (its segments' host bounds)")
    windows = spec.has_windows
    return VisionInputs(
        spec.num_rows,
        view("positions", spec.num_rows, 2),
        segments["frames"],
        segments.get("windows"),
        view("window_order") if windows else None,
        view("window_inverse") if windows else None,
    )


def prepare_inputs(layout: VisionLayout, device: torch.device, use_triton: bool | None = None) -> VisionInputs:
    """The eager path: pack this batch's metadata into a (pinned, on CUDA) host buffer and copy it over once."""
    device = torch.device(device)
    use_triton = default_use_triton(device) if use_triton is None else use_triton
    spec = exact_spec(layout, use_triton)
    host = torch.empty(spec.size, dtype=torch.int32, pin_memory=device.type == "cuda")
    pack(layout, spec, host.numpy())
    return view_inputs(host.to(device, non_blocking=True), spec, layout)
