"""FlashCodec: one video decoded by several decoder sessions at once, split along GOP boundaries, and its frames
handed on as they are decoded.

The requested frames are split (gop.plan_chunks) into decode chunks of whole GOPs, about `min_frames_per_chunk`
frames of decoding each, queued in presentation order. The video gets k sessions, k following from its length
(how many decode chunks it has) and from how many of the pool's sessions are free (at least one); each session
takes the next chunk from the queue until it is empty, so the decoded part of the video grows from its start and
k sessions share it evenly whatever each chunk costs. Every frame is written into the output tensor as soon as it
is decoded and marked in the decode's `DecodeProgress`, so a caller can start on the first frames
(`StreamingDecode.wait_for`) while later GOPs are still being decoded.

Sessions are threads of a VideoDecoderPool (decoder_pool.py), opened and warmed when the engine starts. PyAV
releases the GIL while decoding and converting; NVDEC sessions are independent hardware decoders, each keeping one
torchcodec decoder per video for all the chunks it takes. GPU sessions are spread over the pool's
GPUs; frames decoded on another GPU are copied to the requested device. The pixels are bit-exact with one session
decoding everything (a frame depends only on the GOPs its chunk decodes, see gop.py and nvdec_backend.py).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass

import torch

from spaceserve.multimodal.video import nvdec_backend, pyav_backend
from spaceserve.multimodal.video.decoder_pool import CPU, DecoderPoolConfig, VideoDecoderPool
from spaceserve.multimodal.video.gop import DecodeChunk, PacketIndex, plan_chunks
from spaceserve.multimodal.video.pyav_backend import PyAVOptions

__all__ = ["DecoderPoolConfig", "DecodeProgress", "StreamingDecode", "VideoDecoderPool", "start_nvdec", "start_pyav"]


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
