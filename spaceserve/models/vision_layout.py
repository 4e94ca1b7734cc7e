"""Where every patch row of a vision batch goes, computed on the host with vectorised numpy: its 2-D position (for
the rotary tables), the attention segments (one per frame; Qwen2.5-VL's windows too, with the order that makes each
window contiguous and its inverse), and optional padding to a fixed row count.

Padding rows (`num_rows` > the real patches) sit after the real ones, at position (0, 0), in segments of their own of
at most PAD_SEGMENT_ROWS rows (so they cost a few key tiles, not a quadratic block), and in Qwen2.5-VL's window order
they keep their place. Every op of the towers is row-wise except attention, which never crosses a segment, and the
merger, which folds runs of merge**2 rows that never mix real and padding rows: the real rows come out exactly as
without padding, and the merged padding rows after them are dropped.

Nothing here loops over items or frames in Python, so preparing a batch costs the same few numpy calls whatever its
mix of images and video frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD_SEGMENT_ROWS = 64


@dataclass(frozen=True)
class VisionLayout:
    num_patches: int
    """Real patch rows."""
    num_rows: int
    """Rows the tower runs over: num_patches plus padding."""
    unit: int
    """Rows per merged token (merge**2)."""
    positions: np.ndarray
    """[num_rows, 2] int32 (row, column) of each row, in the order the blocks see the rows (window order for
    Qwen2.5-VL)."""
    frame_lengths: np.ndarray
    """Rows per full-attention segment (one per frame, then the padding segments), int64."""
    window_lengths: np.ndarray | None = None
    """Qwen2.5-VL: rows per window segment in window order, then the padding segments."""
    window_order: np.ndarray | None = None
    """Qwen2.5-VL: [num_rows / unit] int32, the original index of the merge unit placed j-th."""
    window_inverse: np.ndarray | None = None
    """Qwen2.5-VL: [num_rows / unit] int32, where each original unit was placed."""

    @property
    def num_tokens(self) -> int:
        return self.num_patches // self.unit


def padding_segments(num_rows: int) -> np.ndarray:
    full, rest = divmod(num_rows, PAD_SEGMENT_ROWS)
    lengths = np.full(full + (rest > 0), PAD_SEGMENT_ROWS, dtype=np.int64)
    if rest:
        lengths[-1] = rest
    return lengths


def build_vision_layout(
    grids: np.ndarray, merge: int, window_side: int | None = None, num_rows: int | None = None
) -> VisionLayout:
    """grids [items, 3] (t, h, w) in patches, h and w multiples of merge (check_vision_inputs checks them);
    window_side: Qwen2.5-VL's window edge in merge units (None: no windows); num_rows: pad to this many rows (a
    multiple of merge**2, at least the real patches)."""
    grids = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
    t, h, w = grids[:, 0], grids[:, 1], grids[:, 2]
    unit = merge * merge
    units_h, units_w = h // merge, w // merge
    units_per_frame = units_h * units_w
    units_per_item = t * units_per_frame
    num_units = int(units_per_item.sum())
    num_patches = num_units * unit
    num_rows = num_patches if num_rows is None else int(num_rows)
    if num_rows < num_patches or num_rows % unit:
        raise ValueError(f"cannot pad {num_patches} patch rows to {num_rows} (a multiple of {unit}, at least as many)")
    padded_units = num_rows // unit

    # every merge unit of the batch, in the processor's order: item, frame, unit row, unit column
    item = np.repeat(np.arange(len(grids)), units_per_item)
    item_start = np.cumsum(units_per_item) - units_per_item
    local = np.arange(num_units) - item_start[item]
    frame_units = units_per_frame[item]
    frame = local // frame_units
    in_frame = local - frame * frame_units
    width = units_w[item]
    unit_row = in_frame // width
    unit_col = in_frame - unit_row * width
    inside = np.arange(unit)
    positions = np.zeros((padded_units, unit, 2), dtype=np.int32)
    positions[:num_units, :, 0] = unit_row[:, None] * merge + inside // merge
    positions[:num_units, :, 1] = unit_col[:, None] * merge + inside % merge

    padding = padding_segments(num_rows - num_patches)
    frame_lengths = np.concatenate([np.repeat(h * w, t), padding])
    if window_side is None:
        return VisionLayout(num_patches, num_rows, unit, positions.reshape(num_rows, 2), frame_lengths)

    side = window_side
    height = units_h[item]
    win_row, win_col = unit_row // side, unit_col // side
    band_height = np.minimum(side, height - win_row * side)  # the last band of windows is clipped
    win_width = np.minimum(side, width - win_col * side)  # and so is the last window of each band
    place = (
        item_start[item] + frame * frame_units  # the frame's first unit
        + win_row * side * width  # the full bands above
        + win_col * side * band_height  # the windows to the left in this band
        + (unit_row - win_row * side) * win_width + (unit_col - win_col * side)  # row-major inside the window
    )  # fmt: skip
    order = np.arange(padded_units, dtype=np.int32)
    order[place] = np.arange(num_units, dtype=np.int32)
    inverse = np.arange(padded_units, dtype=np.int32)
    inverse[:num_units] = place
    windows_h, windows_w = -(-units_h // side), -(-units_w // side)
    windows_per_frame = windows_h * windows_w
    windows_per_item = t * windows_per_frame
    window_item_start = np.cumsum(windows_per_item) - windows_per_item
    window = window_item_start[item] + frame * windows_per_frame[item] + win_row * windows_w[item] + win_col
    window_units = np.bincount(window, minlength=int(windows_per_item.sum()))
    return VisionLayout(
        num_patches,
        num_rows,
        unit,
        positions[order].reshape(num_rows, 2),
        frame_lengths,
        window_lengths=np.concatenate([window_units * unit, padding]),
        window_order=order,
        window_inverse=inverse,
    )


def work_items(lengths: np.ndarray, block_m: int) -> np.ndarray:
    """[items, 2] int32 (segment, first row): one item per block_m rows of each segment, the longest segments first
    (the GPU starts the heaviest programs first)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    tiles = -(-lengths // block_m)
    segments = np.argsort(-lengths, kind="stable")
    counts = tiles[segments]
    total = int(counts.sum())
    items = np.empty((total, 2), dtype=np.int32)
    items[:, 0] = np.repeat(segments, counts)
    first = np.cumsum(counts) - counts
    items[:, 1] = (np.arange(total) - np.repeat(first, counts)) * block_m
    return items


def cu_seqlens(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out
