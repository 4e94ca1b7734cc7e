"""The video decode stage: turns videos into model-ready tensors chunk by chunk, beside the engine loop.

The engine submits one `VideoWork` per video when its request arrives (the request joins the scheduler at once)
and takes the stage's events in its step (`poll`). A worker looks the video's content hash up in a bounded LRU cache
of processed videos; on a miss it starts decoding the sampled frames (GOP-parallel over the decoder pool, on the
engine's device where NVDEC can) and, as soon as the frames of the next chunk of temporal patches are decoded,
resizes, normalises and patchifies them (on the engine's device, on a stream of its own) and emits
`VideoChunkReady`, while later GOPs are still decoding. `VideoDone` ends every job that was not cancelled: its
timing, or the error (InvalidInputError naming the problem, or a decoder fault), after which no more chunks come.

`build_decoder_pool` makes the engine's VideoDecoderPool (FlashCodec); the stage warms its sessions up when it
starts, so the first request pays no decoder start-up.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch

from spaceserve.config import VideoConfig
from spaceserve.models.config import ImageProcessorConfig
from spaceserve.multimodal.video.processor import VideoPlan, chunk_frame_range, preprocess_video_chunk

if TYPE_CHECKING:  # PyAV is imported only once a video arrives (or the pool warms up)
    from spaceserve.multimodal.video.decode import IndexedVideo
    from spaceserve.multimodal.video.decoder_pool import VideoDecoderPool

logger = logging.getLogger(__name__)
_WAIT_SLICE_S = 0.05
"""How often a worker waiting for frames checks whether its job was cancelled."""


@dataclass(frozen=True)
class VideoWork:
    """One video to make model-ready, chunk by chunk. `source` is the probed video (encoded bytes and their packet
    index) or given uint8 [T, H, W, 3] frames (CPU); `frame_indices` are the frames to take (all given frames when
    None); `chunks` the temporal-patch ranges, in order, each emitted as soon as it is ready."""

    source: Union["IndexedVideo", torch.Tensor]
    frame_indices: tuple[int, ...] | None
    plan: VideoPlan
    mm_hash: str
    """Content and settings hash of the whole video: the processed-video cache key."""
    chunks: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class VideoChunkReady:
    job_id: int
    """What `submit` returned for the job."""
    chunk_index: int
    pixel_values: torch.Tensor


@dataclass(frozen=True)
class VideoDone:
    job_id: int
    start_time: float
    end_time: float
    cache_hit: bool
    error: BaseException | None = None


VideoEvent = Union[VideoChunkReady, VideoDone]


class ProcessedVideoCache:
    """Processed videos (their chunks' pixel values) by content hash, least recently used evicted past
    `capacity_bytes`. Thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> tuple[torch.Tensor, ...] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, value: tuple[torch.Tensor, ...]) -> None:
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


def _nbytes(chunks: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in chunks)


def build_decoder_pool(video: VideoConfig, device: torch.device | str) -> VideoDecoderPool | None:
    """The engine's decoder sessions: `decoder_sessions_per_gpu` NVDEC sessions on each decoding GPU (the engine's
    own unless `decode_gpus` names others; none when the engine runs on the CPU) and `decoder_cpu_sessions` PyAV
    sessions for videos decoded on the CPU. None when decoder_sessions_per_gpu is 0 (one session per video)."""
    if video.decoder_sessions_per_gpu == 0:
        logger.info("video decoding: no decoder pool, each video decoded by one session")
        return None
    try:
        from spaceserve.multimodal.video.decoder_pool import DecoderPoolConfig, VideoDecoderPool
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
        warm_up: bool = True,
    ) -> None:
        """`decoders`: a VideoDecoderPool to decode each video GOP-parallel (FlashCodec); None: one session.
        `warm_up`: start and warm the pool's sessions (and the device's preprocessing kernels) now."""
        self.image_config = image_config
        self.decoders = decoders
        self.device = torch.device(device)
        self.backend = backend
        self.cache = ProcessedVideoCache(cache_bytes)
        self._pool = ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="video-decode")
        self._events: queue.SimpleQueue[VideoEvent] = queue.SimpleQueue()
        self._has_events = threading.Event()
        self._jobs: dict[int, tuple[Future, threading.Event]] = {}
        self._job_ids = itertools.count()
        self.warm_up_s: dict[str, float] = {}
        self.last_decode: dict[str, object] | None = None
        """How the latest decode ran (backend, sessions, decode chunks, why NVDEC was not used), for benchmarks."""
        if warm_up:
            self.warm_up()

    # ---- the engine's side ----------------------------------------------------------------------------------

    def submit(self, work: VideoWork) -> int:
        """Start making `work` model-ready; returns the job id its events carry."""
        job_id = next(self._job_ids)
        cancelled = threading.Event()
        self._jobs[job_id] = (self._pool.submit(self._run, job_id, work, cancelled), cancelled)
        return job_id

    def cancel(self, job_id: int) -> None:
        """Stop a job: no events come from it any more (one running stops at its next chunk, its decoder
        sessions at their next GOP chunk)."""
        job = self._jobs.pop(job_id, None)
        if job is not None:
            future, cancelled = job
            cancelled.set()
            future.cancel()

    def poll(self, timeout: float = 0.0) -> list[VideoEvent]:
        """The events since the last poll, waiting up to `timeout` for the first one when there are none."""
        events: list[VideoEvent] = []
        self._has_events.clear()
        try:
            events.append(self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait())
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            pass
        live = [e for e in events if e.job_id in self._jobs]  # a cancelled job's late events are dropped
        for event in live:
            if isinstance(event, VideoDone):
                del self._jobs[event.job_id]
        return live

    def wait(self, timeout: float) -> bool:
        """Block until an event is there for `poll` (True) or `timeout` passes (False)."""
        return self._has_events.wait(timeout)

    @property
    def num_jobs(self) -> int:
        return len(self._jobs)

    def warm_up(self) -> None:
        """Start and warm every decoder session, and load the preprocessing kernels on the engine's device."""
        try:
            cpu_clip = _warm_up_clip(64, 48)
        except Exception as exc:  # noqa: BLE001 - PyAV cannot encode here: nothing to warm with
            logger.warning("video decoder warm-up skipped: %r", exc)
            return
        gpu_clip = None
        if self.device.type == "cuda" and self.backend != "pyav":
            gpu_clip = _warm_up_clip(1280, 720)
        if self.decoders is not None:
            self.warm_up_s = self.decoders.warm_up(cpu_clip, gpu_clip)
        if self.device.type == "cuda":
            with torch.inference_mode(), torch.cuda.stream(torch.cuda.Stream(self.device)):
                frames = torch.randint(0, 256, (2, 480, 640, 3), dtype=torch.uint8, device=self.device)
                from spaceserve.multimodal.video.processor import VideoProcessingParams, plan_video

                plan = plan_video(2, 480, 640, self.image_config, VideoProcessingParams())
                preprocess_video_chunk(frames, plan, self.image_config, 0, plan.grid_thw[0])
                torch.cuda.current_stream(self.device).synchronize()
        logger.info("video decoder sessions warmed up: %s", {k: round(v, 3) for k, v in self.warm_up_s.items()})

    def shutdown(self) -> None:
        for job_id in list(self._jobs):
            self.cancel(job_id)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- a worker --------------------------------------------------------------------------------------------

    def _emit(self, event: VideoEvent) -> None:
        self._events.put(event)
        self._has_events.set()

    def _run(self, job_id: int, work: VideoWork, cancelled: threading.Event) -> None:
        start = time.monotonic()
        try:
            with torch.inference_mode(), self._stream_context():
                cache_key = f"{work.mm_hash}/{work.chunks}"
                cached = self.cache.get(cache_key)
                if cached is not None:
                    self.last_decode = {"backend": "cache", "sessions": 0, "decode_chunks": 0, "fallback_reason": None}
                    for index, pixel_values in enumerate(cached):
                        self._emit(VideoChunkReady(job_id, index, pixel_values))
                    self._emit(VideoDone(job_id, start, time.monotonic(), cache_hit=True))
                    return
                chunks = self._make_chunks(job_id, work, cancelled)
            if chunks is None:
                return  # cancelled: no more events
            self.cache.put(cache_key, chunks)
            self._emit(VideoDone(job_id, start, time.monotonic(), cache_hit=False))
        except Exception as exc:  # noqa: BLE001 - any failure ends this video's job only
            self._emit(VideoDone(job_id, start, time.monotonic(), cache_hit=False, error=exc))

    def _make_chunks(self, job_id: int, work: VideoWork, cancelled: threading.Event) -> tuple[torch.Tensor, ...] | None:
        frames_of = self._frame_source(work)
        made = []
        try:
            for index, (t_start, t_end) in enumerate(work.chunks):
                first, end = chunk_frame_range(work.plan, self.image_config.temporal_patch_size, t_start, t_end)
                frames = frames_of(first, end, cancelled)
                if frames is None:
                    return None
                pixel_values = preprocess_video_chunk(frames, work.plan, self.image_config, t_start, t_end)
                if pixel_values.is_cuda:
                    # the engine thread reads these on its own stream: complete them before handing them over
                    torch.cuda.current_stream(pixel_values.device).synchronize()
                if cancelled.is_set():
                    return None
                made.append(pixel_values)
                self._emit(VideoChunkReady(job_id, index, pixel_values))
        finally:
            stop = getattr(frames_of, "stop", None)
            if stop is not None:
                stop()
        return tuple(made)

    def _frame_source(self, work: VideoWork):
        """frames_of(first, end, cancelled) -> the uint8 sampled frames [first, end) on the engine's device, once
        decoded (None when cancelled while waiting)."""
        if isinstance(work.source, torch.Tensor):
            self.last_decode = {"backend": "frames given", "sessions": 0, "decode_chunks": 0, "fallback_reason": None}
            given = work.source if work.frame_indices is None else work.source[list(work.frame_indices)]
            return lambda first, end, cancelled: self._to_device(given[first:end])
        from spaceserve.multimodal.video.decode import start_decode

        # Decoder sessions are threads outside inference mode writing into the frame buffer: it must be a normal
        # tensor (inference tensors refuse in-place writes outside inference mode).
        with torch.inference_mode(False):
            decode = start_decode(
                work.source, work.frame_indices or (), device=self.device, backend=self.backend, decoders=self.decoders
            )
        self.last_decode = {
            "backend": decode.backend,
            "sessions": decode.num_sessions,
            "decode_chunks": decode.num_chunks,
            "fallback_reason": decode.fallback_reason,
        }

        def frames_of(first: int, end: int, cancelled: threading.Event) -> torch.Tensor | None:
            while not decode.wait_for(first, end, timeout=_WAIT_SLICE_S):
                if cancelled.is_set():
                    return None
            return self._to_device(decode.frames[first:end])

        def stop() -> None:
            if not decode.progress.failed:
                decode.cancel()  # done or abandoned: hand out no more GOP chunks

        frames_of.stop = stop  # type: ignore[attr-defined]
        return frames_of

    def _to_device(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.device == self.device:
            return frames
        if self.device.type == "cuda" and frames.device.type == "cpu":
            return frames.pin_memory().to(self.device, non_blocking=True)
        return frames.to(self.device, non_blocking=True)  # another GPU's decoder, or to the CPU

    def _stream_context(self):
        """Preprocessing on a stream of its own, so it neither waits for nor holds up the engine's work."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(torch.cuda.Stream(self.device))


@functools.cache
def _warm_up_clip(width: int, height: int) -> bytes:
    from spaceserve.multimodal.video.synthetic import make_clip

    buffer = io.BytesIO()
    make_clip(buffer, width=width, height=height, seconds=0.25, fps=16, gop=4, seed=0)
    return buffer.getvalue()
