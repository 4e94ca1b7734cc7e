"""What the schedulers know about a request's images and video chunks: where their tokens sit and how much work
they are.

A video is split along its temporal patches into chunks, one `MultiModalFeature` each, so the encoder and the LM
work on a video chunk by chunk while it is still being decoded: both vision towers attend only within a temporal
patch (Qwen2-VL per frame group; Qwen2.5-VL in windows inside it and in full blocks over it) and merge spatially,
so the embedding rows of temporal patches [t0, t1) of a video of grid (t, h, w) are exactly the rows of an item of
grid (t1 - t0, h, w), and the chunks' rows concatenate to the whole video's. A chunk's placeholder is its slice of
the video's `<|video_pad|>` run; M-RoPE positions are computed once for the whole video.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PlaceholderRange:
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class VideoChunk:
    """Where a chunk sits in its video: temporal patches [t_start, t_end) of `num_chunks` chunks."""

    video_hash: str
    """Content hash of the whole video (and its sampling settings): the chunks of one video share it."""
    index: int
    num_chunks: int
    t_start: int
    t_end: int


@dataclass(frozen=True)
class MultiModalFeature:
    """One image, or one chunk of a video, of a request, after preprocessing.

    `placeholder` is the span of its pad tokens in the expanded prompt; the encoder produces exactly
    `placeholder.length` embedding rows for it. `pixel_values` is opaque here (a tensor the encoder runner reads).
    """

    mm_hash: str
    modality: str
    placeholder: PlaceholderRange
    num_patches: int
    grid_thw: tuple[int, int, int]
    pixel_values: Any = None
    chunk: VideoChunk | None = None
    """Set for a video chunk."""
    inputs_pending: bool = False
    """True while the video stage is still decoding this chunk: the encoder scheduler keeps it queued (its patches
    count as remaining work) but does not run it until the engine hands over its pixel values."""

    @property
    def num_tokens(self) -> int:
        return self.placeholder.length


@dataclass(frozen=True)
class RawImage:
    """An image left for the engine core to preprocess on its device (large images on a GPU): the decoded uint8
    [H, W, 3] RGB pixels and the (height, width) the processor resizes them to."""

    rgb: Any
    height: int
    width: int
