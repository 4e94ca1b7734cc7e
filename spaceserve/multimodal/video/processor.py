"""Sampled video frames -> Qwen2-VL vision-encoder input (pixel_values_videos rows and video_grid_thw).

Follows transformers 5.17's ``Qwen2VLVideoProcessor`` step for step: every frame of a video is resized to one
``smart_resize`` size (per-frame min/max pixels, optionally capped by an even share of a whole-video budget as its
``cap_pixels_per_frame`` does), bicubic with antialiasing through the same torch kernel torchvision calls on that
device (uint8 on the CPU; float32 then clamp and round elsewhere), rescaled and normalised with the fused float32
mean/std, padded to a whole number of temporal patches by repeating the last frame, and cut into patches ordered
merge window by merge window. Runs wherever the frames are, so frames decoded on the GPU stay there.

The resize sizes depend only on the frame size and count, so `plan_video` can size a request (its token count)
from a probe, before any frame is decoded. Every step works frame by frame and rows come out temporal patch by
temporal patch, so a chunk of temporal patches is preprocessed from its own frames alone (`preprocess_video_chunk`)
into exactly its slice of the whole video's rows: the decode stage preprocesses each chunk as soon as it is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from spaceserve.core.errors import InvalidInputError
from spaceserve.models.config import ImageProcessorConfig
from spaceserve.multimodal.image import smart_resize


@dataclass(frozen=True)
class VideoProcessingParams:
    """Per-frame pixel limits, as transformers' video processor defaults (``size`` shortest/longest edge)."""

    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    max_video_tokens: int | None = None
    """Set: each frame also gets at most an even share of 0.9 * max_video_tokens tokens' worth of pixels (floored at
    1.05 * min_pixels), transformers' ``cap_pixels_per_frame=True`` / qwen-vl-utils' VIDEO_TOTAL_PIXELS. None: no
    whole-video budget, transformers 5.17's default."""

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise InvalidInputError(
                f"need 0 < min_pixels <= max_pixels, got min_pixels={self.min_pixels}, max_pixels={self.max_pixels}"
            )
        if self.max_video_tokens is not None and self.max_video_tokens < 1:
            raise InvalidInputError(f"max_video_tokens must be >= 1, got {self.max_video_tokens}")


@dataclass(frozen=True)
class VideoPlan:
    """The shape a video takes through preprocessing, known before decoding."""

    num_frames: int  # sampled frames, before padding to whole temporal patches
    resized_height: int
    resized_width: int
    grid_thw: tuple[int, int, int]
    merge_size: int

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    @property
    def num_tokens(self) -> int:
        return self.num_patches // self.merge_size**2


@dataclass(frozen=True)
class ProcessedVideo:
    pixel_values: torch.Tensor  # float32 [grid_t*grid_h*grid_w, 3 * temporal_patch_size * patch_size**2]
    plan: VideoPlan

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        return self.plan.grid_thw


def plan_video(
    num_frames: int, height: int, width: int, cfg: ImageProcessorConfig, params: VideoProcessingParams
) -> VideoPlan:
    if num_frames < 1 or height < 1 or width < 1:
        raise InvalidInputError(f"video of {num_frames} frames of {width}x{height} has nothing to process")
    factor = cfg.factor
    max_pixels = params.max_pixels
    if params.max_video_tokens is not None:
        total_pixels = int(params.max_video_tokens * factor * factor * 0.9)
        max_pixels = max(
            min(max_pixels, total_pixels * cfg.temporal_patch_size // num_frames), int(params.min_pixels * 1.05)
        )
    resized_height, resized_width = smart_resize(height, width, factor, params.min_pixels, max_pixels)
    grid_t = -(-num_frames // cfg.temporal_patch_size)
    grid_thw = (grid_t, resized_height // cfg.patch_size, resized_width // cfg.patch_size)
    return VideoPlan(num_frames, resized_height, resized_width, grid_thw, cfg.merge_size)


def preprocess_video(frames: torch.Tensor, plan: VideoPlan, cfg: ImageProcessorConfig) -> ProcessedVideo:
    """uint8 [T, H, W, 3] frames (any device) -> ProcessedVideo on the same device."""
    _check_frames(frames)
    if frames.shape[0] != plan.num_frames:
        raise InvalidInputError(f"got {frames.shape[0]} frames, the plan expects {plan.num_frames}")
    return ProcessedVideo(pixel_values=preprocess_video_chunk(frames, plan, cfg, 0, plan.grid_thw[0]), plan=plan)


def chunk_frame_range(plan: VideoPlan, temporal_patch_size: int, t_start: int, t_end: int) -> tuple[int, int]:
    """The sampled frames [first, end) behind temporal patches [t_start, t_end): a whole number of temporal patches,
    except that the last chunk ends at the last frame there is (its last patch repeats that frame)."""
    if not 0 <= t_start < t_end <= plan.grid_thw[0]:
        raise ValueError(f"temporal patches [{t_start}, {t_end}) are not inside a grid of {plan.grid_thw[0]}")
    return t_start * temporal_patch_size, min(t_end * temporal_patch_size, plan.num_frames)


def preprocess_video_chunk(
    frames: torch.Tensor, plan: VideoPlan, cfg: ImageProcessorConfig, t_start: int, t_end: int
) -> torch.Tensor:
    """The pixel-value rows of temporal patches [t_start, t_end) from that chunk's frames (`chunk_frame_range`):
    exactly rows [t_start * h * w, t_end * h * w) of the whole video's, since every step works frame by frame and
    rows are ordered temporal patch first."""
    _check_frames(frames)
    first, end = chunk_frame_range(plan, cfg.temporal_patch_size, t_start, t_end)
    if frames.shape[0] != end - first:
        raise InvalidInputError(
            f"got {frames.shape[0]} frames for temporal patches [{t_start}, {t_end}), the plan gives {end - first}"
        )
    channels_first = frames.permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W], the layout transformers resizes
    resized = resize_frames(channels_first, plan.resized_height, plan.resized_width)
    table = _normalization_table(cfg.image_mean, cfg.image_std).to(resized.device)
    channel_offsets = torch.arange(3, device=resized.device).view(1, 3, 1, 1) * 256
    normalized = table.view(-1)[resized.long() + channel_offsets]  # float32 [T, 3, h, w]
    if pad := (t_end - t_start) * cfg.temporal_patch_size - normalized.shape[0]:
        normalized = torch.cat([normalized, normalized[-1:].expand(pad, -1, -1, -1)])
    return _patchify_video(normalized, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)


def _check_frames(frames: torch.Tensor) -> None:
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise InvalidInputError(
            f"expected uint8 frames of shape [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}"
        )


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize of uint8 [T, 3, H, W] as torchvision's tensor ``resize`` does it on this device."""
    if frames.shape[-2:] == (height, width):
        return frames
    if frames.device.type == "cpu":
        # torchvision keeps uint8 on the CPU: torch's native uint8 antialiased kernel.
        return F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    resized = F.interpolate(
        frames.to(torch.float32), size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return resized.clamp_(0, 255).round_().to(torch.uint8)


def _patchify_video(frames: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """[T, C, H, W] -> [grid_t*grid_h*grid_w, C*temporal*patch*patch], the row order of transformers' patchify."""
    num_frames, channels, height, width = frames.shape
    grid_t, grid_h, grid_w = num_frames // temporal, height // patch, width // patch
    patches = frames.reshape(grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    # -> (t, block row, block col, row in block, col in block, channel, frame in patch, pixel row, pixel col)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch)


@lru_cache(maxsize=8)
def _normalization_table(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[3, 256] float32: each uint8 level after transformers' fused rescale+normalise, (x - mean*255) / (std*255)."""
    rescale_factor = 1 / 255
    mean255 = torch.tensor(mean) * (1.0 / rescale_factor)
    std255 = torch.tensor(std) * (1.0 / rescale_factor)
    levels = torch.arange(256, dtype=torch.float32)
    return (levels.view(1, -1) - mean255.view(-1, 1)) / std255.view(-1, 1)
