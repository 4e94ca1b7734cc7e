"""A request's mm_processor_kwargs, checked before any work: known keys, values of the right type, and pixel and
frame settings within the server's own limits (one request once asked for 10^12 pixels per image). The limits are
the server's settings: its own mm_processor_kwargs where it sets them, else the model's preprocessor maximum for
images and the video processor's defaults for video frames."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spaceserve.config import EngineConfig
from spaceserve.core.errors import InvalidInputError
from spaceserve.multimodal.video.inputs import VIDEO_KWARGS
from spaceserve.multimodal.video.processor import VideoProcessingParams
from spaceserve.multimodal.video.sampling import VideoSamplingParams

_INT_KEYS = ("num_frames", "min_frames", "max_frames", "min_pixels", "max_pixels", "max_video_tokens")


@dataclass(frozen=True)
class MMProcessorLimits:
    image_max_pixels: int
    video_max_pixels: int
    max_frames: int

    @classmethod
    def from_config(cls, config: EngineConfig) -> MMProcessorLimits:
        server = config.video.processor_kwargs
        return cls(
            image_max_pixels=int(server.get("max_pixels", config.image_config.max_pixels)),
            video_max_pixels=int(server.get("max_pixels", VideoProcessingParams().max_pixels)),
            max_frames=int(server.get("max_frames", VideoSamplingParams().max_frames)),
        )


def check_mm_processor_kwargs(
    kwargs: Any, limits: MMProcessorLimits, *, has_images: bool, has_videos: bool
) -> dict[str, Any]:
    """The kwargs as a dict, or InvalidInputError naming the first key that is unknown, mistyped or beyond the
    server's limits for the media the request carries."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise InvalidInputError("'mm_processor_kwargs' must be a dict")
    unknown = set(kwargs) - VIDEO_KWARGS
    if unknown:
        raise InvalidInputError(f"unsupported mm_processor_kwargs {sorted(map(str, unknown))}")
    for key in _INT_KEYS:
        if key in kwargs and kwargs[key] is not None:
            value = kwargs[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"mm_processor_kwargs {key} must be a positive integer, got {value!r}")
    if "fps" in kwargs and kwargs["fps"] is not None:
        fps = kwargs["fps"]
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise InvalidInputError(f"mm_processor_kwargs fps must be a positive number, got {fps!r}")
    if "do_sample_frames" in kwargs and not isinstance(kwargs["do_sample_frames"], bool):
        raise InvalidInputError(f"mm_processor_kwargs do_sample_frames must be true or false, got {kwargs['do_sample_frames']!r}")
    for key in ("min_pixels", "max_pixels"):
        value = kwargs.get(key)
        if value is None:
            continue
        if has_images and value > limits.image_max_pixels:
            raise InvalidInputError(
                f"mm_processor_kwargs {key}={value} exceeds the limit of {limits.image_max_pixels} pixels per image "
                "(the engine's --mm-processor-kwargs, else the model's maximum)"
            )
        if has_videos and value > limits.video_max_pixels:
            raise InvalidInputError(
                f"mm_processor_kwargs {key}={value} exceeds the limit of {limits.video_max_pixels} pixels per video "
                "frame (the engine's --mm-processor-kwargs, else the video processor's default)"
            )
    if kwargs.get("min_pixels") is not None and kwargs.get("max_pixels") is not None:
        if kwargs["min_pixels"] > kwargs["max_pixels"]:
            raise InvalidInputError("mm_processor_kwargs min_pixels exceeds max_pixels")
    if has_videos:
        for key in ("num_frames", "min_frames", "max_frames"):
            value = kwargs.get(key)
            if value is not None and value > limits.max_frames:
                raise InvalidInputError(
                    f"mm_processor_kwargs {key}={value} is more frames than the allowed max_frames={limits.max_frames} "
                    "(the engine's limit)"
                )
    return dict(kwargs)
