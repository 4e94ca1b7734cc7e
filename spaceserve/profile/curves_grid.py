"""What `spaceserve profile` measures: the grid of SM counts and work sizes, and where each SM count runs (the
device's green-context splits, or the whole device alone where partitions cannot be made)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from spaceserve.sched.resource_curves import Split

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveGrid:
    name: str
    patches: tuple[int, ...]
    """Total patches of each measured encoder batch."""
    batches: tuple[int, ...]
    """Decodes per LM step (0: a prefill-only step)."""
    contexts: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    """Prefill chunk per LM step (0: a decode-only step)."""
    encoder_sm_stride: int = 1
    """Measure the encoder on every k-th split the device grants (1: all of them), plus the whole device."""
    lm_sm_stride: int = 1
    encoder_sms: tuple[int, ...] | None = None
    """Measure these encoder counts (each rounded up by the driver) instead of the stride's; LM sides follow."""
    max_image_patches: int = 9216
    """A batch of more patches is several images of at most this many (1344x1344 is 9216)."""
    warmup: int = 1
    min_iters: int = 3
    max_iters: int = 10
    point_budget_ms: float = 120.0
    """Timed iterations per point: as many as fit in this, within [min_iters, max_iters]."""

    def __post_init__(self) -> None:
        for name in ("patches", "batches", "contexts", "prefill_tokens"):
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)) or min(values) < 0:
                raise ValueError(f"grid {name} must be distinct values >= 0 in increasing order, got {values}")
        if min(self.patches) < 4 or min(self.contexts) < 2:
            raise ValueError("grid patches must be >= 4 and contexts >= 2")
        if self.encoder_sm_stride < 1 or self.lm_sm_stride < 1 or not 1 <= self.min_iters <= self.max_iters:
            raise ValueError("SM strides must be >= 1 and 1 <= min_iters <= max_iters")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def num_lm_shapes(self) -> int:
        return sum(1 for b in self.batches for _ in (self.contexts if b else self.contexts[:1])
                   for p in self.prefill_tokens if b or p)


def default_grid() -> CurveGrid:
    """A few minutes on an H200 for a 2B model: the encoder on every split, the LM on every other one. Batches
    beyond 18432 patches (two 1344x1344 images) are several such images, linear in their count, so the curves model
    extrapolates them from the last segment."""
    return CurveGrid(
        name="default",
        patches=(1024, 4096, 9216, 18432),
        batches=(0, 1, 16, 64, 256),
        contexts=(1024, 4096),
        prefill_tokens=(0, 512, 2048, 8192),
        encoder_sm_stride=1,
        lm_sm_stride=2,
    )


def quick_grid() -> CurveGrid:
    """Seconds: a few splits, the corners of the work range (the engine's start-up profile)."""
    return CurveGrid(
        name="quick",
        patches=(1024, 4096, 16384),
        batches=(0, 1, 32, 256),
        contexts=(2048,),
        prefill_tokens=(0, 1024, 8192),
        encoder_sms=(32, 64, 96),
        min_iters=2,
        max_iters=5,
        point_budget_ms=40.0,
    )


GRIDS = {"default": default_grid, "quick": quick_grid}


@dataclass(frozen=True)
class Side:
    """One place to time work: `sms` SMs, reached through `stream` (None: the caller's current stream)."""

    sms: int
    stream: Any = None


@dataclass(frozen=True)
class Placements:
    total_sms: int
    splits: tuple[Split, ...]
    """Every split the device grants (the allocator may choose any; unmeasured SM counts are interpolated)."""
    encoder_sides: tuple[Side, ...]
    """Fewest SMs first, the whole device last."""
    lm_sides: tuple[Side, ...]
    partitioned: bool
    note: str = ""


def whole_device_placements(total_sms: int, stream: Any = None, note: str = "") -> Placements:
    whole = Side(total_sms, stream)
    return Placements(total_sms, (), (whole,), (whole,), partitioned=False, note=note)


def grid_split_counts(manager: Any, grid: CurveGrid) -> tuple[list[int], list[int]]:
    """The encoder group sizes whose encoder side, and those whose LM side (the remainder), the grid measures."""
    if grid.encoder_sms is not None:
        counts = sorted({manager.partition(n).encoder_sms for n in grid.encoder_sms})
        return counts, counts
    grantable = manager.grantable_encoder_sms()
    return list(grantable[:: grid.encoder_sm_stride]), list(grantable[:: grid.lm_sm_stride])


def device_placements(device: torch.device, grid: CurveGrid, lm_whole_stream: Any,
                      probes: dict[tuple[int, str], Any] | None = None) -> Placements:
    """The device's splits chosen by the grid, made through the process's partition manager; the whole device alone
    (with the reason) where green contexts are unavailable. With `probes` (runtime/sm_probe.py, keyed by encoder
    group and side), a side that failed its probe is not measured and a split with a failed side is not offered."""
    from spaceserve.runtime.sm_partition import get_partition_manager, green_context_support

    if device.type != "cuda":
        return whole_device_placements(1, None, f"{device.type}: no SM partitions, the whole device only")
    total = torch.cuda.get_device_properties(device).multi_processor_count
    unsupported = green_context_support(device)
    if unsupported:
        logger.warning("profile: no SM partitions (%s); measuring the whole device only", unsupported)
        return whole_device_placements(total, lm_whole_stream, f"no SM partitions: {unsupported}")
    manager = get_partition_manager(device)
    grantable = manager.grantable_encoder_sms()
    encoder_counts, lm_counts = grid_split_counts(manager, grid)

    def runs(n: int, side: str) -> bool:
        probe = (probes or {}).get((n, side))
        return probe is None or probe.ok

    dropped = sorted({n for n in grantable for side in ("encoder", "lm") if not runs(n, side)})
    encoder_counts = [n for n in encoder_counts if runs(n, "encoder")]
    lm_counts = [n for n in lm_counts if runs(n, "lm")]
    partitions = {n: manager.partition(n) for n in sorted(set(encoder_counts) | set(lm_counts))}
    encoder_sides = [Side(partitions[n].encoder_sms, partitions[n].encoder_stream) for n in encoder_counts]
    lm_sides = sorted((Side(partitions[n].lm_sms, partitions[n].lm_stream) for n in lm_counts), key=lambda s: s.sms)
    note = f"green-context splits of {total} SMs: encoder groups {grantable[0]}..{grantable[-1]}"
    if dropped:
        note += f"; splits with a side that failed the GEMM probe, left out: encoder groups {dropped}"
    return Placements(
        total,
        tuple(Split(n, total - n) for n in grantable if n not in dropped),
        (*encoder_sides, Side(total, torch.cuda.Stream(device))),
        (*lm_sides, Side(total, lm_whole_stream)),
        partitioned=True,
        note=note,
    )


def layout_placements(layout: Any, total_sms: int, lm_whole_stream: Any) -> Placements:
    """The splits an engine's execution layout already has (streams and decode graphs made): what a start-up
    profile may use without making more."""
    partitions = tuple(getattr(layout, "partitions", ()) or ())
    if not partitions:
        return whole_device_placements(total_sms, lm_whole_stream, f"{layout.mode}: no SM partitions")
    encoder_whole = layout.encoder_full_stream
    return Placements(
        total_sms,
        tuple(Split(p.encoder_sms, p.lm_sms) for p in partitions),
        (*(Side(p.encoder_sms, p.encoder_stream) for p in partitions), Side(total_sms, encoder_whole)),
        (*sorted((Side(p.lm_sms, p.lm_stream) for p in partitions), key=lambda s: s.sms),
         Side(total_sms, lm_whole_stream)),
        partitioned=True,
        note="the engine's own splits",
    )
