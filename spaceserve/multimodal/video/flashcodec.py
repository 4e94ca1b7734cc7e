"""FlashCodec: one video decoded by several decoder sessions at once, split along GOP boundaries.

The requested frames are split (gop.plan_chunks) into k chunks of whole GOPs, k following from how much there is
to decode and how many sessions the pool has; each chunk goes to one session and the results are put back in
presentation order. Sessions are threads of a VideoDecoderPool that lives as long as the server: PyAV releases
the GIL while decoding and converting, and NVDEC sessions are independent hardware decoders (torchcodec caches
the underlying NVDEC decoder objects per GPU, so a session reuses them from one request to the next). GPU
sessions are spread over the pool's GPUs; frames decoded on another GPU are copied to the requested device.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from spaceserve.multimodal.video import nvdec_backend, pyav_backend
from spaceserve.multimodal.video.gop import DecodeChunk, PacketIndex, plan_chunks
from spaceserve.multimodal.video.pyav_backend import PyAVOptions


@dataclass(frozen=True)
class DecoderPoolConfig:
    """cpu_sessions PyAV sessions of cpu_threads_per_session FFmpeg threads each; gpu_sessions_per_device NVDEC
    sessions on each of gpu_devices (None: every visible GPU). A chunk decodes at least min_frames_per_chunk
    frames, so short clips are not split into pieces that cost more to set up than to decode."""

    cpu_sessions: int = field(default_factory=lambda: os.cpu_count() or 1)
    cpu_threads_per_session: int = 1
    cpu_thread_type: str = "AUTO"
    gpu_sessions_per_device: int = 4
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
        self._cpu_executor: ThreadPoolExecutor | None = None
        self._gpu_executors: dict[int, ThreadPoolExecutor] = {}
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

    def cpu_executor(self) -> ThreadPoolExecutor:
        with self._lock:
            self._check_open()
            if self._cpu_executor is None:
                self._cpu_executor = ThreadPoolExecutor(self.config.cpu_sessions, thread_name_prefix="pyav-session")
            return self._cpu_executor

    def gpu_executor(self, device_index: int) -> ThreadPoolExecutor:
        with self._lock:
            self._check_open()
            executor = self._gpu_executors.get(device_index)
            if executor is None:
                executor = ThreadPoolExecutor(
                    self.config.gpu_sessions_per_device, thread_name_prefix=f"nvdec-cuda{device_index}-session"
                )
                self._gpu_executors[device_index] = executor
            return executor

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("VideoDecoderPool is closed")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            executors = [e for e in [self._cpu_executor, *self._gpu_executors.values()] if e is not None]
        for executor in executors:
            executor.shutdown(wait=True)

    def __enter__(self) -> VideoDecoderPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def decode_pyav(
    source: str | bytes,
    index: PacketIndex,
    frame_indices: tuple[int, ...],
    *,
    pool: VideoDecoderPool | None,
    options: PyAVOptions,
) -> tuple[torch.Tensor, int]:
    """Frames [T, H, W, 3] uint8 on the CPU and the number of chunks; GOP-parallel when a pool is given."""
    max_chunks = pool.config.cpu_sessions if pool is not None else 1
    min_frames = pool.config.min_frames_per_chunk if pool is not None else 1
    chunks = plan_chunks(index, frame_indices, max_chunks=max_chunks, min_frames_per_chunk=min_frames)
    out = torch.empty((len(frame_indices), index.height, index.width, 3), dtype=torch.uint8)
    position = {frame: i for i, frame in enumerate(frame_indices)}

    def run(chunk: DecodeChunk, chunk_options: PyAVOptions) -> None:
        for segment in chunk.segments:
            pyav_backend.decode_segment(source, index, segment, out, position, chunk_options)

    if pool is None or len(chunks) <= 1:
        for chunk in chunks:
            run(chunk, options if pool is None else pool.cpu_options)
        return out, len(chunks)
    executor = pool.cpu_executor()
    _wait_all([executor.submit(run, chunk, pool.cpu_options) for chunk in chunks])
    return out, len(chunks)


def decode_nvdec(
    source: str | bytes,
    index: PacketIndex,
    frame_indices: tuple[int, ...],
    *,
    device: torch.device,
    pool: VideoDecoderPool | None,
) -> tuple[torch.Tensor, int]:
    """Frames [T, H, W, 3] uint8 on `device` and the number of chunks. Raises NvdecUnavailable to fall back."""
    devices = pool.gpu_devices() if pool is not None else ()
    if pool is None or not devices:
        return nvdec_backend.decode_frames_nvdec(source, index, frame_indices, device), 1
    chunks = plan_chunks(
        index, frame_indices, max_chunks=pool.num_gpu_sessions(), min_frames_per_chunk=pool.config.min_frames_per_chunk
    )
    # Chunk i goes to GPU i mod n: neighbouring chunks land on different GPUs, every GPU gets its share.
    futures = []
    for i, chunk in enumerate(chunks):
        session_device = torch.device("cuda", devices[i % len(devices)])
        executor = pool.gpu_executor(session_device.index)
        futures.append(
            executor.submit(nvdec_backend.decode_frames_nvdec, source, index, chunk.frame_indices, session_device)
        )
    parts = _wait_all(futures)
    return torch.cat([part.to(device) for part in parts]), len(chunks)


def _wait_all(futures: list[Future]) -> list:
    """Every result in order; when some fail, wait for the rest (they write into shared buffers) then raise."""
    results, first_error = [], None
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as exc:  # re-raised below once every session is done
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return results
