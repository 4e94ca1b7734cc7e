"""A user's video (file path, encoded bytes, or already-sampled frames) -> the decode job for it, sized up front.

Only a probe runs here (the container's packets indexed, no frames decoded): it is enough to reject bad input with
a clear error and to know the video's token count and chunks, so the request's prompt can be expanded and the
request scheduled before its frames exist. The content is hashed here too (the chunks' cache keys derive from it);
the decode stage reuses the probe's packet index instead of demuxing again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

from spaceserve.config import VideoConfig
from spaceserve.core.errors import InvalidInputError
from spaceserve.models.config import ImageProcessorConfig
from spaceserve.multimodal.hashing import hash_video
from spaceserve.multimodal.video.chunks import plan_video_chunks
from spaceserve.multimodal.video.processor import VideoPlan, VideoProcessingParams, plan_video
from spaceserve.multimodal.video.sampling import VideoSamplingParams, sample_frame_indices, sampled_fps
from spaceserve.multimodal.video.stage import VideoWork

VIDEO_KWARGS = {
    "fps",
    "num_frames",
    "min_frames",
    "max_frames",
    "do_sample_frames",
    "min_pixels",
    "max_pixels",
    "max_video_tokens",
}
DEFAULT_FRAMES_FPS = 2.0
"""Frame rate assumed for given frames when mm_processor_kwargs has no fps (the rate they were sampled at)."""


@dataclass(frozen=True)
class VideoSettings:
    sampling: VideoSamplingParams
    processing: VideoProcessingParams
    do_sample_frames: bool  # for given frames; files and bytes are always sampled

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], temporal_patch_size: int) -> VideoSettings:
        def pick(dataclass_type: type, **extra: Any) -> dict[str, Any]:
            names = {f.name for f in fields(dataclass_type)}
            return {k: v for k, v in kwargs.items() if k in names} | extra

        try:
            sampling = VideoSamplingParams(**pick(VideoSamplingParams, temporal_patch_size=temporal_patch_size))
            processing = VideoProcessingParams(**pick(VideoProcessingParams))
        except TypeError as exc:
            raise InvalidInputError(f"bad video mm_processor_kwargs: {exc}") from None
        return cls(sampling, processing, bool(kwargs.get("do_sample_frames", False)))


@dataclass(frozen=True)
class ResolvedVideo:
    work: VideoWork
    second_per_grid_t: float

    @property
    def plan(self) -> VideoPlan:
        return self.work.plan


def resolve_video(
    video: Any, settings: VideoSettings, cfg: ImageProcessorConfig, video_config: VideoConfig
) -> ResolvedVideo:
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if not os.path.isfile(path):
            raise InvalidInputError(f"video file not found: {path}")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise InvalidInputError(f"cannot read video file {path}: {exc.strerror or exc}") from None
        if not data:
            raise InvalidInputError(f"video file is empty (0 bytes): {path}")
        return _resolve_encoded(data, settings, cfg, video_config)
    if isinstance(video, (bytes, bytearray, memoryview)):
        data = bytes(video)
        if not data:
            raise InvalidInputError("video bytes are empty")
        return _resolve_encoded(data, settings, cfg, video_config)
    return _resolve_frames(_frames_tensor(video), settings, cfg, video_config)


def _resolve_encoded(
    data: bytes, settings: VideoSettings, cfg: ImageProcessorConfig, video_config: VideoConfig
) -> ResolvedVideo:
    from spaceserve.multimodal.video.decode import index_video

    video = index_video(data)
    meta = video.metadata
    if meta.fps is None or not math.isfinite(meta.fps) or meta.fps <= 0:
        raise InvalidInputError(f"video has an unknown or zero frame rate ({meta.fps})")
    if meta.num_frames is None or meta.num_frames < 1:
        raise InvalidInputError("video has no frames")
    duration = meta.duration_s if meta.duration_s else meta.num_frames / meta.fps
    if duration > video_config.max_duration_s:
        raise InvalidInputError(
            f"video is {duration:.1f} s long, longer than the allowed {video_config.max_duration_s:g} s"
        )
    _check_requested_frames(settings.sampling)
    indices = sample_frame_indices(meta.num_frames, meta.fps, settings.sampling)
    plan = plan_video(len(indices), meta.height, meta.width, cfg, settings.processing)
    rate = sampled_fps(meta.num_frames, meta.fps, len(indices))
    mm_hash = hash_video(data, "bytes", **dict(_settings_key(settings, indices)))
    work = VideoWork(video, tuple(indices), plan, mm_hash, _chunks(plan, video_config))
    return ResolvedVideo(work, cfg.temporal_patch_size / rate)


def _resolve_frames(
    frames: torch.Tensor, settings: VideoSettings, cfg: ImageProcessorConfig, video_config: VideoConfig
) -> ResolvedVideo:
    total = frames.shape[0]
    indices: list[int] | None = None
    if settings.do_sample_frames:
        if settings.sampling.num_frames is None:
            raise InvalidInputError("sampling given frames needs num_frames in mm_processor_kwargs (they carry no fps)")
        _check_requested_frames(settings.sampling)
        indices = sample_frame_indices(total, None, settings.sampling)
    elif total > settings.sampling.max_frames:
        raise InvalidInputError(
            f"{total} frames given, more than the allowed max_frames={settings.sampling.max_frames}; "
            "pass fewer or set do_sample_frames with num_frames"
        )
    count = total if indices is None else len(indices)
    plan = plan_video(count, frames.shape[1], frames.shape[2], cfg, settings.processing)
    frames_fps = settings.sampling.fps or DEFAULT_FRAMES_FPS
    shape = "x".join(str(d) for d in frames.shape)
    content = memoryview(frames.numpy()).cast("B")
    mm_hash = hash_video(content, f"frames:{shape}", **dict(_settings_key(settings, indices)))
    chunks = _chunks(plan, video_config)
    work = VideoWork(frames, None if indices is None else tuple(indices), plan, mm_hash, chunks)
    return ResolvedVideo(work, cfg.temporal_patch_size / frames_fps)


def _chunks(plan: VideoPlan, video_config: VideoConfig) -> tuple[tuple[int, int], ...]:
    grid_t, grid_h, grid_w = plan.grid_thw
    return plan_video_chunks(grid_t, grid_h * grid_w // plan.merge_size**2, video_config.chunk_tokens)


def _check_requested_frames(sampling: VideoSamplingParams) -> None:
    if sampling.num_frames is not None and sampling.num_frames > sampling.max_frames:
        raise InvalidInputError(
            f"num_frames={sampling.num_frames} is more frames than the allowed max_frames={sampling.max_frames}"
        )


def _settings_key(settings: VideoSettings, indices: list[int] | None) -> tuple[tuple[str, Any], ...]:
    processing = settings.processing
    return (
        ("frame_indices", None if indices is None else ",".join(map(str, indices))),
        ("min_pixels", processing.min_pixels),
        ("max_pixels", processing.max_pixels),
        ("max_video_tokens", processing.max_video_tokens),
    )


def _frames_tensor(video: Any) -> torch.Tensor:
    """Given frames (a list of PIL images / HxWx3 arrays, or a TxHxWx3 array or tensor) -> uint8 [T, H, W, 3]."""
    if isinstance(video, torch.Tensor):
        frames = video.detach().cpu()
        if frames.dtype != torch.uint8:
            raise InvalidInputError(f"video frames must be uint8, got {frames.dtype}")
    elif isinstance(video, np.ndarray):
        frames = torch.from_numpy(_uint8_frames(video))
    elif isinstance(video, (list, tuple)):
        if not video:
            raise InvalidInputError("a video given as frames needs at least one frame")
        arrays = [_frame_array(frame, i) for i, frame in enumerate(video)]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise InvalidInputError(f"video frames differ in size: {sorted(shapes)}")
        frames = torch.from_numpy(np.stack(arrays))
    else:
        raise InvalidInputError(
            f"a video is a path, bytes, a list of frames or a TxHxWx3 array, got {type(video).__name__}"
        )
    if frames.dim() != 4 or frames.shape[-1] != 3 or min(frames.shape) < 1:
        raise InvalidInputError(f"video frames must have shape [T, H, W, 3], got {tuple(frames.shape)}")
    return frames.contiguous()


def _frame_array(frame: Any, index: int) -> np.ndarray:
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise InvalidInputError(f"frame {index} must have shape [H, W, 3], got {frame.shape}")
        return _uint8_frames(frame)
    raise InvalidInputError(f"frame {index} is a {type(frame).__name__}; frames are PIL images or HxWx3 arrays")


def _uint8_frames(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InvalidInputError(f"video frames must be uint8, got dtype {array.dtype}")
    return np.ascontiguousarray(array)
