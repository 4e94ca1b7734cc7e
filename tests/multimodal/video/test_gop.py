"""Chunking arithmetic on synthetic packet indexes (no video needed)."""

import numpy as np
import pytest

from spaceserve.multimodal.video.gop import PacketInfo, PacketIndex, gop_of_frame, plan_chunks


def synthetic_index(gop_lengths: list[int], *, open_gop: bool) -> PacketIndex:
    keyframe_frames = tuple(int(x) for x in np.cumsum([0] + gop_lengths[:-1]))
    num_frames = sum(gop_lengths)
    # Decode order equals presentation order here; only keyframe positions matter to the planner.
    packets = tuple(PacketInfo(pts, pts, pts in keyframe_frames) for pts in range(num_frames))
    return PacketIndex(
        stream_index=0, codec="h264", pix_fmt="yuv420p", profile=None, width=16, height=16, fps=30.0,
        time_base=1, packets=packets, pts_by_frame=tuple(range(num_frames)), keyframe_packets=keyframe_frames,
        keyframe_frames=keyframe_frames, open_gop=open_gop,
    )


@pytest.mark.parametrize("seed", range(40))
def test_chunks_cover_every_frame_once_in_order_on_gop_boundaries(seed):
    rng = np.random.default_rng(seed)
    gop_lengths = rng.integers(1, 40, size=int(rng.integers(1, 30))).tolist()
    open_gop = bool(rng.integers(0, 2))
    index = synthetic_index(gop_lengths, open_gop=open_gop)
    count = int(rng.integers(1, index.num_frames + 1))
    frames = tuple(sorted(rng.choice(index.num_frames, size=count, replace=False).tolist()))
    max_chunks = int(rng.integers(1, 12))
    min_frames = int(rng.integers(1, 60))
    chunks = plan_chunks(index, frames, max_chunks=max_chunks, min_frames_per_chunk=min_frames)

    assert tuple(f for chunk in chunks for f in chunk.frame_indices) == frames
    gops_used = len({gop_of_frame(index.keyframe_frames, f) for f in frames})
    assert 1 <= len(chunks) <= min(max_chunks, gops_used)
    gop_sets = [{gop_of_frame(index.keyframe_frames, f) for f in chunk.frame_indices} for chunk in chunks]
    for earlier, later in zip(gop_sets, gop_sets[1:]):
        assert max(earlier) < min(later)  # no GOP is split between two chunks
    for chunk in chunks:
        assert chunk.segments and all(segment.frame_indices for segment in chunk.segments)
        for segment in chunk.segments:
            assert segment.start_packet in index.keyframe_packets
            first_gop = gop_of_frame(index.keyframe_frames, segment.frame_indices[0])
            expected_start = first_gop - 1 if open_gop and first_gop > 0 else first_gop
            assert segment.start_packet == index.keyframe_packets[expected_start]
            segment_gops = sorted({gop_of_frame(index.keyframe_frames, f) for f in segment.frame_indices})
            assert segment_gops == list(range(segment_gops[0], segment_gops[-1] + 1))  # a segment has no gaps


def test_k_follows_sessions_and_length():
    index = synthetic_index([30] * 20, open_gop=False)
    every_frame = tuple(range(600))
    assert len(plan_chunks(index, every_frame, max_chunks=8)) == 8
    assert len(plan_chunks(index, every_frame, max_chunks=8, min_frames_per_chunk=200)) == 3
    assert len(plan_chunks(index, tuple(range(0, 60)), max_chunks=8)) == 2  # only two GOPs hold frames
    assert plan_chunks(index, (), max_chunks=8) == ()


def test_chunks_are_balanced_by_decode_work():
    index = synthetic_index([30] * 16, open_gop=False)
    chunks = plan_chunks(index, tuple(range(480)), max_chunks=4)
    assert [len(chunk.frame_indices) for chunk in chunks] == [120] * 4


def test_gaps_between_gops_start_new_segments():
    index = synthetic_index([10] * 10, open_gop=False)
    (chunk,) = plan_chunks(index, (1, 5, 12, 71, 95), max_chunks=1)
    assert [segment.frame_indices for segment in chunk.segments] == [(1, 5, 12), (71,), (95,)]
    assert [segment.start_packet for segment in chunk.segments] == [0, 70, 90]
