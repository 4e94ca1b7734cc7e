"""Small seeded clips shared by the video tests (encoded once per process) and a plain reference decoder."""

from __future__ import annotations

import functools
import io

import av
import numpy as np

from spaceserve.multimodal.video.synthetic import make_clip

CLIP_KINDS = {
    "h264-closed": dict(codec="h264", open_gop=False),
    "h264-open": dict(codec="h264", open_gop=True),
    "hevc-open": dict(codec="hevc", open_gop=True),
    "hevc-closed": dict(codec="hevc", open_gop=False),
}


@functools.cache
def clip_bytes(kind: str, *, seconds: float = 6, gop: int = 24, seed: int = 7) -> bytes:
    buffer = io.BytesIO()
    make_clip(buffer, width=96, height=64, seconds=seconds, fps=24, gop=gop, bframes=3, seed=seed, **CLIP_KINDS[kind])
    return buffer.getvalue()


@functools.cache
def reference_frames(kind: str) -> np.ndarray:
    """Every frame, decoded from the first packet by a plain PyAV loop, in presentation order."""
    with av.open(io.BytesIO(clip_bytes(kind))) as container:
        frames = [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    frames.sort(key=lambda pair: pair[0])
    return np.stack([array for _, array in frames])


def random_indices(rng: np.random.Generator, num_frames: int) -> list[int]:
    count = int(rng.integers(1, num_frames + 1))
    return sorted(rng.choice(num_frames, size=count, replace=False).tolist())
