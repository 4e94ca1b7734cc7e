"""Which frames of a video the model sees: transformers' Qwen2-VL ``sample_frames`` rule.

With ``fps`` set (default 2), a clip of N frames at F frames/s yields N / F * fps frames, clamped to
[min_frames, min(max_frames, N)] and rounded down to a multiple of the temporal patch size; ``num_frames`` asks for
a fixed count instead. Indices are spaced evenly from frame 0, computed with the same float32 ``torch.arange`` as
transformers so the chosen frames are the same ones. One intended difference: float32 spacing occasionally
yields one index more than the count (sometimes equal to the frame count, past the last frame, where transformers
then fails); we keep the first `count` indices, so the count stays a whole number of temporal patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spaceserve.core.errors import InvalidInputError


@dataclass(frozen=True)
class VideoSamplingParams:
    fps: float | None = 2.0
    """Frames per second of video to sample; ignored when num_frames is set."""
    num_frames: int | None = None
    min_frames: int = 4
    max_frames: int = 768
    temporal_patch_size: int = 2

    def __post_init__(self) -> None:
        if self.num_frames is not None and self.num_frames < 1:
            raise InvalidInputError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.num_frames is None and (self.fps is None or not math.isfinite(self.fps) or self.fps <= 0):
            raise InvalidInputError(f"sampling fps must be a positive number, got {self.fps}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise InvalidInputError(
                f"need 1 <= min_frames <= max_frames, got min_frames={self.min_frames}, max_frames={self.max_frames}"
            )
        if self.temporal_patch_size < 1:
            raise InvalidInputError(f"temporal_patch_size must be >= 1, got {self.temporal_patch_size}")


def num_sampled_frames(total_num_frames: int, video_fps: float | None, params: VideoSamplingParams) -> int:
    """How many frames `sample_frame_indices` picks; raises InvalidInputError when the clip can't be sampled."""
    patch = params.temporal_patch_size
    if total_num_frames < patch:
        raise InvalidInputError(
            f"video has {total_num_frames} frame(s); at least {patch} are needed for one temporal patch"
        )
    if params.num_frames is not None:
        count = round(params.num_frames / patch) * patch
    else:
        if video_fps is None or not math.isfinite(video_fps) or video_fps <= 0:
            raise InvalidInputError(f"video has an unknown or zero frame rate ({video_fps}); cannot sample by fps")
        max_frames = math.floor(min(params.max_frames, total_num_frames) / patch) * patch
        count = total_num_frames / video_fps * params.fps
        count = min(max(count, params.min_frames), max_frames, total_num_frames)
        count = math.floor(count / patch) * patch
    if count < 1:
        raise InvalidInputError(f"sampling settings give {count} frames; ask for at least {patch}")
    if count > total_num_frames:
        raise InvalidInputError(f"asked for {count} frames but the video has only {total_num_frames}")
    return count


def sample_frame_indices(total_num_frames: int, video_fps: float | None, params: VideoSamplingParams) -> list[int]:
    """Indices (ascending) of the frames to decode, as transformers' Qwen2VLVideoProcessor.sample_frames."""
    count = num_sampled_frames(total_num_frames, video_fps, params)
    return torch.arange(0, total_num_frames, total_num_frames / count).int()[:count].tolist()


def sampled_fps(total_num_frames: int, video_fps: float, num_indices: int) -> float:
    """Frame rate of the sampled frames (transformers' VideoMetadata.sampled_fps); sets Qwen2.5-VL's time axis."""
    return num_indices / total_num_frames * video_fps
