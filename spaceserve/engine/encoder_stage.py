"""The encoder side of the engine, owned in one place: its queue and policy (EncoderScheduler), the accounting of
the encoder cache (EncoderCache), the embedding tensors (EmbeddingStore), the vision tower (EncoderRunner), the
worker that runs it concurrently with the LM, the choice of SM split per batch, and the timestamps of each batch.

Two ways to run, one per execution layout (runtime/multiplex.py):
- inline (`time`): `run_inline` encodes one batch on the LM's stream inside the engine step, before the LM step.
- concurrent (`streams`, `space`): each engine step `collect`s finished batches (embeddings stored, images marked
  ready, so the LM scheduler can prefill past them), then `dispatch`es new batches in policy order while the worker
  has room (at most two in flight); `lm_stream` says where the LM step runs meanwhile.

In `space` each batch runs on the encoder side of the split the split policy picks, except a batch dispatched while
the LM had nothing to run, which gets the whole device (a lone request's image is encoded as fast as `time` would).
Batches in flight together share one split, and the LM runs on that split's other side while they are in flight.

Everything here runs on the engine thread; the worker only executes. The worker is a thread of this process
(runtime/encoder_worker.py) or, with `encoder_process` (`mps` always), a process of its own
(runtime/encoder_process.py) behind the same contract. A thread shares the GIL: when the LM thread returns from its
device wait it needs the GIL, which the encoder thread may hold while launching the vision tower, and CPython hands
it over only every switch interval (5 ms by default, as long as a decode step), so a stage with a worker thread
lowers the interval to `GIL_SWITCH_INTERVAL_S` for the process.

If the encoder process dies, the batches it had are lost: their cache entries are dropped, and every request that
waits for an image it can no longer get (those batches' and any queued one's) is handed to the engine core to fail
(`take_failed_requests`), which keeps serving the rest; `check_health` reports it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from spaceserve.config import EncoderConfig
from spaceserve.core.request import Request
from spaceserve.core.scheduler_output import EncoderBatch
from spaceserve.kvcache.encoder_cache import EncoderCache
from spaceserve.runtime.embedding_store import EmbeddingStore
from spaceserve.runtime.encoder_process import EncoderProcessDiedError, ProcessEncoderStats, ProcessEncoderWorker
from spaceserve.runtime.encoder_runner import EncoderRunner
from spaceserve.runtime.encoder_worker import EncodedBatch, EncoderWorker
from spaceserve.runtime.multiplex import ExecutionLayout
from spaceserve.runtime.sm_partition import SMPartition
from spaceserve.sched.allocation_types import Allocation
from spaceserve.sched.encoder_scheduler import EncoderScheduler

if TYPE_CHECKING:
    from spaceserve.engine.sm_allocation import SMAllocation

GIL_SWITCH_INTERVAL_S = 0.0005

GpuSpan = tuple[torch.cuda.Event, torch.cuda.Event]


class EncoderFailedError(RuntimeError):
    """The vision tower raised while encoding a batch (a device fault, not bad input: inputs were validated)."""


class EncoderUnavailableError(RuntimeError):
    """The encoder's process has died: requests that need an image encoded fail; the rest are served."""


class EncoderStage:
    def __init__(
        self,
        config: EncoderConfig,
        device: torch.device,
        layout: ExecutionLayout,
        runner: EncoderRunner | None,
        worker: ProcessEncoderWorker | None = None,
    ) -> None:
        """`runner`: the executor's (one rank's EncoderRunner with its vision graphs, or the tensor-parallel one with
        its interface; None with an encoder process). `worker`: an encoder process already started (the executor
        starts it before it sizes its KV cache); without one, a concurrent layout gets a worker thread."""
        self.device = device
        self.layout = layout
        self.cache = EncoderCache(config.cache_tokens)
        self.scheduler = EncoderScheduler(config, self.cache)
        self.embeddings = EmbeddingStore()
        self.runner = runner
        self._requests: Mapping[str, Request] = {}
        # CUDA events recorded after inline batches, resolved to encoder_end_time once the LM step has synced
        self._end_events: list[tuple[torch.cuda.Event, frozenset[str]]] = []
        self._inline_span: GpuSpan | None = None
        self.worker: EncoderWorker | ProcessEncoderWorker | None = worker
        self._split: SMPartition | None = None  # the split of the batches in flight (None: whole device / streams)
        self._held_split: SMPartition | None = None  # the prefill lane's split while its step runs
        self._allocation: SMAllocation | None = None
        self._lost_request_ids: set[str] = set()  # waiting for batches a dead encoder process lost
        if worker is None and layout.concurrent:
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
            self.worker = EncoderWorker(self.runner, device)

    def bind_requests(self, requests: Mapping[str, Request]) -> None:
        """The LM scheduler's requests by id: batches stamp their encoder timestamps on those still in flight."""
        self._requests = requests

    @property
    def concurrent(self) -> bool:
        return self.worker is not None

    @property
    def busy(self) -> bool:
        return self.worker is not None and self.worker.num_in_flight > 0

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- inline (time) ---------------------------------------------------------------------------------------

    def run_inline(self, stream: torch.cuda.Stream | None) -> bool:
        """Encode the next batch on `stream` (the LM's: the LM step that follows waits for it); False if nothing
        is queued or fits."""
        batch = self._take_batch()
        if batch is None:
            return False
        if stream is None:
            self._store(self.runner.execute(batch))
            self._stamp(batch.request_ids, "encoder_end_time", time.monotonic())
            return True
        with torch.cuda.stream(stream):
            started = torch.cuda.Event(enable_timing=True)
            started.record(stream)
            self._store(self.runner.execute(batch))
            finished = torch.cuda.Event(enable_timing=True)
            finished.record(stream)
        self._end_events.append((finished, batch.request_ids))
        self._inline_span = (started if self._inline_span is None else self._inline_span[0], finished)
        return True

    def take_inline_span(self) -> GpuSpan | None:
        """The GPU span of the inline batches run since the last call (they sit between two LM steps)."""
        span, self._inline_span = self._inline_span, None
        return span

    def resolve_end_times(self) -> None:
        """Turn the events recorded after inline batches into time.monotonic() stamps. Called once the LM step's
        own sync has passed them, so the marker below completes at once and timing costs no extra wait."""
        if not self._end_events:
            return
        marker = torch.cuda.Event(enable_timing=True)
        marker.record(torch.cuda.current_stream(self.device))
        marker.synchronize()
        now = time.monotonic()
        for finished, request_ids in self._end_events:
            self._stamp(request_ids, "encoder_end_time", now - finished.elapsed_time(marker) / 1e3)
        self._end_events.clear()

    # ---- concurrent (streams, space) -------------------------------------------------------------------------

    def collect(self, timeout: float = 0.0) -> bool:
        """Take in finished batches (waiting up to `timeout` for one); True if any finished."""
        if self.worker is None:
            return False
        finished = self.worker.poll(timeout)
        for done in finished:
            self._take(done)
        if not self.busy:
            self._split = None
        return bool(finished)

    def attach_allocation(self, allocation: SMAllocation | None) -> None:
        """The SM allocation told of each batch dispatched and finished (its predictions against measured times)."""
        self._allocation = allocation

    def dispatch(self, lm_idle: bool, num_running: int, allocation: Allocation | None = None) -> None:
        """Hand the worker new batches in policy order while it has room. With the SM allocator's decision: the next
        batch only, on the split (or the whole device) it chose, or none when it chose 0 encoder SMs."""
        worker = self.worker
        if worker is None:
            return
        if allocation is not None:
            self._dispatch_allocated(allocation)
            return
        while worker.has_room:
            on_full_device = lm_idle and not self.busy and self.layout.encoder_full_stream is not None
            split = None
            if self.layout.partitions and not on_full_device:
                split = self.layout.partition_for(num_running)
                if self.busy and split is not self._split:
                    return  # one split at a time: the LM must know which SMs are its own
            batch = self._take_batch()
            if batch is None:
                return
            if on_full_device:
                stream = self.layout.encoder_full_stream
            else:
                stream = split.encoder_stream if split is not None else self.layout.encoder_stream
            self._split = split
            worker.submit(batch, stream, on_full_device, split)
            if on_full_device:
                return  # a whole-device batch runs alone

    def _dispatch_allocated(self, allocation: Allocation) -> None:
        sms = allocation.encoder_sms
        if sms <= 0 or not self.worker.has_room:
            return
        on_full_device = sms >= self.layout.total_sms or not self.layout.partitions
        split = None if on_full_device else self.layout.partition_with(sms)
        occupied, current = self._occupied_split()
        if occupied and (on_full_device or split is not current):
            return  # one split at a time (the allocator plans for the one in flight; this guards a stale view)
        batch = self._take_batch()
        if batch is None:
            return
        stream = self.layout.encoder_full_stream if on_full_device else split.encoder_stream
        self._split = split
        self.worker.submit(batch, stream, on_full_device, split)
        if self._allocation is not None:
            self._allocation.dispatched(allocation, sms, batch.request_ids)

    def lm_stream(self) -> torch.cuda.Stream | None:
        """Where the LM step runs now: its side of the split in flight, else the whole device (None: its own)."""
        _, split = self._occupied_split()
        return split.lm_stream if split is not None else self.layout.lm_stream

    def can_hold_split(self, split: SMPartition) -> bool:
        """Whether the prefill lane may run on `split` now: no encoder batch occupies another split."""
        occupied, current = self._occupied_split()
        return not occupied or current is split

    def hold_split(self, split: SMPartition | None) -> None:
        """The prefill lane runs on `split`'s encoder side (None: it has ended): batches go to that split only and
        the LM's steps to its other side meanwhile."""
        if split is not None and not self.can_hold_split(split):
            raise RuntimeError("the prefill lane must run on the split of the encoder batches in flight")
        self._held_split = split

    def _occupied_split(self) -> tuple[bool, SMPartition | None]:
        """(whether encoder batches or the prefill lane are in flight, the split they occupy: None for a
        whole-device or unsplit batch)."""
        if self.busy:
            return True, self._split
        return self._held_split is not None, self._held_split

    # ---- introspection and shutdown --------------------------------------------------------------------------

    def counters(self) -> dict[str, float]:
        if self.worker is None:
            return {}
        stats = self.worker.stats
        counters = {
            "encoder_batches": stats.num_batches,
            "encoder_launch_s": stats.launch_s,
            "encoder_busy_s": stats.busy_s,
            "encoder_full_device_batches": stats.num_full_device_batches,
        }
        if isinstance(stats, ProcessEncoderStats):
            counters["encoder_copy_out_s"] = stats.copy_out_s
            counters["encoder_copy_out_bytes"] = stats.copy_out_bytes
        return counters

    @property
    def worker_error(self) -> BaseException | None:
        """Why the worker can run no more batches (its process died); None while it can."""
        return self.worker.dead_error if self.worker is not None else None

    def take_failed_requests(self) -> tuple[frozenset[str], str]:
        """Once the worker is gone: the requests that wait for an image it can no longer encode (those of the
        batches it lost, and those waiting for a queued image), with the reason; nothing while it is alive."""
        error = self.worker_error
        if error is None:
            return frozenset(), ""
        failed = set(self._lost_request_ids)
        self._lost_request_ids.clear()
        queued = self.scheduler.is_queued
        failed.update(
            request_id for request_id, request in self._requests.items()
            if any(queued(feature.mm_hash) for feature in request.mm_features)
        )  # fmt: skip
        return frozenset(failed), str(error)

    def check_health(self) -> None:
        """Raises EncoderUnavailableError once the worker is gone."""
        if self.worker_error is not None:
            raise EncoderUnavailableError(f"the encoder is unavailable: {self.worker_error}")

    def check_integrity(self, expect_idle: bool = True) -> None:
        self.cache.check_integrity(expect_idle)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()

    # ---- bookkeeping shared by both ways ---------------------------------------------------------------------

    def _take_batch(self) -> EncoderBatch | None:
        """The next batch in policy order (None if nothing fits). Drops the tensors of entries the cache evicted to
        make room, and stamps encoder_scheduled_time on the requests waiting for the batch."""
        batch = self.scheduler.schedule()
        self.embeddings.drop(self.scheduler.pop_evicted())
        if batch is not None:
            self._stamp(batch.request_ids, "encoder_scheduled_time", time.monotonic())
        return batch

    def _store(self, embeddings: Mapping[str, torch.Tensor]) -> None:
        for mm_hash, rows in embeddings.items():
            self.embeddings.put(mm_hash, rows)
            self.cache.mark_ready(mm_hash)

    def _take(self, done: EncodedBatch) -> None:
        if isinstance(done.error, EncoderProcessDiedError):
            for item in done.batch.items:  # pending entries nobody will fill
                self._lost_request_ids.update(self.cache.drop(item.mm_hash))
            self._lost_request_ids.update(done.batch.request_ids)
            return
        if done.error is not None:
            raise EncoderFailedError(f"encoding {len(done.batch.items)} items failed: {done.error!r}") from done.error
        self._store(done.embeddings)
        self._stamp(done.batch.request_ids, "encoder_end_time", done.end_time)
        if self._allocation is not None:
            self._allocation.batch_finished(done.batch.request_ids, done.end_time - done.start_time)

    def _stamp(self, request_ids: Iterable[str], field: str, value: float) -> None:
        """Set a timestamp on those of `request_ids` still in flight (aborted ones are gone)."""
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is not None:
                setattr(request, field, value)
