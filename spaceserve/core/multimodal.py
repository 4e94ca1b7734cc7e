"""What the schedulers know about a request's images: where their tokens sit and how much work they are."""

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
class MultiModalFeature:
    """One image (or video) of a request, after preprocessing.

    `placeholder` is the span of its `<|image_pad|>` tokens in the expanded prompt; the encoder produces exactly
    `placeholder.length` embedding rows for it. `pixel_values` is opaque here (a tensor the encoder runner reads).
    """

    mm_hash: str
    modality: str
    placeholder: PlaceholderRange
    num_patches: int
    grid_thw: tuple[int, int, int]
    pixel_values: Any = None

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
