"""Probe a video and decode chosen frames to RGB24 tensors, on the GPU (NVDEC) or the CPU (PyAV).

Frames are numbered in presentation order from 0, identically for every backend (both derive the numbering from
the sorted packet timestamps). ``decode_frames`` returns frames [T, H, W, 3] uint8, RGB, in the order of the
requested indices; only requested frames become tensors. Backends:

- ``"pyav"``: FFmpeg's software decoders on the CPU, RGB by swscale (see pyav_backend).
- ``"nvdec"``: torchcodec on a CUDA device, RGB converted on the GPU (see nvdec_backend).
- ``"auto"``: NVDEC when `device` is a CUDA device and NVDEC can decode the stream, else PyAV.

When NVDEC cannot be used (torchcodec missing, a codec or profile NVDEC cannot decode, a device error) the frames
are decoded by PyAV and moved to `device`; the result says which backend decoded and why it fell back, and the
reason is logged once. With a ``VideoDecoderPool`` the frames are decoded GOP-parallel (flashcodec); the pixels
are bit-exact with the sequential path of the same backend. ``start_decode`` returns while decoding goes on, for
callers that work on the first frames while the rest decode (the decode stage).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spaceserve.core.errors import InvalidInputError
from spaceserve.multimodal.video import flashcodec, nvdec_backend
from spaceserve.multimodal.video.decoder_pool import VideoDecoderPool
from spaceserve.multimodal.video.gop import PacketIndex, index_packets
from spaceserve.multimodal.video.pyav_backend import PyAVOptions
from spaceserve.multimodal.video.source import VideoSource, normalize_source

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "pyav", "nvdec")


@dataclass(frozen=True)
class VideoMetadata:
    fps: float
    num_frames: int
    duration_s: float
    width: int
    height: int
    codec: str
    keyframe_indices: tuple[int, ...]


@dataclass(frozen=True)
class IndexedVideo:
    """A video whose packets have been indexed once; pass it to decode_frames to avoid demuxing again."""

    source: str | bytes
    index: PacketIndex

    @property
    def metadata(self) -> VideoMetadata:
        index = self.index
        return VideoMetadata(
            fps=index.fps,
            num_frames=index.num_frames,
            duration_s=index.num_frames / index.fps,
            width=index.width,
            height=index.height,
            codec=index.codec,
            keyframe_indices=index.keyframe_frames,
        )


@dataclass(frozen=True)
class DecodedFrames:
    frames: torch.Tensor  # [T, H, W, 3] uint8 RGB on the requested device
    frame_indices: tuple[int, ...]
    metadata: VideoMetadata
    backend: str  # "pyav" or "nvdec": what actually decoded
    fallback_reason: str | None  # why NVDEC was not used although asked for (auto on CUDA, or nvdec)
    num_chunks: int  # decoder sessions used (1: sequential)


def index_video(source: VideoSource | IndexedVideo) -> IndexedVideo:
    """Demux once (no decoding). Raises InvalidVideoError naming the problem."""
    if isinstance(source, IndexedVideo):
        return source
    data = normalize_source(source)
    return IndexedVideo(data, index_packets(data))


def probe_video(source: VideoSource | IndexedVideo) -> VideoMetadata:
    return index_video(source).metadata


def decode_frames(
    source: VideoSource | IndexedVideo,
    frame_indices: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    decoders: VideoDecoderPool | None = None,
    pyav_options: PyAVOptions | None = None,
) -> DecodedFrames:
    """Decode `frame_indices` (sorted, unique, presentation order) to [T, H, W, 3] uint8 RGB on `device`.

    `decoders` makes the decode GOP-parallel over the pool's sessions; without it one session decodes.
    `pyav_options` sets FFmpeg threading for the sequential CPU path (default: FFmpeg picks).
    """
    device = torch.device(device)
    video = index_video(source)
    decode = start_decode(video, frame_indices, device=device, backend=backend, decoders=decoders, pyav_options=pyav_options)
    frames = decode.result()
    if frames.device != device:
        if device.type == "cuda" and frames.device.type == "cpu":
            frames = frames.pin_memory().to(device, non_blocking=True)
        else:
            frames = frames.to(device, non_blocking=True)
    indices = tuple(int(i) for i in frame_indices)
    return DecodedFrames(frames, indices, video.metadata, decode.backend, decode.fallback_reason, decode.num_sessions)


def start_decode(
    source: VideoSource | IndexedVideo,
    frame_indices: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    decoders: VideoDecoderPool | None = None,
    pyav_options: PyAVOptions | None = None,
) -> flashcodec.StreamingDecode:
    """Start decoding and return at once: the frames fill in as sessions decode them (`wait_for` a range). NVDEC's
    frames land on `device`; PyAV's stay on the CPU (the caller moves what it needs)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    video = index_video(source)
    indices = _check_indices(frame_indices, video.index.num_frames)
    reason = None
    if backend != "pyav":
        reason = nvdec_backend.nvdec_unavailable_reason(video.index, device)
        if reason is None:
            try:
                return flashcodec.start_nvdec(video.source, video.index, indices, device=device, pool=decoders)
            except nvdec_backend.NvdecUnavailable as exc:
                reason = str(exc)
        if device.type == "cuda" or backend == "nvdec":
            _log_fallback_once(reason)
    decode = flashcodec.start_pyav(
        video.source, video.index, indices, pool=decoders, options=pyav_options or PyAVOptions(threads=0)
    )
    decode.fallback_reason = reason if (device.type == "cuda" or backend == "nvdec") else None
    return decode


def _check_indices(frame_indices: Sequence[int], num_frames: int) -> tuple[int, ...]:
    indices = tuple(int(i) for i in frame_indices)
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise InvalidInputError("frame indices must be sorted and unique")
    if indices and (indices[0] < 0 or indices[-1] >= num_frames):
        raise InvalidInputError(f"frame indices must lie in [0, {num_frames}), got {indices[0]}..{indices[-1]}")
    return indices


_logged_reasons: set[str] = set()
_logged_lock = threading.Lock()


def _log_fallback_once(reason: str | None) -> None:
    with _logged_lock:
        if reason is None or reason in _logged_reasons:
            return
        _logged_reasons.add(reason)
    logger.warning("video decoding falls back to PyAV on the CPU: %s", reason)
