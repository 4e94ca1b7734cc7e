"""The engine side of the SM allocator (`space`): before each LM step and encoder dispatch it reads the queues, asks
the allocator (sched/allocator.py, pure) where the next encoder batch runs and how many prefill tokens the LM step
may take, and records each decision's predictions against what was measured (allocation_counters.py). From the LM
steps' measured GPU times it learns how much slower than their curves they run, beside the encoder and alone
(prediction_correction.py), and hands the allocator those factors.

The allocator chooses among the splits the execution layout made (green contexts and their streams, with graphs
captured on each), plus the whole device for either side. Its curves come from `--sm-curves` or, without a file, from
a bounded profile of the engine's own splits at start-up (profile/sm_curves.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from spaceserve.config import EngineConfig
from spaceserve.sched.allocation_counters import AllocatorCounters
from spaceserve.sched.allocation_state import allocator_state
from spaceserve.sched.allocation_types import Allocation, AllocatorConfig, EncoderInFlight, Placement
from spaceserve.sched.allocator import SMAllocator
from spaceserve.sched.encoder_scheduler import EncoderScheduler
from spaceserve.sched.prediction_correction import StepTimeCorrection
from spaceserve.sched.resource_curves import ResourceCurves
from spaceserve.sched.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass
class _BatchInFlight:
    encoder_sms: int
    ends_at: float
    request_ids: frozenset[str]
    decision: Allocation


class SMAllocation:
    def __init__(self, config: EngineConfig, curves: ResourceCurves, layout_encoder_sms: tuple[int, ...]) -> None:
        self.config = AllocatorConfig.from_engine_config(config)
        self.allocator = SMAllocator(curves, self.config)
        granted = set(layout_encoder_sms)
        self.allocator.splits = tuple(s for s in self.allocator.splits if s.encoder_sms in granted)
        if not self.allocator.splits:
            logger.warning("no split of the layout (%s encoder SMs) lies within the curves' measured SMs; the "
                           "encoder runs on the whole device only", sorted(granted))
        self.total_sms = curves.total_sms
        self.counters = AllocatorCounters()
        self.lm_step_split = StepTimeCorrection()
        """Measured / curve GPU time of LM steps on a split, beside the encoder."""
        self.lm_step_whole = StepTimeCorrection()
        self._in_flight: list[_BatchInFlight] = []
        self._last_decode_output: float | None = None
        logger.info("SM allocator: splits %s of %d SMs, TPOT SLO %.0f ms, TTFT SLO %.0f ms",
                    [s.encoder_sms for s in self.allocator.splits], self.total_sms, self.config.slo_tpot_ms,
                    self.config.slo_ttft_ms)

    def decide(self, scheduler: Scheduler, encoder_scheduler: EncoderScheduler) -> Allocation:
        if self._nothing_to_weigh(scheduler, encoder_scheduler):
            # steady decoding, nothing to encode or prefill: the LM gets every SM; skips the state and the forecast
            # (milliseconds of host time) on the steps where only one answer is possible
            decision = Allocation(Placement.LM_WHOLE, 0, self.total_sms, self.config.max_num_batched_tokens,
                                  reason="decodes only")
            self.counters.record_decision(decision)
            return decision
        now = time.monotonic()
        in_flight = None
        if self._in_flight:
            batch = self._in_flight[-1]
            ids = frozenset().union(*(b.request_ids for b in self._in_flight))
            in_flight = EncoderInFlight(batch.encoder_sms, max(b.ends_at for b in self._in_flight), ids)
        stalled = 0.0 if self._last_decode_output is None else (now - self._last_decode_output) * 1e3
        state = allocator_state(scheduler, encoder_scheduler, now, in_flight=in_flight, decode_stalled_ms=stalled,
                                lm_step_scales=(self.lm_step_split.factor, self.lm_step_whole.factor))
        decision = self.allocator.decide(state)
        self.counters.record_decision(decision)
        return decision

    def _nothing_to_weigh(self, scheduler: Scheduler, encoder_scheduler: EncoderScheduler) -> bool:
        if self._in_flight or encoder_scheduler.has_work or scheduler.num_waiting:
            return False
        return all(request.num_output_tokens for request in scheduler.running)

    # ---- what happened --------------------------------------------------------------------------------------

    def dispatched(self, decision: Allocation, encoder_sms: int, request_ids: frozenset[str]) -> None:
        predicted_ms = decision.predicted_encoder_batch_ms or 0.0
        ends_at = time.monotonic() + predicted_ms / 1e3
        self._in_flight.append(_BatchInFlight(encoder_sms, ends_at, request_ids, decision))

    def batch_finished(self, request_ids: frozenset[str], seconds: float) -> None:
        for index, batch in enumerate(self._in_flight):
            if batch.request_ids == request_ids:
                self.counters.record_encoder_batch(batch.decision, seconds * 1e3)
                del self._in_flight[index]
                return

    def lm_step_timed(self, decision: Allocation | None, gpu_ms: float) -> None:
        """A step's GPU time, once its events completed (possibly a few steps after it was collected)."""
        if decision is None:
            return
        self.counters.record_lm_step(decision, gpu_ms)
        if decision.lm_step_curve_ms is not None:
            correction = self.lm_step_whole if decision.lm_sms >= self.total_sms else self.lm_step_split
            correction.observe(decision.lm_step_curve_ms, gpu_ms)

    def lm_step_collected(self, decision: Allocation | None, decoded: bool) -> None:
        now = time.monotonic()
        if decoded:
            if decision is not None and self._last_decode_output is not None:
                gap_ms = (now - self._last_decode_output) * 1e3
                self.counters.record_decode_gap(decision, gap_ms, self.config.slo_tpot_ms)
            self._last_decode_output = now
        else:
            self._last_decode_output = None

    def as_dict(self) -> dict[str, float]:
        return self.counters.as_dict()
