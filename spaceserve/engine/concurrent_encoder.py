"""The engine's side of concurrent encoding (`streams` and `space`): feeds the encoder worker from the encoder
scheduler and takes its finished batches back, all on the engine thread, so the schedulers and caches are only
ever touched by one thread.

Each engine step: `collect` stores the embeddings of finished batches and marks their images ready (the LM
scheduler can then prefill past them); the LM step is scheduled; `dispatch` hands the worker new batches in the
encoder policy's order while it has room (at most two batches in flight); `lm_stream` says where the LM step runs.

In `space` the encoder's batches run on its SM partition, except a batch dispatched while the LM had nothing to run,
which gets the whole device (a lone request's image is encoded as fast as `time` would). The LM runs on its
partition while a batch is in flight and on the whole device otherwise.
"""

from __future__ import annotations

import time

import torch

from spaceserve.core.request import Request
from spaceserve.runtime.encoder_runner import EncoderRunner
from spaceserve.runtime.encoder_worker import EncodedBatch, EncoderWorker
from spaceserve.runtime.multiplex import ExecutionLayout
from spaceserve.kvcache.encoder_cache import EncoderCache
from spaceserve.sched.encoder_scheduler import EncoderScheduler


class EncoderFailedError(RuntimeError):
    """The vision tower raised while encoding a batch (a device fault, not bad input: inputs were validated)."""


class ConcurrentEncoder:
    def __init__(
        self,
        layout: ExecutionLayout,
        runner: EncoderRunner,
        device: torch.device,
        encoder_scheduler: EncoderScheduler,
        encoder_cache: EncoderCache,
        encoder_outputs: dict[str, torch.Tensor],
        requests: dict[str, Request],
    ) -> None:
        self.layout = layout
        self.encoder_scheduler = encoder_scheduler
        self.encoder_cache = encoder_cache
        self.encoder_outputs = encoder_outputs
        self.requests = requests
        self.worker = EncoderWorker(runner, device)

    @property
    def busy(self) -> bool:
        return self.worker.num_in_flight > 0

    def collect(self, timeout: float = 0.0) -> bool:
        """Take in finished batches (waiting up to `timeout` for one); True if any finished."""
        finished = self.worker.poll(timeout)
        for done in finished:
            self._take(done)
        return bool(finished)

    def dispatch(self, lm_idle: bool) -> None:
        while self.worker.has_room:
            on_full_device = lm_idle and not self.busy and self.layout.encoder_full_stream is not None
            batch = self.encoder_scheduler.schedule()
            for mm_hash in self.encoder_scheduler.pop_evicted():
                self.encoder_outputs.pop(mm_hash, None)
            if batch is None:
                return
            now = time.monotonic()
            for request_id in batch.request_ids:
                request = self.requests.get(request_id)
                if request is not None:
                    request.encoder_scheduled_time = now
            stream = self.layout.encoder_full_stream if on_full_device else self.layout.encoder_stream
            self.worker.submit(batch, stream, on_full_device)

    def lm_stream(self) -> torch.cuda.Stream | None:
        if self.busy and self.layout.lm_partition_stream is not None:
            return self.layout.lm_partition_stream
        return self.layout.lm_stream

    def shutdown(self) -> None:
        self.worker.shutdown()

    def _take(self, done: EncodedBatch) -> None:
        if done.error is not None:
            raise EncoderFailedError(f"encoding {len(done.batch.items)} items failed: {done.error!r}") from done.error
        for mm_hash, rows in done.embeddings.items():
            self.encoder_outputs[mm_hash] = rows
            self.encoder_cache.mark_ready(mm_hash)
        for request_id in done.batch.request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                request.encoder_end_time = done.end_time
