"""The engine's side of concurrent encoding (`streams` and `space`): feeds the encoder worker from the encoder
scheduler and takes its finished batches back, all on the engine thread, so the schedulers and caches are only
ever touched by one thread.

Each engine step: `collect` stores the embeddings of finished batches and marks their images ready (the LM
scheduler can then prefill past them); the LM step is scheduled; `dispatch` hands the worker new batches in the
encoder policy's order while it has room (at most two batches in flight); `lm_stream` says where the LM step runs.

In `space` each batch runs on the encoder side of the split `ExecutionLayout.partition_for` picks from the LM's
load, except a batch dispatched while the LM had nothing to run, which gets the whole device (a lone request's
image is encoded as fast as `time` would). Batches in flight together share one split, and the LM runs on that
split's other side while they are in flight, on the whole device otherwise.

Both loops are Python threads. When the LM thread returns from its device wait it needs the GIL, which the
encoder thread may hold while launching the vision tower; CPython hands it over only every switch interval (5 ms
by default, as long as a decode step), so starting a concurrent encoder lowers the interval to
`GIL_SWITCH_INTERVAL_S` for the process.
"""

from __future__ import annotations

import sys

import torch

from spaceserve.core.request import Request
from spaceserve.engine.encoder_batches import stamp_requests, store_embeddings, take_encoder_batch
from spaceserve.runtime.encoder_runner import EncoderRunner
from spaceserve.runtime.encoder_worker import EncodedBatch, EncoderWorker
from spaceserve.runtime.multiplex import ExecutionLayout
from spaceserve.runtime.sm_partition import SMPartition
from spaceserve.kvcache.encoder_cache import EncoderCache
from spaceserve.sched.encoder_scheduler import EncoderScheduler


GIL_SWITCH_INTERVAL_S = 0.0005


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
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self.worker = EncoderWorker(runner, device)
        self._split: SMPartition | None = None  # the split of the batches in flight (None: whole device / streams)

    @property
    def busy(self) -> bool:
        return self.worker.num_in_flight > 0

    def collect(self, timeout: float = 0.0) -> bool:
        """Take in finished batches (waiting up to `timeout` for one); True if any finished."""
        finished = self.worker.poll(timeout)
        for done in finished:
            self._take(done)
        if not self.busy:
            self._split = None
        return bool(finished)

    def dispatch(self, lm_idle: bool, num_running: int) -> None:
        while self.worker.has_room:
            on_full_device = lm_idle and not self.busy and self.layout.encoder_full_stream is not None
            split = None
            if self.layout.partitions and not on_full_device:
                split = self.layout.partition_for(num_running)
                if self.busy and split is not self._split:
                    return  # one split at a time: the LM must know which SMs are its own
            batch = take_encoder_batch(self.encoder_scheduler, self.encoder_outputs, self.requests)
            if batch is None:
                return
            if on_full_device:
                stream = self.layout.encoder_full_stream
            else:
                stream = split.encoder_stream if split is not None else self.layout.encoder_stream
            self._split = split
            self.worker.submit(batch, stream, on_full_device)
            if on_full_device:
                return  # a whole-device batch runs alone

    def lm_stream(self) -> torch.cuda.Stream | None:
        if self.busy and self._split is not None:
            return self._split.lm_stream
        return self.layout.lm_stream

    def shutdown(self) -> None:
        self.worker.shutdown()

    def _take(self, done: EncodedBatch) -> None:
        if done.error is not None:
            raise EncoderFailedError(f"encoding {len(done.batch.items)} items failed: {done.error!r}") from done.error
        store_embeddings(done.embeddings, self.encoder_outputs, self.encoder_cache)
        stamp_requests(self.requests, done.batch.request_ids, "encoder_end_time", done.end_time)
