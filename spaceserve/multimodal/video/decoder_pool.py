"""The decoder sessions of an engine (FlashCodec's pool): PyAV sessions on the CPU and NVDEC sessions on each decoding
GPU, threads that live as long as the server. Sessions are opened and warmed when the engine starts (`warm_up`:
FFmpeg's codecs for PyAV; torchcodec, CUDA and NVDEC state for each GPU session), so no request pays their
start-up. `reserve` hands a video as many free sessions as it asks for (at least one) and counts them until they
are given back, so each video's share follows its length and what the other videos hold.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from spaceserve.multimodal.video import nvdec_backend, pyav_backend
from spaceserve.multimodal.video.gop import index_packets, plan_chunks
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
        timings = {}
        kinds: list[tuple[str | int, bytes]] = []
        if cpu_clip is not None:
            kinds.append((CPU, cpu_clip))
        if gpu_clip is not None and self.gpu_devices():
            _, reason = nvdec_backend._import_torchcodec()
            if reason is None:
                kinds += [(device, gpu_clip) for device in self.gpu_devices()]
            else:
                logger.info("NVDEC sessions not warmed up (videos will decode on the CPU): %s", reason)
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
    index = index_packets(clip)
    chunk, = plan_chunks(index, tuple(range(index.num_frames)), max_chunks=1)
    out = torch.empty((index.num_frames, index.height, index.width, 3), dtype=torch.uint8)
    positions = {frame: frame for frame in range(index.num_frames)}
    for segment in chunk.segments:
        pyav_backend.decode_segment(clip, index, segment, out, positions, PyAVOptions())


def _warm_nvdec_session(clip: bytes, where: str | int) -> None:
    index = index_packets(clip)
    device = torch.device("cuda", int(where))
    if (reason := nvdec_backend.nvdec_unavailable_reason(index, device)) is not None:
        raise nvdec_backend.NvdecUnavailable(reason)
    decoder = nvdec_backend.open_decoder(clip, index, device)
    nvdec_backend.decode_with(decoder, index, list(range(index.num_frames)), device)
    torch.cuda.synchronize(device)
