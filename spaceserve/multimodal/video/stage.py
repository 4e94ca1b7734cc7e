"""The video decode stage: a thread pool that turns videos into model-ready tensors beside the engine loop.

The engine submits one `VideoWork` per video when a request arrives and polls the futures in its step; a worker
reads and hashes the video, looks the result up in a bounded LRU cache of processed videos, and on a miss decodes
only the sampled frames (on the engine's device where a GPU decoder can) and resizes, normalises and patchifies
them there. Errors surface as the future's exception (InvalidInputError naming the problem).

`build_decoder_pool` makes the engine's VideoDecoderPool (FlashCodec): each video is split along GOP boundaries
across its decoder sessions (NVDEC on the engine's GPU or the configured GPUs, PyAV threads on the CPU when NVDEC
cannot decode), sessions kept for the engine's lifetime.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from spaceserve.config import VideoConfig
from spaceserve.core.errors import InvalidInputError
from spaceserve.models.config import ImageProcessorConfig
from spaceserve.multimodal.hashing import hash_video
from spaceserve.multimodal.video.processor import ProcessedVideo, VideoPlan, preprocess_video

if TYPE_CHECKING:  # flashcodec needs PyAV, which the engine only imports once a video arrives
    from spaceserve.multimodal.video.flashcodec import VideoDecoderPool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoWork:
    """One video to make model-ready. `source` is a file path, encoded bytes, or given uint8 [T, H, W, 3] frames
    (CPU); `frame_indices` are the frames to take (all given frames when None)."""

    source: str | bytes | torch.Tensor
    frame_indices: tuple[int, ...] | None
    plan: VideoPlan
    source_hw: tuple[int, int]  # frame (height, width) the probe reported; decoded frames must match
    settings: tuple[tuple[str, Any], ...]
    """Every sampling/processing setting that changes the result; part of the content hash."""


@dataclass(frozen=True)
class DecodedVideo:
    mm_hash: str
    processed: ProcessedVideo
    start_time: float
    end_time: float
    cache_hit: bool


class ProcessedVideoCache:
    """Processed videos by content hash, least recently used evicted past `capacity_bytes`. Thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, ProcessedVideo] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> ProcessedVideo | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, value: ProcessedVideo) -> None:
        size = _nbytes(value)
        if size > self.capacity_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            self._entries[key] = value
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= _nbytes(evicted)

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


def _nbytes(video: ProcessedVideo) -> int:
    return video.pixel_values.numel() * video.pixel_values.element_size()


def build_decoder_pool(video: VideoConfig, device: torch.device | str) -> VideoDecoderPool | None:
    """The engine's decoder sessions: `decoder_sessions_per_gpu` NVDEC sessions on each decoding GPU (the engine's
    own unless `decode_gpus` names others; none when the engine runs on the CPU) and `decoder_cpu_sessions` PyAV
    sessions for videos decoded on the CPU. None when decoder_sessions_per_gpu is 0 (one session per video).
    Sessions start on first use, so a pool costs nothing until a video arrives."""
    if video.decoder_sessions_per_gpu == 0:
        logger.info("video decoding: no decoder pool, each video decoded by one session")
        return None
    try:
        from spaceserve.multimodal.video.flashcodec import DecoderPoolConfig, VideoDecoderPool
    except ImportError as exc:  # PyAV missing: video requests fail when decoded, the engine still serves the rest
        logger.warning("video decoding unavailable, no decoder pool: %s", exc)
        return None
    device = torch.device(device)
    gpus: tuple[int, ...] = ()
    if device.type == "cuda":
        gpus = video.decode_gpus or (device.index if device.index is not None else torch.cuda.current_device(),)
    config = DecoderPoolConfig(
        cpu_sessions=video.decoder_cpu_sessions or os.cpu_count() or 1,
        gpu_sessions_per_device=video.decoder_sessions_per_gpu,
        gpu_devices=gpus,
    )
    logger.info(
        "video decoding: GOP-parallel over %s; %d PyAV sessions where the CPU decodes",
        f"{config.gpu_sessions_per_device} NVDEC sessions on each of cuda:{list(gpus)}" if gpus else "no GPU",
        config.cpu_sessions,
    )
    return VideoDecoderPool(config)


class VideoDecodeStage:
    def __init__(
        self,
        image_config: ImageProcessorConfig,
        device: torch.device | str,
        *,
        num_workers: int,
        cache_bytes: int,
        backend: str = "auto",
        decoders: VideoDecoderPool | None = None,
    ) -> None:
        """`decoders`: a VideoDecoderPool to decode each video GOP-parallel (FlashCodec); None: one session."""
        self.image_config = image_config
        self.decoders = decoders
        self.device = torch.device(device)
        self.backend = backend
        self.cache = ProcessedVideoCache(cache_bytes)
        self._pool = ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="video-decode")

    def submit(self, work: VideoWork) -> Future[DecodedVideo]:
        return self._pool.submit(self._run, work)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, work: VideoWork) -> DecodedVideo:
        start = time.monotonic()
        with torch.inference_mode():
            content, kind = _content(work.source)
            mm_hash = hash_video(content, kind, **dict(work.settings))
            cached = self.cache.get(mm_hash)
            if cached is not None:
                return DecodedVideo(mm_hash, cached, start, time.monotonic(), cache_hit=True)
            frames = self._frames(work, content)
            processed = preprocess_video(frames, work.plan, self.image_config)
            if processed.pixel_values.is_cuda:
                # the engine thread reads these on its own stream; make them complete before handing them over
                torch.cuda.current_stream(processed.pixel_values.device).synchronize()
        self.cache.put(mm_hash, processed)
        return DecodedVideo(mm_hash, processed, start, time.monotonic(), cache_hit=False)

    def _frames(self, work: VideoWork, content: bytes | memoryview) -> torch.Tensor:
        if isinstance(work.source, torch.Tensor):
            frames = work.source
            if work.frame_indices is not None:
                frames = frames[list(work.frame_indices)]
            return frames.to(self.device)
        from spaceserve.multimodal.video.decode import decode_frames

        indices = list(work.frame_indices or ())
        # Decoder sessions are threads outside inference mode writing into the frame buffer: it must be a normal
        # tensor (inference tensors refuse in-place writes outside inference mode).
        with torch.inference_mode(False):
            decoded = decode_frames(
                bytes(content), indices, device=self.device, backend=self.backend, decoders=self.decoders
            )
        frames = decoded.frames
        if frames.shape[0] != len(indices):
            raise InvalidInputError(f"decoder returned {frames.shape[0]} frames for {len(indices)} asked")
        if tuple(frames.shape[1:3]) != work.source_hw:
            raise InvalidInputError(
                f"decoded frames are {tuple(frames.shape[1:3])} (HxW), the probe said {work.source_hw}"
            )
        return frames


def _content(source: str | bytes | torch.Tensor) -> tuple[bytes | memoryview, str]:
    if isinstance(source, torch.Tensor):
        frames = source.contiguous()
        shape = "x".join(str(d) for d in frames.shape)
        return memoryview(frames.numpy()).cast("B"), f"frames:{shape}"
    if isinstance(source, bytes):
        return source, "bytes"
    try:
        with open(source, "rb") as f:
            return f.read(), "bytes"
    except OSError as exc:
        raise InvalidInputError(f"cannot read video file {os.fspath(source)}: {exc.strerror or exc}") from None
