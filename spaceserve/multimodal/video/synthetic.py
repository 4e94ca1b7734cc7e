"""Seeded synthetic clips for tests and benchmarks, encoded with PyAV's bundled libx264 / libx265.

Content moves and is never blank: a diagonal colour gradient scrolling at a seeded speed, plus noise blocks
(different per seed) wandering across it, so every frame differs from its neighbours and motion compensation has
real work to do. GOPs have a fixed length (keyframe every `gop` frames, scene-cut detection off); `open_gop`
selects x264's --open-gop / x265's CRA open GOPs with B-frames, closed GOPs otherwise.
"""

from __future__ import annotations

import io
import os

import av
import numpy as np

ENCODERS = {"h264": "libx264", "hevc": "libx265"}
_NUM_BLOCKS = 6


def make_clip(
    path_or_buffer: str | os.PathLike[str] | io.BytesIO,
    *,
    width: int,
    height: int,
    seconds: float,
    fps: int = 30,
    codec: str = "h264",
    gop: int = 60,
    open_gop: bool = False,
    bframes: int = 2,
    seed: int = 0,
    preset: str = "veryfast",
    crf: int = 23,
) -> int:
    """Encode a clip into an MP4 file or buffer; returns the number of frames written."""
    if codec not in ENCODERS:
        raise ValueError(f"codec must be one of {sorted(ENCODERS)}, got {codec!r}")
    if width % 2 or height % 2 or width < 16 or height < 16:
        raise ValueError(f"width and height must be even and >= 16, got {width}x{height}")
    num_frames = max(1, round(seconds * fps))
    params = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:open-gop={int(open_gop)}"
    if codec == "hevc":
        params += ":log-level=error"
    options = {"preset": preset, "crf": str(crf), f"{'x264' if codec == 'h264' else 'x265'}-params": params}
    target = path_or_buffer if isinstance(path_or_buffer, io.BytesIO) else os.fspath(path_or_buffer)
    frames = _FramePainter(width, height, seed)
    with av.open(target, mode="w", format="mp4") as container:
        stream = container.add_stream(ENCODERS[codec], rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frames.paint(i), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return num_frames


class _FramePainter:
    def __init__(self, width: int, height: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.width, self.height = width, height
        self.speed = rng.integers(2, 9, size=2)
        y, x = np.mgrid[0 : 2 * height, 0 : 2 * width]
        phase = rng.integers(0, 256, size=3)
        # A canvas twice the frame size; each frame is a window sliding over it (wrapping).
        self.canvas = np.stack(
            [(x * 256 // (2 * width) + phase[0]) % 256, (y * 256 // (2 * height) + phase[1]) % 256,
             ((x + y) * 128 // (width + height) + phase[2]) % 256],
            axis=-1,
        ).astype(np.uint8)
        block = max(8, min(width, height) // 8)
        self.blocks = rng.integers(0, 256, size=(_NUM_BLOCKS, block, block, 3), dtype=np.uint8)
        self.block_start = rng.integers(0, [max(1, width - block), max(1, height - block)], size=(_NUM_BLOCKS, 2))
        self.block_velocity = rng.integers(-6, 7, size=(_NUM_BLOCKS, 2))

    def paint(self, i: int) -> np.ndarray:
        ox = (i * int(self.speed[0])) % self.width
        oy = (i * int(self.speed[1])) % self.height
        frame = self.canvas[oy : oy + self.height, ox : ox + self.width].copy()
        size = self.blocks.shape[1]
        for block, start, velocity in zip(self.blocks, self.block_start, self.block_velocity):
            x = int(start[0] + velocity[0] * i) % max(1, self.width - size)
            y = int(start[1] + velocity[1] * i) % max(1, self.height - size)
            # Rolling the block's pixels each frame keeps it textured and changing, not a static sticker.
            frame[y : y + size, x : x + size] = np.roll(block, i % size, axis=1)
        return frame
