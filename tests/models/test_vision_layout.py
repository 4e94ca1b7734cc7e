"""The vectorised batch layout (vision_layout.py) against a plain per-item, per-frame reference written the way the
processor describes the patch order, on random grids of images and videos, with and without padding; and the
packed metadata buffers (vision_inputs.py) of exact and bucket sizes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from spaceserve.models.vision_inputs import bucket_spec, exact_spec, pack, view_inputs
from spaceserve.models.vision_layout import PAD_SEGMENT_ROWS, build_vision_layout, cu_seqlens, work_items

MERGE = 2


def reference_layout(grids, side):
    """positions [N, 2] in processor order, frame lengths, and (side given) window order over merge units and
    window lengths in rows, one Python loop per item, frame, window and unit."""
    positions, frames, order, windows = [], [], [], []
    unit_offset = 0
    for t, h, w in grids:
        uh, uw = h // MERGE, w // MERGE
        for frame in range(t):
            frames.append(h * w)
            for by in range(uh):
                for bx in range(uw):
                    for ry in range(MERGE):
                        for rx in range(MERGE):
                            positions.append((by * MERGE + ry, bx * MERGE + rx))
            if side is None:
                continue
            base = unit_offset + frame * uh * uw
            for wy in range(0, uh, side):
                for wx in range(0, uw, side):
                    units = [base + y * uw + x for y in range(wy, min(wy + side, uh)) for x in range(wx, min(wx + side, uw))]
                    order.extend(units)
                    windows.append(len(units) * MERGE * MERGE)
        unit_offset += t * uh * uw
    return np.array(positions, dtype=np.int64).reshape(-1, 2), np.array(frames), np.array(order), np.array(windows)


def random_grids(rng: random.Random, count: int):
    return [(rng.choice([1, 1, 2, 3]), 2 * rng.randint(1, 13), 2 * rng.randint(1, 13)) for _ in range(count)]


@pytest.mark.parametrize("side", [None, 4, 3])
def test_layout_matches_the_per_item_reference(side):
    rng = random.Random(random.randrange(2**31))
    for _ in range(20):
        grids = random_grids(rng, rng.randint(1, 5))
        positions, frames, order, windows = reference_layout(grids, side)
        num_patches = len(positions)
        extra = 4 * rng.choice([0, 1, 15, 16, 17, 40])
        layout = build_vision_layout(np.array(grids), MERGE, side, num_rows=num_patches + extra)
        assert layout.num_patches == num_patches and layout.num_rows == num_patches + extra
        padding = [PAD_SEGMENT_ROWS] * (extra // PAD_SEGMENT_ROWS) + ([extra % PAD_SEGMENT_ROWS] if extra % PAD_SEGMENT_ROWS else [])
        assert layout.frame_lengths.tolist() == frames.tolist() + padding
        if side is None:
            assert layout.positions[:num_patches].tolist() == positions.tolist()
            continue
        units = num_patches // 4
        assert layout.window_order[:units].tolist() == order.tolist()
        assert layout.window_order[units:].tolist() == list(range(units, units + extra // 4))  # padding stays put
        assert layout.window_lengths.tolist() == windows.tolist() + padding
        assert (layout.window_order[layout.window_inverse] == np.arange(layout.num_rows // 4)).all()
        in_window_order = positions.reshape(-1, 4, 2)[order].reshape(-1, 2)
        assert layout.positions[:num_patches].tolist() == in_window_order.tolist()
    assert not (layout.positions[num_patches:] != 0).any()


def test_padding_must_fit_and_keep_whole_units():
    grids = np.array([[1, 4, 4]])
    with pytest.raises(ValueError, match="cannot pad 16"):
        build_vision_layout(grids, MERGE, num_rows=8)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_vision_layout(grids, MERGE, num_rows=18)
    empty = build_vision_layout(np.zeros((0, 3)), MERGE, 4, num_rows=200)  # what a graph is captured with
    assert empty.num_patches == 0 and empty.frame_lengths.tolist() == [64, 64, 64, 8]


def test_work_items_cover_each_segment_once_longest_first():
    lengths = np.array([5, 130, 64, 0, 65])
    items = work_items(lengths, 64)
    assert [tuple(i) for i in items] == [(1, 0), (1, 64), (1, 128), (4, 0), (4, 64), (2, 0), (0, 0)]


@pytest.mark.parametrize("use_triton", [False, True])
def test_packed_buffers_view_back_to_the_layout(use_triton):
    if use_triton:
        pytest.importorskip("triton")
    grids = np.array([[2, 6, 8], [1, 10, 4]])
    layout = build_vision_layout(grids, MERGE, 4)
    for spec, padded_layout, host_layout in (
        (exact_spec(layout, use_triton), layout, layout),  # the eager path: the segments know their host bounds
        (bucket_spec(512, 4, 64, use_triton), build_vision_layout(grids, MERGE, 4, num_rows=512), None),
    ):
        buffer = np.full(spec.size, -7, dtype=np.int32)  # stale entries must stay harmless
        pack(padded_layout, spec, buffer)
        inputs = view_inputs(torch.from_numpy(buffer), spec, host_layout)
        assert inputs.num_rows == padded_layout.num_rows
        assert inputs.positions.tolist() == padded_layout.positions.tolist()
        assert inputs.window_inverse.tolist() == padded_layout.window_inverse.tolist()
        for segments, lengths in ((inputs.frames, padded_layout.frame_lengths), (inputs.windows, padded_layout.window_lengths)):
            bounds = cu_seqlens(lengths)
            assert segments.cu_seqlens_device[: len(bounds)].tolist() == bounds.tolist()
            if use_triton:
                count = int(segments.triton_work_count)
                items = work_items(lengths, segments.triton_tiling.block_m)
                assert segments.triton_work[:count].tolist() == items.tolist()
                assert segments.triton_num_programs >= 1
            elif spec.row_segments:
                assert segments.row_segments.tolist() == np.repeat(np.arange(len(lengths)), lengths).tolist()


def test_a_bucket_holds_the_worst_batch_of_smallest_items():
    """Every segment has at least merge**2 rows: a bucket full of 2x2-patch images fits its buffers."""
    spec = bucket_spec(256, 4, 64, use_triton=True)
    layout = build_vision_layout(np.array([[1, 2, 2]] * 64), MERGE, 4, num_rows=256)
    pack(layout, spec, np.zeros(spec.size, dtype=np.int32))
