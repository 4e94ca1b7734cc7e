"""The prefill lane: the SM allocator's PREFILL_SPLIT, prefill steps on the encoder's side of a split while decode-only
steps run on the LM's side (SGLang's PD multiplexing, with the encoder on the prefill side).

One lane step at a time, in flight across as many decode steps as it lasts. It runs on a second ModelRunner
(`ModelRunner.sibling`: the same model, KV cache and sampling generators, input buffers of its own) on the split's
prefill stream, a second stream on the encoder's green context, and waits on the device for what the encoder's and
the LM's streams had queued before it (the batch whose embeddings it reads, a chunk of the same prompt in the decode
lane's step). The engine collects it once its end event has fired, so its requests' KV blocks are written before
either lane touches them again; until then the scheduler keeps them out of the decode steps and never preempts them
(Scheduler.schedule_prefill_lane). A request that finishes meanwhile (an abort) frees blocks the step may still be
writing: every LM step launched before the lane step is collected then waits for it on the device (`fence`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from spaceserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from spaceserve.runtime.model_runner import ModelRunner, StepHandle
from spaceserve.runtime.multiplex import ExecutionLayout
from spaceserve.runtime.sm_partition import SMPartition
from spaceserve.sched.allocation_types import Allocation, Placement
from spaceserve.sched.scheduler import Scheduler

if TYPE_CHECKING:
    from spaceserve.engine.encoder_stage import EncoderStage
    from spaceserve.engine.sm_allocation import SMAllocation

logger = logging.getLogger(__name__)


def build_prefill_lane(
    layout: ExecutionLayout, allocation: SMAllocation | None, runner: ModelRunner
) -> PrefillLane | None:
    """The lane for `--enable-prefill-split` (EngineConfig refuses it with an encoder process or tensor
    parallelism); None (logged) without the SM allocator, which alone chooses it."""
    if allocation is None:
        logger.warning("enable_prefill_split needs space with the SM allocator (%s): not enabled", layout.reason)
        return None
    return PrefillLane(runner.sibling(None))


def decode_lane_prefill_budget(decision: Allocation | None) -> int | None:
    """The prefill tokens the (decode) LM step may take under `decision`; None: no allocator, no cap. Under
    PREFILL_SPLIT none: its LM steps are decode-only and the prefill runs in the lane."""
    if decision is None:
        return None
    return 0 if decision.placement is Placement.PREFILL_SPLIT else decision.prefill_tokens


@dataclass(frozen=True)
class LaneStep:
    scheduled: SchedulerOutput
    handle: StepHandle
    request_ids: frozenset[str]

    @property
    def end_event(self) -> torch.cuda.Event | None:
        span = self.handle.gpu_span
        return span[1] if span is not None else self.handle.done

    def gpu_ms(self) -> float | None:
        """The step's GPU time (its events must have completed); None off CUDA."""
        span = self.handle.gpu_span
        return None if span is None else span[0].elapsed_time(span[1])


class PrefillLane:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.in_flight: LaneStep | None = None
        self._fence: torch.cuda.Event | None = None
        self.num_steps = 0
        self.num_tokens = 0
        self.num_lm_steps_beside = 0
        """Decode-lane steps launched while a lane step was in flight."""

    @property
    def busy(self) -> bool:
        return self.in_flight is not None

    # ---- the engine step's calls ---------------------------------------------------------------------------

    def start(
        self,
        decision: Allocation | None,
        scheduler: Scheduler,
        stage: EncoderStage,
        allocation: SMAllocation | None,
        lm_stream: torch.cuda.Stream | None,
    ) -> bool:
        """Launch a lane step if the allocator chose PREFILL_SPLIT and the lane is free; True if one started.
        `lm_stream`: where the decode lane's last step was queued (the lane step comes after it)."""
        if decision is None or decision.placement is not Placement.PREFILL_SPLIT or decision.prefill_tokens <= 0:
            return False
        if self.in_flight is not None:
            return False
        partition = stage.layout.partition_with(decision.prefill_sms)
        if not stage.can_hold_split(partition):
            return False  # the encoder's batches in flight occupy another split (a stale decision)
        scheduled = scheduler.schedule_prefill_lane(decision.prefill_tokens)
        if scheduled.is_empty:
            return False
        stage.hold_split(partition)
        step = self.launch(scheduled, partition, stage.embeddings, (lm_stream, partition.encoder_stream))
        if allocation is not None:
            allocation.prefill_dispatched(partition.encoder_sms, step.request_ids, scheduled.num_batched_tokens)
        return True

    def finish(
        self, scheduler: Scheduler, stage: EncoderStage, allocation: SMAllocation | None
    ) -> tuple[SchedulerOutput, ModelRunnerOutput] | None:
        """Collect the lane step if it has ended: its requests go back to the scheduler's lanes and its split to
        the encoder; the caller hands the output to the scheduler as any step's."""
        finished = self.take_finished()
        if finished is None:
            return None
        step, output = finished
        scheduler.release_prefill_lane(step.scheduled)
        stage.hold_split(None)
        if allocation is not None:
            allocation.prefill_finished(step.gpu_ms())
        return step.scheduled, output

    # ---- the lane's own steps ---------------------------------------------------------------------------

    def launch(
        self,
        scheduled: SchedulerOutput,
        partition: SMPartition,
        embeddings: Mapping[str, torch.Tensor],
        after: Iterable[torch.cuda.Stream | None],
    ) -> LaneStep:
        """Run `scheduled` (prefill chunks only) on the partition's prefill stream, behind the work queued on the
        streams in `after`."""
        if self.in_flight is not None:
            raise RuntimeError("the prefill lane runs one step at a time")
        stream = partition.prefill_stream
        if stream is not None:
            for other in after:
                if other is not None and other != stream:
                    stream.wait_stream(other)
            self.runner.use_stream(stream)
        handle = self.runner.launch(scheduled, embeddings)
        self.in_flight = LaneStep(scheduled, handle, frozenset(seq.request.request_id for seq in scheduled.sequences))
        self.num_steps += 1
        self.num_tokens += scheduled.num_batched_tokens
        return self.in_flight

    def take_finished(self) -> tuple[LaneStep, ModelRunnerOutput] | None:
        """The step in flight with its sampled tokens once it has ended on the device; None while it runs or when
        there is none."""
        step = self.in_flight
        if step is None:
            return None
        end = step.end_event
        if end is not None and not end.query():
            return None
        output = self.runner.collect(step.handle)
        self.in_flight = None
        self._fence = None  # the step is done: nothing left to wait for
        return step, output

    def wait(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the step in flight to end on the device."""
        end = self.in_flight.end_event if self.in_flight is not None else None
        deadline = time.monotonic() + timeout_s
        while end is not None and not end.query() and time.monotonic() < deadline:
            time.sleep(timeout_s / 20)

    def fence_finished(self, request_ids: Iterable[str]) -> None:
        """Requests that finished (their KV blocks freed): if the step in flight is theirs, LM steps launched from
        now until it is collected wait for it on the device (`order_after_fence`)."""
        step = self.in_flight
        if step is not None and step.request_ids.intersection(request_ids):
            self._fence = step.end_event

    def before_lm_step(self, stream: torch.cuda.Stream | None) -> None:
        """The decode lane is about to launch a step on `stream`: it waits for the fence, if any, and is counted."""
        self.num_lm_steps_beside += self.in_flight is not None
        self.order_after_fence(stream)

    def order_after_fence(self, stream: torch.cuda.Stream | None) -> None:
        if self._fence is not None and stream is not None:
            stream.wait_event(self._fence)

    def release(self, request_id: str) -> None:
        self.runner.release(request_id)

    def forget_blocks(self, request_ids: Iterable[str]) -> None:
        """Requests the decode lane preempted: the lane's runner rebuilds their block-table rows when it next sees
        them (blocks handed back in another order could pass its cheap staleness check)."""
        for request_id in request_ids:
            self.runner.input_batch.forget_blocks(request_id)

    def prometheus_samples(self) -> list[tuple[str, dict[str, str], float]]:
        return [("spaceserve:prefill_lane_steps_total", {}, float(self.num_steps)),
                ("spaceserve:prefill_lane_tokens_total", {}, float(self.num_tokens))]

    def counters(self) -> dict[str, float]:
        return {"prefill_lane_steps": self.num_steps, "prefill_lane_tokens": self.num_tokens,
                "prefill_lane_lm_steps_beside": self.num_lm_steps_beside}
