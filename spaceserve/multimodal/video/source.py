"""Where a video comes from (a path or encoded bytes) and how PyAV opens it, with errors that name the problem."""

from __future__ import annotations

import io
import os
from pathlib import Path

import av

from spaceserve.multimodal.video.errors import InvalidVideoError

VideoSource = str | os.PathLike[str] | bytes | bytearray | memoryview


def normalize_source(source: VideoSource) -> str | bytes:
    """A readable file path (as str) or immutable bytes; anything else is rejected with the reason."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InvalidVideoError("video is empty (0 bytes)")
        return data
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidVideoError(f"video file not found: {os.fspath(source)}")
        if path.stat().st_size == 0:
            raise InvalidVideoError(f"video file is empty (0 bytes): {os.fspath(source)}")
        return os.fspath(path)
    raise InvalidVideoError(f"expected a video file path or encoded bytes, got {type(source).__name__}")


def describe_source(source: str | bytes) -> str:
    return source if isinstance(source, str) else f"<{len(source)} bytes>"


def open_container(source: str | bytes) -> av.container.InputContainer:
    """Open for demuxing; a file PyAV cannot parse as any container raises InvalidVideoError."""
    try:
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else source, mode="r")
    except av.error.FFmpegError as exc:
        raise InvalidVideoError(f"not a readable video ({describe_source(source)}): {ffmpeg_message(exc)}") from None
    except (OSError, ValueError) as exc:
        raise InvalidVideoError(f"cannot open video {describe_source(source)}: {exc}") from None


def ffmpeg_message(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)
