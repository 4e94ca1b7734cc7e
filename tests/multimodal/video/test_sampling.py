"""Frame sampling follows transformers' Qwen2-VL rule: fps-based count clamped to [min_frames, max_frames] and
the clip length, rounded down to whole temporal patches, evenly spaced from frame 0."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spaceserve.core.errors import InvalidInputError
from spaceserve.multimodal.video.sampling import (
    VideoSamplingParams,
    num_sampled_frames,
    sample_frame_indices,
    sampled_fps,
)


def _expected_count(total: int, fps: float, params: VideoSamplingParams) -> int:
    patch = params.temporal_patch_size
    wanted = min(max(total / fps * params.fps, params.min_frames), params.max_frames, total)
    return math.floor(wanted / patch) * patch


@pytest.mark.parametrize("seed", range(20))
def test_random_clips_sample_an_even_evenly_spaced_count(seed):
    rng = np.random.default_rng(seed)
    total = int(rng.integers(2, 5000))
    fps = float(rng.choice([23.976, 24, 25, 29.97, 30, 50, 60]))
    params = VideoSamplingParams(fps=float(rng.uniform(0.2, 4)), min_frames=4, max_frames=int(rng.integers(4, 800)))
    indices = sample_frame_indices(total, fps, params)
    count = _expected_count(total, fps, params)
    assert num_sampled_frames(total, fps, params) == count
    assert len(indices) == count
    assert indices[0] == 0 and indices == sorted(set(indices)) and indices[-1] < total
    step = total / len(indices)
    assert all(abs(index - math.floor(i * step)) <= 1 for i, index in enumerate(indices))


def test_two_fps_default_on_a_four_second_thirty_fps_clip():
    indices = sample_frame_indices(120, 30.0, VideoSamplingParams())
    assert indices == list(range(0, 120, 15))
    assert sampled_fps(120, 30.0, len(indices)) == 2.0


def test_short_clip_is_raised_to_min_frames_but_not_past_its_length():
    assert len(sample_frame_indices(30, 30.0, VideoSamplingParams())) == 4  # 1 s at 2 fps = 2, min_frames 4
    assert sample_frame_indices(3, 30.0, VideoSamplingParams()) == [0, 1]  # only 3 frames: one temporal patch


def test_num_frames_overrides_fps():
    indices = sample_frame_indices(100, None, VideoSamplingParams(num_frames=11))
    assert len(indices) == 12 and indices[:3] == [0, 8, 16]


@pytest.mark.parametrize(
    ("total", "fps", "params", "message"),
    [
        (1, 30.0, VideoSamplingParams(), "at least 2"),
        (100, 0.0, VideoSamplingParams(), "unknown or zero frame rate"),
        (100, None, VideoSamplingParams(), "unknown or zero frame rate"),
        (10, 30.0, VideoSamplingParams(num_frames=20), "only 10"),
    ],
)
def test_unsamplable_clips_raise(total, fps, params, message):
    with pytest.raises(InvalidInputError, match=message):
        sample_frame_indices(total, fps, params)


@pytest.mark.parametrize(
    "kwargs", [{"fps": 0}, {"fps": float("nan")}, {"min_frames": 9, "max_frames": 4}, {"num_frames": 0}]
)
def test_bad_settings_raise(kwargs):
    with pytest.raises(InvalidInputError):
        VideoSamplingParams(**kwargs)


def test_float32_spacing_never_adds_an_index_past_the_count():
    # transformers' float32 arange yields 59 indices here, the last one 4479: one past the final frame
    params = VideoSamplingParams(fps=3.4501495567418243, max_frames=59)
    indices = sample_frame_indices(4479, 60.0, params)
    assert len(indices) == num_sampled_frames(4479, 60.0, params) == 58 and indices[-1] < 4479
