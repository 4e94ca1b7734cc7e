"""Seeded synthetic workloads: a registry of builders that turn WorkloadOptions into RequestSpecs.

Every random draw comes from a generator seeded by (seed, request index, stream), so the same options always give
byte-identical requests, and `text-only` gets exactly the prompts and output lengths of `image-mix` without the
images. Media are encoded once (JPEG or PNG bytes) and reused by every backend and execution mode.

A new workload registers a builder with `@register_workload("name")` and returns RequestSpecs whose MediaItems carry
its modality; the backends turn any modality into `multi_modal_data[modality]` in-process and a `{modality}_url`
content part over HTTP. The `video` workload lives in video_workload.py.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from spaceserve.tokenizer.base import Tokenizer

if TYPE_CHECKING:
    from spaceserve.bench.video_workload import VideoWorkloadOptions

_TEXT_STREAM, _MEDIA_STREAM = 0, 1

# Plain words for synthetic prompts: each is one or a few tokens in Qwen's vocabulary and one token per byte in the
# byte-level fallback, so `num_tokens` words always give at least `num_tokens` tokens to cut down to size.
_WORDS = (
    "the of and to in is was for on that with as by at from his her they this which an be are not or have had one "
    "all their there when who more been some what if will would about out into than them time only could new these "
    "two may first any like now my such make over our even most after also made many did before must through back "
    "years where much your way well down should because each just those people how too little state good very world "
    "still own see men work long get here between both life being under never day same another know while last might "
    "great old year off come since against go came right used take three small place picture colour light river "
    "mountain window street garden table morning evening city water house music paper story question answer"
).split()


@dataclass(frozen=True)
class IntRange:
    """An inclusive range of integers drawn uniformly; `lo == hi` is a fixed value."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if self.lo < 0 or self.hi < self.lo:
            raise ValueError(f"expected 0 <= lo <= hi, got {self.lo}:{self.hi}")

    @classmethod
    def parse(cls, text: str | int) -> IntRange:
        """`"64"` or `"32:128"`."""
        lo_text, sep, hi_text = str(text).partition(":")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        except ValueError:
            raise ValueError(f"expected an integer or a lo:hi range, got {text!r}") from None
        return cls(lo, hi)

    def draw(self, rng: np.random.Generator) -> int:
        return self.lo if self.lo == self.hi else int(rng.integers(self.lo, self.hi + 1))

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}:{self.hi}"


def parse_image_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """`"448x448,896x672"` -> ((448, 448), (896, 672)) as (width, height)."""
    sizes = []
    for item in text.split(","):
        width, sep, height = item.strip().lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit()) or int(width) < 1 or int(height) < 1:
            raise ValueError(f"expected image sizes as WIDTHxHEIGHT[,WIDTHxHEIGHT...], got {text!r}")
        sizes.append((int(width), int(height)))
    return tuple(sizes)


@dataclass(frozen=True)
class WorkloadOptions:
    num_requests: int
    seed: int = 0
    image_sizes: tuple[tuple[int, int], ...] = ((448, 448), (896, 896), (1344, 1344))
    images_per_request: IntRange = IntRange(1, 1)
    prompt_len: IntRange = IntRange(64, 64)
    output_len: IntRange = IntRange(128, 128)
    image_format: str = "jpeg"
    video: VideoWorkloadOptions | None = None
    """The video workload's clips (None: its defaults); other workloads ignore it."""

    def __post_init__(self) -> None:
        if self.num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {self.num_requests}")
        if not self.image_sizes:
            raise ValueError("image_sizes must name at least one WIDTHxHEIGHT bucket")
        if self.output_len.lo < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")
        if self.image_format not in _IMAGE_MIME:
            raise ValueError(f"image_format must be one of {sorted(_IMAGE_MIME)}, got {self.image_format!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_requests": self.num_requests,
            "seed": self.seed,
            "image_sizes": [f"{w}x{h}" for w, h in self.image_sizes],
            "images_per_request": str(self.images_per_request),
            "prompt_len": str(self.prompt_len),
            "output_len": str(self.output_len),
            "image_format": self.image_format,
        } | ({} if self.video is None else {"video": self.video.as_dict()})


@dataclass(frozen=True)
class MediaItem:
    modality: str  # "image"; a video workload adds "video"
    data: bytes  # the encoded file, as a client would upload it
    mime_type: str
    width: int
    height: int


@dataclass(frozen=True)
class RequestSpec:
    """One benchmark request, independent of how it is sent: text, media in prompt order, fixed output length."""

    index: int
    prompt_text: str
    output_len: int
    media: tuple[MediaItem, ...] = field(default=())


class PromptTextMaker:
    """Random-word text of an exact token count under `tokenizer` (approximate, one word per token, without one)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer

    def make(self, num_tokens: int, rng: np.random.Generator) -> str:
        if num_tokens == 0:
            return ""
        text = " ".join(rng.choice(_WORDS, size=num_tokens))
        if self.tokenizer is None:
            return text
        return self.tokenizer.decode(self.tokenizer.encode(text)[:num_tokens])


WorkloadBuilder = Callable[[WorkloadOptions, PromptTextMaker], list[RequestSpec]]
WORKLOADS: dict[str, WorkloadBuilder] = {}


def register_workload(name: str) -> Callable[[WorkloadBuilder], WorkloadBuilder]:
    def register(builder: WorkloadBuilder) -> WorkloadBuilder:
        if name in WORKLOADS:
            raise ValueError(f"workload {name!r} is already registered")
        WORKLOADS[name] = builder
        return builder

    return register


def build_workload(name: str, options: WorkloadOptions, text_maker: PromptTextMaker) -> list[RequestSpec]:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(sorted(WORKLOADS))}")
    return WORKLOADS[name](options, text_maker)


def request_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The generator for one request's draws of one kind; builders use it so requests stay independent."""
    return np.random.default_rng([seed, index, stream])


@register_workload("image-mix")
def image_mix(options: WorkloadOptions, text_maker: PromptTextMaker) -> list[RequestSpec]:
    """One image per request, its size drawn from the buckets; a short prompt; fixed output length."""
    if options.images_per_request != IntRange(1, 1):
        raise ValueError("image-mix sends exactly one image per request; use the custom workload for other counts")
    return _build(options, text_maker, with_media=True)


@register_workload("text-only")
def text_only(options: WorkloadOptions, text_maker: PromptTextMaker) -> list[RequestSpec]:
    """image-mix's requests without their images: the decode baseline."""
    return _build(options, text_maker, with_media=False)


@register_workload("custom")
def custom(options: WorkloadOptions, text_maker: PromptTextMaker) -> list[RequestSpec]:
    """Image counts, sizes, prompt and output lengths all from the options (ranges drawn per request)."""
    return _build(options, text_maker, with_media=True)


# aspect-mix: photos, screenshots and scans in both orientations, 0-3 per request (weights below)
ASPECT_MIX_SIZES = ((640, 480), (480, 640), (1024, 768), (768, 1024), (1280, 720), (720, 1280), (1920, 1080),
                    (1080, 1920), (800, 1200), (1600, 900), (512, 384), (1400, 1050))
ASPECT_MIX_COUNTS = ((0, 0.2), (1, 0.4), (2, 0.25), (3, 0.15))
# multi-image-skew: most requests are light (one small image), a third are heavy (3-4 large ones)
SKEW_LIGHT_SIZES = ((448, 336), (336, 448), (448, 448), (560, 420))
SKEW_HEAVY_SIZES = ((1344, 1008), (1008, 1344), (1280, 1280), (1600, 1200))
SKEW_HEAVY_SHARE = 0.35


@register_workload("aspect-mix")
def aspect_mix(options: WorkloadOptions, text_maker: PromptTextMaker) -> list[RequestSpec]:
    """0-3 images per request (20/40/25/15%) of non-square sizes in both orientations, 384 to 1920 px; prompt and
    output lengths from the options. Meant with bursty arrivals (--burstiness 0.5). Its images are its own:
    --image-sizes and --images-per-request are refused."""
    _refuse_image_options(options, "aspect-mix")
    counts, weights = zip(*ASPECT_MIX_COUNTS)

    def images(rng: np.random.Generator) -> tuple[MediaItem, ...]:
        count = int(rng.choice(counts, p=weights))
        return tuple(_image(ASPECT_MIX_SIZES[int(rng.integers(len(ASPECT_MIX_SIZES)))], options, rng)
                     for _ in range(count))

    return _build(options, text_maker, with_media=True, media=images)


@register_workload("multi-image-skew")
def multi_image_skew(options: WorkloadOptions, text_maker: PromptTextMaker) -> list[RequestSpec]:
    """Where the encoder's order decides TTFT: 65% of requests carry one small image (about 200 image tokens), 35%
    carry 3-4 large ones (about 6000); with a small encoder budget (--encoder-budget-tokens) and bursty
    arrivals, FCFS makes light requests wait behind heavy ones that arrived just before them, TWSRFT does not.
    --image-sizes and --images-per-request are refused."""
    _refuse_image_options(options, "multi-image-skew")

    def images(rng: np.random.Generator) -> tuple[MediaItem, ...]:
        heavy = rng.random() < SKEW_HEAVY_SHARE
        sizes = SKEW_HEAVY_SIZES if heavy else SKEW_LIGHT_SIZES
        count = int(rng.integers(3, 5)) if heavy else 1
        return tuple(_image(sizes[int(rng.integers(len(sizes)))], options, rng) for _ in range(count))

    return _build(options, text_maker, with_media=True, media=images)


def _refuse_image_options(options: WorkloadOptions, name: str) -> None:
    defaults = WorkloadOptions(0)
    if options.image_sizes != defaults.image_sizes or options.images_per_request != defaults.images_per_request:
        raise ValueError(f"{name} draws its own image sizes and counts; use the custom workload to choose them")


def _build(
    options: WorkloadOptions,
    text_maker: PromptTextMaker,
    with_media: bool,
    media: Callable[[np.random.Generator], tuple[MediaItem, ...]] | None = None,
) -> list[RequestSpec]:
    """Requests from the options; `media` draws a request's images from its media generator (default: the
    options' count range and size buckets). The text draws never depend on the media, so every workload built
    here has text-only's prompts and output lengths."""

    def default_media(rng: np.random.Generator) -> tuple[MediaItem, ...]:
        count = options.images_per_request.draw(rng)
        return tuple(_random_image(options, rng) for _ in range(count))

    draw_media = media or default_media

    def build_one(index: int) -> RequestSpec:
        text_rng = request_rng(options.seed, index, _TEXT_STREAM)
        prompt_text = text_maker.make(options.prompt_len.draw(text_rng), text_rng)
        output_len = options.output_len.draw(text_rng)
        items: tuple[MediaItem, ...] = ()
        if with_media:
            items = draw_media(request_rng(options.seed, index, _MEDIA_STREAM))
        return RequestSpec(index=index, prompt_text=prompt_text, output_len=output_len, media=items)

    if not with_media or options.num_requests < 2:
        return [build_one(index) for index in range(options.num_requests)]
    # each request draws from its own generator, so building them in parallel (image encoding releases the GIL)
    # gives the same bytes as building them in order
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(build_one, range(options.num_requests)))


_IMAGE_MIME = {"jpeg": "image/jpeg", "png": "image/png"}


def _random_image(options: WorkloadOptions, rng: np.random.Generator) -> MediaItem:
    return _image(options.image_sizes[int(rng.integers(len(options.image_sizes)))], options, rng)


def _image(size: tuple[int, int], options: WorkloadOptions, rng: np.random.Generator) -> MediaItem:
    width, height = size
    pixels = smooth_noise(width, height, rng)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=options.image_format.upper(), **_SAVE_OPTIONS[options.image_format])
    return MediaItem("image", buffer.getvalue(), _IMAGE_MIME[options.image_format], width, height)


_SAVE_OPTIONS: dict[str, dict[str, Any]] = {"jpeg": {"quality": 90}, "png": {"compress_level": 1}}


def smooth_noise(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 picture: random colour blobs over a gradient with grain, drawn at a quarter of the size and
    upsampled (so a 1344x1344 image costs milliseconds): distinct, never blank, textured like a photograph."""
    small_w, small_h = max(1, width // 4), max(1, height // 4)
    grid = rng.integers(0, 256, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    blobs = np.asarray(Image.fromarray(grid).resize((small_w, small_h), Image.Resampling.BICUBIC), dtype=np.float32)
    ramp_x = np.linspace(0.0, 1.0, small_w, dtype=np.float32)[None, :, None]
    ramp_y = np.linspace(0.0, 1.0, small_h, dtype=np.float32)[:, None, None]
    direction = rng.uniform(-60.0, 60.0, size=(2, 3)).astype(np.float32)
    grain = rng.normal(0.0, 12.0, size=(small_h, small_w, 3)).astype(np.float32)
    small = np.clip(blobs + ramp_x * direction[0] + ramp_y * direction[1] + grain, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


def workload_names() -> Sequence[str]:
    return sorted(WORKLOADS)


from spaceserve.bench import video_workload  # noqa: E402,F401 - registers "video" (it builds on this module)
