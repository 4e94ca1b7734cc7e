"""Runs encoder batches on a thread of its own, concurrently with the engine's language-model loop.

The engine thread keeps every piece of bookkeeping (encoder scheduler, encoder cache, which images are ready); the
worker only executes: it takes a batch and the stream to run it on, launches the vision tower there, records a
CUDA event after it and waits on that event (releasing the GIL), then hands the embeddings back. They never leave
the device: the engine stores the tensors in its encoder outputs and marks the images ready when it polls, and
since the batch's event has completed by then, the LM stream can read them without waiting.

Only `max_in_flight` batches may be submitted and not yet polled, so the GPU queue behind the encoder stays
shallow and the engine decides late which stream (SM partition) each batch runs on.

On CPU the same thread runs the tower with torch's CPU kernels (which release the GIL), so concurrency is real and
testable there too.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from spaceserve.core.scheduler_output import EncoderBatch
from spaceserve.runtime.device import device_with_index
from spaceserve.runtime.encoder_runner import EncoderRunner


@dataclass(frozen=True)
class EncodedBatch:
    """One finished batch. `embeddings` maps mm_hash -> rows on the device; empty when `error` is set."""

    batch: EncoderBatch
    embeddings: dict[str, torch.Tensor]
    start_time: float
    """time.monotonic() when the worker started launching the batch."""
    end_time: float
    """time.monotonic() when its last kernel had finished."""
    launch_s: float
    """Host time spent launching the batch (Python, GIL held or waited for)."""
    on_full_device: bool
    error: BaseException | None = None


@dataclass
class EncoderWorkerStats:
    """Totals since the worker started; read by benchmarks to show where host time goes."""

    num_batches: int = 0
    launch_s: float = 0.0
    busy_s: float = 0.0
    """Wall time from launch start to the batch's end, summed."""
    num_full_device_batches: int = 0


@dataclass(frozen=True)
class _Job:
    batch: EncoderBatch
    stream: torch.cuda.Stream | None
    on_full_device: bool = False


_STOP = object()


@dataclass
class _Completions:
    items: list[EncodedBatch] = field(default_factory=list)
    ready: threading.Condition = field(default_factory=threading.Condition)


class EncoderWorker:
    def __init__(self, runner: EncoderRunner, device: torch.device, max_in_flight: int = 2) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.runner = runner
        self.device = device
        self.max_in_flight = max_in_flight
        self.stats = EncoderWorkerStats()
        # the CUDA device is per thread; resolve "cuda" to the index the engine thread uses
        self._device_index = device_with_index(device).index
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done = _Completions()
        self._in_flight = 0  # submitted and not yet polled; touched only by the engine thread
        self.dead_error: BaseException | None = None  # a thread never dies on its own (the process worker's can)
        self._thread = threading.Thread(target=self._run, name="spaceserve-encoder", daemon=True)
        self._thread.start()

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    @property
    def has_room(self) -> bool:
        return self._in_flight < self.max_in_flight

    def submit(self, batch: EncoderBatch, stream: torch.cuda.Stream | None, on_full_device: bool = False,
               split: object = None) -> None:
        """`split`: the SM split `stream` belongs to; unused here (the stream says where), the process worker
        needs it."""
        if not self.has_room:
            raise RuntimeError(f"the encoder worker already has {self._in_flight} batches in flight")
        if not self._thread.is_alive():
            raise RuntimeError("the encoder worker has stopped")
        self._in_flight += 1
        self._jobs.put(_Job(batch, stream, on_full_device))

    def poll(self, timeout: float = 0.0) -> list[EncodedBatch]:
        """Finished batches since the last poll; with `timeout`, waits that long for one if none has finished."""
        with self._done.ready:
            if not self._done.items and timeout > 0 and self._in_flight:
                self._done.ready.wait(timeout)
            finished, self._done.items = self._done.items, []
        self._in_flight -= len(finished)
        return finished

    def shutdown(self) -> None:
        """Finish the batch in hand, then stop the thread. Idempotent."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()

    # ---- the worker thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        if self._device_index is not None:
            torch.cuda.set_device(self._device_index)
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            finished = self._execute(job)
            self.stats.num_batches += 1
            self.stats.launch_s += finished.launch_s
            self.stats.busy_s += finished.end_time - finished.start_time
            self.stats.num_full_device_batches += int(job.on_full_device)
            with self._done.ready:
                self._done.items.append(finished)
                self._done.ready.notify()

    def _execute(self, job: _Job) -> EncodedBatch:
        start = time.monotonic()
        try:
            if job.stream is None:
                embeddings = self.runner.execute(job.batch)
                launched = time.monotonic()
            else:
                with torch.cuda.stream(job.stream):
                    embeddings = self.runner.execute(job.batch)
                    finished = torch.cuda.Event()
                    finished.record(job.stream)
                launched = time.monotonic()
                finished.synchronize()
        except Exception as exc:  # noqa: BLE001 - handed to the engine thread, which decides what fails
            now = time.monotonic()
            return EncodedBatch(job.batch, {}, start, now, now - start, job.on_full_device, error=exc)
        return EncodedBatch(job.batch, embeddings, start, time.monotonic(), launched - start, job.on_full_device)
