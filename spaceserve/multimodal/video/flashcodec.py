"""FlashCodec: one video decoded by several decoder sessions at once, split along GOP boundaries, and its frames
handed on as they are decoded.

The requested frames are split (gop.plan_chunks) into decode chunks of whole GOPs, about `min_frames_per_chunk`
frames of decoding each, queued in presentation order. The video gets k sessions, k following from its length
(how many decode chunks it has) and from how many of the pool's sessions are free (at least one); each session
takes the next chunk from the queue until it is empty, so the decoded part of the video grows from its start and
k sessions share it evenly whatever each chunk costs. Every frame is written into the output tensor as soon as it
is decoded and marked in the decode's `DecodeProgress`, so a caller can start on the first frames
(`StreamingDecode.wait_for`) while later GOPs are still being decoded.

Sessions are threads of a VideoDecoderPool that lives as long as the server, opened and warmed when the engine
starts (`warm_up`: FFmpeg's codecs for PyAV, torchcodec and NVDEC for each GPU session), so no request pays their
start-up. PyAV releases the GIL while decoding and converting; NVDEC sessions are independent hardware decoders,
each keeping one torchcodec decoder per video for all the chunks it takes. GPU sessions are spread over the pool's
GPUs; frames decoded on another GPU are copied to the requested device. The pixels are bit-exact with one session
decoding everything (a frame depends only on the GOPs its chunk decodes, see gop.py and nvdec_backend.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from spaceserve.multimodal.video import nvdec_backend, pyav_backend
from spaceserve.multimodal.video.gop import DecodeChunk, PacketIndex, plan_chunks
from spaceserve.multimodal.video.pyav_backend import PyAVOptions

logger = logging.getLogger(__name__)

CPU = "cpu"
_WARM_UP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DecoderPoolConfig:
    """cpu_sessions PyAV sessions of cpu_threads_per_session FFmpeg threads each; gpu_sessions_per_device NVDEC
    sessions on each of gpu_devices (None: every visible GPU). A decode chunk decodes at least about
    min_frames_per_chunk frames, so short clips are not split into pieces that cost more to set up than to decode."""

    cpu_sessions: int = field(default_factory=lambda: os.cpu_count() or 1)
    cpu_threads_per_session: int = 1
    cpu_thread_type: str = "AUTO"
    gpu_sessions_per_device: int = 8
    gpu_devices: tuple[int, ...] | None = None
    min_frames_per_chunk: int = 30

    def __post_init__(self) -> None:
        if self.cpu_sessions < 1 or self.gpu_sessions_per_device < 1:
            raise ValueError("a decoder pool needs at least one CPU session and one session per GPU")
        if self.min_frames_per_chunk < 1:
            raise ValueError(f"min_frames_per_chunk must be >= 1, got {self.min_frames_per_chunk}")
        PyAVOptions(self.cpu_threads_per_session, self.cpu_thread_type)


class VideoDecoderPool:
    """Decoder sessions (threads) kept across requests. Thread-safe; close() when the server stops."""

    def __init__(self, config: DecoderPoolConfig | None = None) -> None:
        self.config = config or DecoderPoolConfig()
        self._lock = threading.Lock()
        self._executors: dict[str | int, ThreadPoolExecutor] = {}
        self._busy: dict[str | int, int] = {}  # sessions handed to videos and not yet back, per executor
        self._closed = False

    @property
    def cpu_options(self) -> PyAVOptions:
        return PyAVOptions(self.config.cpu_threads_per_session, self.config.cpu_thread_type)

    def gpu_devices(self) -> tuple[int, ...]:
        if self.config.gpu_devices is not None:
            return self.config.gpu_devices
        return tuple(range(torch.cuda.device_count())) if torch.cuda.is_available() else ()

    def num_gpu_sessions(self) -> int:
        return self.config.gpu_sessions_per_device * len(self.gpu_devices())

    def num_free_sessions(self, where: str | int = CPU) -> int:
        """Sessions of the CPU (`"cpu"`) or of one GPU (its index) that no video holds right now."""
        with self._lock:
            return self._capacity(where) - self._busy.get(where, 0)

    def cpu_executor(self) -> ThreadPoolExecutor:
        return self._executor(CPU)

    def gpu_executor(self, device_index: int) -> ThreadPoolExecutor:
        return self._executor(device_index)

    def _executor(self, where: str | int) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("VideoDecoderPool is closed")
            executor = self._executors.get(where)
            if executor is None:
                name = "pyav-session" if where == CPU else f"nvdec-cuda{where}-session"
                executor = ThreadPoolExecutor(self._capacity(where), thread_name_prefix=name)
                self._executors[where] = executor
            return executor

    def _capacity(self, where: str | int) -> int:
        return self.config.cpu_sessions if where == CPU else self.config.gpu_sessions_per_device

    def reserve(self, places: tuple[str | int, ...], wanted: int) -> list[str | int]:
        """Where `wanted` sessions of one video run: free sessions of `places` (the freest first), at least one
        even when none is free (it then waits for a session in the first place's queue). Give each back with
        `release` when it is done."""
        with self._lock:
            free = {where: self._capacity(where) - self._busy.get(where, 0) for where in places}
            chosen: list[str | int] = []
            while len(chosen) < wanted:
                where = max(places, key=lambda p: free[p])
                if free[where] <= 0:
                    break
                free[where] -= 1
                chosen.append(where)
            chosen = chosen or [places[0]]
            for where in chosen:
                self._busy[where] = self._busy.get(where, 0) + 1
            return chosen

    def release(self, where: str | int) -> None:
        with self._lock:
            self._busy[where] -= 1

    def submit(self, where: str | int, fn: Callable, *args) -> None:
        """Run fn(*args) on a session of `where` (queued while all of them are busy)."""
        self._executor(where).submit(fn, *args)

    def warm_up(self, cpu_clip: bytes | None, gpu_clip: bytes | None) -> dict[str, float]:
        """Start every session and decode a small clip in each, so the first request pays no start-up (threads,
        FFmpeg's codecs; torchcodec, CUDA and NVDEC state per GPU session). Failures are logged, not raised: a
        session that cannot warm up decodes the same way later, only slower the first time. Returns the seconds
        each kind of session took."""
        import time

        timings = {}
        kinds: list[tuple[str | int, bytes]] = []
        if cpu_clip is not None:
            kinds.append((CPU, cpu_clip))
        if gpu_clip is not None:
            kinds += [(device, gpu_clip) for device in self.gpu_devices()]
        for where, clip in kinds:
            start = time.monotonic()
            count = self._capacity(where)
            barrier = threading.Barrier(count)
            run = _warm_pyav_session if where == CPU else _warm_nvdec_session
            executor = self._executor(where)
            futures = [executor.submit(_all_started_then, barrier, run, clip, where) for _ in range(count)]
            errors = [f.exception(_WARM_UP_TIMEOUT_S) for f in futures]
            if any(errors):
                logger.warning("warming up %s decoder sessions failed: %r", where, next(e for e in errors if e))
            timings[f"{where if where == CPU else f'cuda:{where}'}"] = time.monotonic() - start
        return timings

    def close(self) -> None:
        with self._lock:
            self._closed = True
            executors = list(self._executors.values())
        for executor in executors:
            executor.shutdown(wait=True)

    def __enter__(self) -> VideoDecoderPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _all_started_then(barrier: threading.Barrier, run: Callable, clip: bytes, where: str | int) -> None:
    barrier.wait(_WARM_UP_TIMEOUT_S)  # every session has its own thread before any finishes
    run(clip, where)


def _warm_pyav_session(clip: bytes, where: str | int) -> None:
    from spaceserve.multimodal.video.gop import index_packets

    index = index_packets(clip)
    chunk, = plan_chunks(index, tuple(range(index.num_frames)), max_chunks=1)
    out = torch.empty((index.num_frames, index.height, index.width, 3), dtype=torch.uint8)
    positions = {frame: frame for frame in range(index.num_frames)}
    for segment in chunk.segments:
        pyav_backend.decode_segment(clip, index, segment, out, positions, PyAVOptions())


def _warm_nvdec_session(clip: bytes, where: str | int) -> None:
    from spaceserve.multimodal.video.gop import index_packets

    index = index_packets(clip)
    device = torch.device("cuda", int(where))
    if (reason := nvdec_backend.nvdec_unavailable_reason(index, device)) is not None:
        raise nvdec_backend.NvdecUnavailable(reason)
    decoder = nvdec_backend.open_decoder(clip, index, device)
    nvdec_backend.decode_with(decoder, index, list(range(index.num_frames)), device)
    torch.cuda.synchronize(device)


class DecodeProgress:
    """Which frames of one decode are in its output tensor, and whether its sessions are done. Thread-safe."""

    def __init__(self, num_frames: int, num_sessions: int) -> None:
        self._cond = threading.Condition()
        self._done = bytearray(num_frames)
        self._sessions_left = num_sessions
        self._error: BaseException | None = None

    def mark(self, position: int) -> None:
        with self._cond:
            self._done[position] = 1
            self._cond.notify_all()

    def session_done(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._sessions_left -= 1
            if error is not None and self._error is None:
                self._error = error
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def wait_for(self, first: int, end: int, timeout: float | None = None) -> bool:
        """Block until frames [first, end) are decoded (True) or `timeout` passes (False); raise the decode's error
        if it failed first."""
        with self._cond:
            ready = lambda: self._error is not None or all(self._done[first:end]) or not self._sessions_left  # noqa: E731
            if not self._cond.wait_for(ready, timeout):
                return False
            if self._error is not None:
                raise self._error
            if not all(self._done[first:end]):
                raise RuntimeError(f"decoder sessions ended without frames {first}..{end - 1}")
            return True

    def wait_sessions(self) -> None:
        """Block until every session has stopped (they write into the output tensor); raise the first error."""
        with self._cond:
            self._cond.wait_for(lambda: not self._sessions_left)
            if self._error is not None:
                raise self._error


class _ChunkQueue:
    """Decode chunks in presentation order, taken by the sessions one at a time until empty or stopped."""

    def __init__(self, chunks: tuple[DecodeChunk, ...], progress: DecodeProgress) -> None:
        self._chunks = deque(chunks)
        self._lock = threading.Lock()
        self._progress = progress

    def take(self) -> DecodeChunk | None:
        with self._lock:
            if self._progress.failed or not self._chunks:
                return None
            return self._chunks.popleft()


@dataclass
class StreamingDecode:
    """A decode in progress: `frames` [T, H, W, 3] uint8 (in the order of the requested indices) fills as its
    sessions decode; `wait_for` blocks until a range of it is there."""

    frames: torch.Tensor
    progress: DecodeProgress
    backend: str
    num_sessions: int
    num_chunks: int
    fallback_reason: str | None = None
    """Why NVDEC was not used although asked for (set by decode.start_decode)."""

    def wait_for(self, first: int, end: int, timeout: float | None = None) -> bool:
        return self.progress.wait_for(first, end, timeout)

    def result(self) -> torch.Tensor:
        self.progress.wait_sessions()
        return self.frames

    def cancel(self) -> None:
        """Stop handing out decode chunks (those being decoded finish); waiters raise CancelledError."""
        self.progress.fail(CancelledError())


def start_pyav(
    source: str | bytes,
    index: PacketIndex,
    frame_indices: tuple[int, ...],
    *,
    pool: VideoDecoderPool | None,
    options: PyAVOptions,
) -> StreamingDecode:
    """Start decoding on the CPU; GOP-parallel over the pool's free PyAV sessions, else one session thread."""
    out = torch.empty((len(frame_indices), index.height, index.width, 3), dtype=torch.uint8)
    position = {frame: i for i, frame in enumerate(frame_indices)}

    def run_chunks(chunks: _ChunkQueue, progress: DecodeProgress, where: str | int) -> None:
        chunk_options = options if pool is None else pool.cpu_options
        while (chunk := chunks.take()) is not None:
            for segment in chunk.segments:
                pyav_backend.decode_segment(source, index, segment, out, position, chunk_options, progress.mark)

    return _start(out, index, frame_indices, pool, (CPU,), run_chunks, "pyav")


def start_nvdec(
    source: str | bytes,
    index: PacketIndex,
    frame_indices: tuple[int, ...],
    *,
    device: torch.device,
    pool: VideoDecoderPool | None,
) -> StreamingDecode:
    """Start decoding with NVDEC into a tensor on `device`. Raises NvdecUnavailable (nothing started) when the
    first session's decoder cannot be opened, so the caller can fall back to the CPU."""
    devices = pool.gpu_devices() if pool is not None else ()
    places: tuple[str | int, ...] = devices or (device.index if device.index is not None else 0,)
    first_device = torch.device("cuda", int(places[0]))
    opened = {first_device.index: nvdec_backend.open_decoder(source, index, first_device)}
    opened_lock = threading.Lock()
    out = torch.empty((len(frame_indices), index.height, index.width, 3), dtype=torch.uint8, device=device)
    position = {frame: i for i, frame in enumerate(frame_indices)}

    def run_chunks(chunks: _ChunkQueue, progress: DecodeProgress, where: str | int) -> None:
        session_device = torch.device("cuda", int(where))
        with opened_lock:  # the decoder opened to check NVDEC goes to the first session on its GPU
            decoder = opened.pop(session_device.index, None)
        # a stream of its own (torchcodec converts on the current stream): syncing it waits for this session only
        stream = torch.cuda.Stream(session_device)
        with torch.cuda.stream(stream):
            while (chunk := chunks.take()) is not None:
                if decoder is None:
                    decoder = nvdec_backend.open_decoder(source, index, session_device)
                for frame in chunk.frame_indices:
                    decoded = nvdec_backend.decode_with(decoder, index, [frame], session_device)
                    out[position[frame]].copy_(decoded[0])
                    stream.synchronize()  # in `out` before anyone reads it
                    if out.device != session_device:
                        torch.cuda.current_stream(out.device).synchronize()
                    progress.mark(position[frame])

    return _start(out, index, frame_indices, pool if devices else None, places, run_chunks, "nvdec")


def _start(
    out: torch.Tensor,
    index: PacketIndex,
    frame_indices: tuple[int, ...],
    pool: VideoDecoderPool | None,
    places: tuple[str | int, ...],
    run_chunks: Callable[[_ChunkQueue, DecodeProgress, str | int], None],
    backend: str,
) -> StreamingDecode:
    min_frames = pool.config.min_frames_per_chunk if pool is not None else 1
    max_chunks = len(frame_indices) if pool is not None else 1
    chunks = plan_chunks(index, frame_indices, max_chunks=max_chunks, min_frames_per_chunk=min_frames)
    pooled = pool is not None and bool(chunks)
    sessions = pool.reserve(places, len(chunks)) if pooled else [places[0]]
    progress = DecodeProgress(len(frame_indices), len(sessions))
    queue = _ChunkQueue(chunks, progress)

    def session(where: str | int) -> None:
        error = None
        try:
            run_chunks(queue, progress, where)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the decode
            error = exc
        finally:
            if pooled:
                pool.release(where)
            progress.session_done(error)

    for where in sessions:
        if not pooled:
            threading.Thread(target=session, args=(where,), name=f"{backend}-session", daemon=True).start()
            continue
        try:
            pool.submit(where, session, where)
        except RuntimeError as exc:  # the pool is closed
            pool.release(where)
            progress.session_done(exc)
    return StreamingDecode(out, progress, backend, len(sessions), len(chunks))
