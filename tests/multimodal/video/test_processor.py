"""Video preprocessing equals transformers' Qwen2VLVideoProcessor steps on random frames (sizes, frame counts,
odd counts padded), the whole-video pixel budget follows its cap_pixels_per_frame rule, and the plan made before
decoding matches what preprocessing produces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spaceserve.core.errors import InvalidInputError
from spaceserve.models.config import ImageProcessorConfig
from spaceserve.multimodal.image import smart_resize
from spaceserve.multimodal.video.processor import VideoProcessingParams, plan_video, preprocess_video
from tests.engine.parity import reference_video_inputs

CFG = ImageProcessorConfig()


@pytest.mark.parametrize("seed", range(6))
def test_random_videos_match_the_reference_pipeline(seed):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (int(rng.integers(1, 8)), int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3))
    frames = frames.astype(np.uint8)
    params = VideoProcessingParams(min_pixels=int(rng.integers(1, 8)) * 784, max_pixels=int(rng.integers(8, 30)) * 784)
    plan = plan_video(frames.shape[0], frames.shape[1], frames.shape[2], CFG, params)
    processed = preprocess_video(torch.from_numpy(frames), plan, CFG)
    rows, grid = reference_video_inputs(frames, params.min_pixels, params.max_pixels)
    assert list(processed.grid_thw) == grid
    assert processed.pixel_values.shape == (plan.num_patches, 3 * 2 * 14 * 14)
    assert processed.pixel_values.equal(rows)


def test_default_limits_upscale_small_frames_like_transformers():
    plan = plan_video(4, 48, 64, CFG, VideoProcessingParams())
    assert (plan.resized_height, plan.resized_width) == smart_resize(48, 64, 28, 128 * 28 * 28, 768 * 28 * 28)
    assert plan.resized_height * plan.resized_width >= 128 * 28 * 28


@pytest.mark.parametrize("num_frames", [4, 64, 768])
def test_whole_video_budget_shrinks_frames_of_long_videos(num_frames):
    params = VideoProcessingParams(max_video_tokens=2048)
    plan = plan_video(num_frames, 720, 1280, CFG, params)
    share = max(min(params.max_pixels, int(2048 * 28 * 28 * 0.9) * 2 // num_frames), int(params.min_pixels * 1.05))
    assert (plan.resized_height, plan.resized_width) == smart_resize(720, 1280, 28, params.min_pixels, share)
    uncapped = plan_video(num_frames, 720, 1280, CFG, VideoProcessingParams())
    assert plan.num_tokens <= uncapped.num_tokens


def test_frames_must_match_the_plan():
    plan = plan_video(4, 30, 30, CFG, VideoProcessingParams())
    with pytest.raises(InvalidInputError, match="plan expects 4"):
        preprocess_video(torch.zeros(3, 30, 30, 3, dtype=torch.uint8), plan, CFG)
    with pytest.raises(InvalidInputError, match="uint8"):
        preprocess_video(torch.zeros(4, 30, 30, 3), plan, CFG)
