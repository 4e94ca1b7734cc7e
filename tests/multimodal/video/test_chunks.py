"""Video chunks: the plan covers the temporal patches in order (1, 2, 4, ... up to the cap), each chunk's features
and cache key follow from the video's hash and its range, and a chunk preprocessed from its own frames is exactly
its slice of the whole video's rows (odd frame counts included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spaceserve.core.errors import InvalidInputError
from spaceserve.models.config import ImageProcessorConfig
from spaceserve.multimodal.video.chunks import plan_video_chunks, video_chunk_features, video_chunk_hash
from spaceserve.multimodal.video.processor import (
    VideoProcessingParams,
    chunk_frame_range,
    plan_video,
    preprocess_video,
    preprocess_video_chunk,
)

CFG = ImageProcessorConfig()


def test_chunks_start_with_one_patch_and_double_up_to_the_cap():
    assert plan_video_chunks(60, 180, 1024) == ((0, 1), (1, 3), (3, 7), (7, 12), (12, 17), (17, 22), (22, 27),
                                                (27, 32), (32, 37), (37, 42), (42, 47), (47, 52), (52, 57), (57, 60))
    assert plan_video_chunks(5, 10, 1000) == ((0, 1), (1, 3), (3, 5))
    assert plan_video_chunks(3, 500, 100) == ((0, 1), (1, 2), (2, 3))  # a chunk is at least one temporal patch
    assert plan_video_chunks(9, 4, 0) == ((0, 9),)  # unpipelined: the whole video


@pytest.mark.parametrize("seed", range(5))
def test_random_plans_cover_every_patch_once_in_order(seed):
    rng = np.random.default_rng(seed)
    grid_t, tokens, cap = int(rng.integers(1, 400)), int(rng.integers(1, 500)), int(rng.integers(1, 5000))
    ranges = plan_video_chunks(grid_t, tokens, cap)
    assert ranges[0][0] == 0 and ranges[-1][1] == grid_t
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all((end - start) * tokens <= max(cap, tokens) for start, end in ranges)


def test_features_split_the_placeholder_and_hash_the_range():
    ranges = plan_video_chunks(6, 4, 12)
    features = video_chunk_features("vid-hash", 10, (6, 4, 4), 2, ranges)
    assert [f.placeholder.offset for f in features] == [10, 14, 22]
    assert [f.num_tokens for f in features] == [4, 8, 12] and sum(f.num_tokens for f in features) == 6 * 4
    assert [f.grid_thw for f in features] == [(1, 4, 4), (2, 4, 4), (3, 4, 4)]
    assert [f.num_patches for f in features] == [16, 32, 48]
    assert all(f.inputs_pending and f.pixel_values is None and f.modality == "video" for f in features)
    assert [(f.chunk.index, f.chunk.num_chunks, f.chunk.t_start, f.chunk.t_end) for f in features] == [
        (0, 3, 0, 1), (1, 3, 1, 3), (2, 3, 3, 6)]
    assert features[1].mm_hash == video_chunk_hash("vid-hash", 1, 3)
    assert len({f.mm_hash for f in features}) == 3
    other = video_chunk_features("other-video", 10, (6, 4, 4), 2, ranges)
    assert not {f.mm_hash for f in features} & {f.mm_hash for f in other}


@pytest.mark.parametrize("seed", range(6))
def test_chunks_preprocessed_alone_are_slices_of_the_whole_video(seed):
    rng = np.random.default_rng(seed)
    num_frames = int(rng.integers(1, 12))
    frames = torch.from_numpy(rng.integers(0, 256, (num_frames, int(rng.integers(30, 90)), int(rng.integers(30, 90)), 3), dtype=np.uint8))
    plan = plan_video(num_frames, frames.shape[1], frames.shape[2], CFG, VideoProcessingParams(min_pixels=3136, max_pixels=16 * 784))
    whole = preprocess_video(frames, plan, CFG).pixel_values
    grid_t, grid_h, grid_w = plan.grid_thw
    rows_per_t = grid_h * grid_w
    for t_start, t_end in plan_video_chunks(grid_t, 1, int(rng.integers(1, 4))):
        first, end = chunk_frame_range(plan, CFG.temporal_patch_size, t_start, t_end)
        rows = preprocess_video_chunk(frames[first:end], plan, CFG, t_start, t_end)
        assert rows.equal(whole[t_start * rows_per_t : t_end * rows_per_t])


def test_a_chunk_needs_exactly_its_frames():
    plan = plan_video(5, 40, 40, CFG, VideoProcessingParams())
    assert chunk_frame_range(plan, 2, 2, 3) == (4, 5)  # the last temporal patch has one real frame
    with pytest.raises(InvalidInputError, match="2 frames for temporal patches"):
        preprocess_video_chunk(torch.zeros(2, 40, 40, 3, dtype=torch.uint8), plan, CFG, 2, 3)
    with pytest.raises(ValueError, match="not inside a grid of 3"):
        chunk_frame_range(plan, 2, 1, 4)
