"""The `video` workload: one synthetic clip per request (PyAV-encoded, seeded moving content, never blank), its
resolution, duration and codec drawn from the buckets in VideoWorkloadOptions.

Encoding a long 1080p clip takes a while, so each distinct clip (resolution, duration, codec, fps, GOP, content seed)
is encoded once and kept on disk under `cache_dir`, its file name the parameters. Requests share those encodings
but never their bytes: each gets the clip plus a trailing MP4 `free` box carrying the request's seed and index, which
demuxers skip, so the frames are the clip's while the content hash (and so the processed-video, encoder and prefix
caches) sees a new video, as it would with distinct uploads. Every request holds its own copy of the bytes: memory is
about num_prompts x clip size.
"""

from __future__ import annotations

import os
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spaceserve.bench.workloads import (
    MediaItem,
    PromptTextMaker,
    RequestSpec,
    WorkloadOptions,
    register_workload,
    request_rng,
)

_TEXT_STREAM, _MEDIA_STREAM = 0, 1
RESOLUTIONS = {"480p": (854, 480), "720p": (1280, 720), "1080p": (1920, 1080)}
CODECS = ("h264", "hevc")
CLIP_FORMAT_VERSION = 1
"""Part of every cached clip's name: bump it when synthetic.make_clip's output changes."""


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "spaceserve-bench-clips")


def parse_resolutions(text: str) -> tuple[tuple[int, int], ...]:
    """`"480p,720p,1080p"` or WIDTHxHEIGHT items (even, >= 16) -> ((854, 480), ...) as (width, height)."""
    sizes = []
    for item in text.split(","):
        name = item.strip().lower()
        if name in RESOLUTIONS:
            sizes.append(RESOLUTIONS[name])
            continue
        width, sep, height = name.partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise ValueError(f"expected video resolutions like 480p,720p,1080p or WIDTHxHEIGHT, got {text!r}")
        sizes.append((int(width), int(height)))
    for width, height in sizes:
        if width % 2 or height % 2 or width < 16 or height < 16:
            raise ValueError(f"video resolutions must be even and at least 16x16, got {width}x{height}")
    return tuple(sizes)


def parse_durations(text: str) -> tuple[float, ...]:
    """`"10,30,60,120"` (seconds)."""
    try:
        durations = tuple(float(item) for item in text.split(","))
    except ValueError:
        raise ValueError(f"expected video durations in seconds like 10,60,120, got {text!r}") from None
    if any(not d > 0 for d in durations):
        raise ValueError(f"video durations must be > 0 seconds, got {text!r}")
    return durations


def parse_codecs(text: str) -> tuple[str, ...]:
    codecs = tuple(item.strip().lower() for item in text.split(","))
    unknown = [c for c in codecs if c not in CODECS]
    if unknown:
        raise ValueError(f"video codecs must be among {', '.join(CODECS)}, got {text!r}")
    return codecs


@dataclass(frozen=True)
class VideoWorkloadOptions:
    resolutions: tuple[tuple[int, int], ...] = (RESOLUTIONS["480p"], RESOLUTIONS["720p"], RESOLUTIONS["1080p"])
    durations_s: tuple[float, ...] = (10.0, 30.0, 60.0, 120.0)
    codecs: tuple[str, ...] = CODECS
    fps: int = 30
    gop: int = 60
    content_seed: int = 0
    """Seeds the clips' content; fixed across rate points (requests differ by their tags), so clips are encoded once."""
    cache_dir: str = field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        if not self.resolutions or not self.durations_s or not self.codecs:
            raise ValueError("the video workload needs at least one resolution, duration and codec")
        if self.fps < 1 or self.gop < 1:
            raise ValueError(f"video fps and gop must be >= 1, got fps={self.fps}, gop={self.gop}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "resolutions": [f"{w}x{h}" for w, h in self.resolutions],
            "durations_s": list(self.durations_s),
            "codecs": list(self.codecs),
            "fps": self.fps,
            "gop": self.gop,
            "content_seed": self.content_seed,
        }


@dataclass(frozen=True)
class ClipKey:
    width: int
    height: int
    duration_s: float
    codec: str

    def file_name(self, video: VideoWorkloadOptions) -> str:
        return (
            f"{self.codec}-{self.width}x{self.height}-{self.duration_s:g}s-{video.fps}fps-gop{video.gop}"
            f"-seed{video.content_seed}-v{CLIP_FORMAT_VERSION}.mp4"
        )


def clip_path(key: ClipKey, video: VideoWorkloadOptions) -> Path:
    """The cached clip for `key`, encoded now if it is not on disk yet (written atomically: concurrent benchmark
    processes may share the cache)."""
    path = Path(video.cache_dir) / key.file_name(video)
    if path.exists():
        return path
    from spaceserve.multimodal.video.synthetic import make_clip

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".mp4.partial", dir=path.parent)
    os.close(fd)
    try:
        make_clip(
            partial,
            width=key.width,
            height=key.height,
            seconds=key.duration_s,
            fps=video.fps,
            codec=key.codec,
            gop=video.gop,
            seed=video.content_seed,
        )
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def tagged(clip: bytes, seed: int, index: int) -> bytes:
    """The clip with a trailing MP4 `free` box naming (seed, index): the same frames, different bytes."""
    payload = b"spaceserve-bench" + struct.pack(">qq", seed, index)
    return clip + struct.pack(">I", 8 + len(payload)) + b"free" + payload


@register_workload("video")
def video_workload(options: WorkloadOptions, text_maker: PromptTextMaker) -> list[RequestSpec]:
    """One clip per request (resolution, duration and codec drawn per request), a short prompt, fixed output."""
    video = options.video or VideoWorkloadOptions()
    draws = []
    for index in range(options.num_requests):
        text_rng = request_rng(options.seed, index, _TEXT_STREAM)
        prompt_text = text_maker.make(options.prompt_len.draw(text_rng), text_rng)
        output_len = options.output_len.draw(text_rng)
        media_rng = request_rng(options.seed, index, _MEDIA_STREAM)
        width, height = video.resolutions[int(media_rng.integers(len(video.resolutions)))]
        duration = video.durations_s[int(media_rng.integers(len(video.durations_s)))]
        codec = video.codecs[int(media_rng.integers(len(video.codecs)))]
        draws.append((index, prompt_text, output_len, ClipKey(width, height, duration, codec)))
    keys = sorted({key for *_, key in draws}, key=lambda k: (k.codec, k.width, k.duration_s))
    # the encoders are multi-threaded themselves; a few clips at once keeps every core busy on small ones too
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(keys)))) as pool:
        paths = dict(zip(keys, pool.map(lambda key: clip_path(key, video), keys)))
    clips = {key: path.read_bytes() for key, path in paths.items()}
    return [
        RequestSpec(
            index=index,
            prompt_text=prompt_text,
            output_len=output_len,
            media=(MediaItem("video", tagged(clips[key], options.seed, index), "video/mp4", key.width, key.height),),
        )
        for index, prompt_text, output_len, key in draws
    ]
