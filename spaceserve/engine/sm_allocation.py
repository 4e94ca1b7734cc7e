"""The engine side of the SM allocator (`space`): before each LM step and encoder dispatch it reads the queues, asks
the allocator (sched/allocator.py, pure) where the next encoder batch runs and how many prefill tokens the LM step
may take, and records each decision's predictions against what was measured (allocation_counters.py). From the LM
steps' measured GPU times it learns how much slower than their curves they run, beside the encoder and alone, and
from the decode gaps the host time each step adds to its GPU time (prediction_correction.py), and hands the
allocator both.

A decode gap ends with the collection of a step, whose GPU time is known once its CUDA events completed: at that
collection or a few later ones. Each gap is paired with its step's GPU time by the step's decision, which the step
carries from launch to collection and timing (by identity: a "decodes only" decision is equal by value to every
other); the pairs waiting for their other half are few, and bounded.

The allocator chooses among the splits the execution layout made (green contexts and their streams, with graphs
captured on each), plus the whole device for either side. Its curves come from `--sm-curves` or, without a file, from
a bounded profile of the engine's own splits at start-up (profile/sm_curves.py).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

from spaceserve.config import EngineConfig
from spaceserve.sched.allocation_counters import AllocatorCounters
from spaceserve.sched.allocation_state import allocator_state
from spaceserve.sched.allocation_types import Allocation, AllocatorConfig, EncoderInFlight, Placement
from spaceserve.sched.allocator import SMAllocator
from spaceserve.sched.encoder_scheduler import EncoderScheduler
from spaceserve.sched.prediction_correction import HostTimeCorrection, StepTimeCorrection
from spaceserve.sched.resource_curves import ResourceCurves
from spaceserve.sched.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass
class _BatchInFlight:
    """Work holding a split: an encoder batch (its decision carries the prediction), or the prefill lane's step."""

    encoder_sms: int
    ends_at: float
    request_ids: frozenset[str]
    decision: Allocation | None = None
    predicted_ms: float | None = None
    """The lane's step: its predicted GPU time."""


@dataclass
class _StepTimes:
    decision: Allocation
    """Held so that no other decision takes its id while it waits."""
    gap_ms: float | None = None
    gpu_ms: float | None = None


class SMAllocation:
    MAX_UNPAIRED_STEPS = 64
    """Steps whose decode gap waits for its GPU time, or the reverse (off CUDA, no GPU time ever comes)."""

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
        self.lm_step_host = HostTimeCorrection(high_ms=self.config.slo_tpot_ms)
        """Host time a decode gap adds to its step's GPU time; clipped at the TPOT SLO, past which every decoding
        plan is infeasible anyway."""
        self._unpaired: OrderedDict[int, _StepTimes] = OrderedDict()
        self._in_flight: list[_BatchInFlight] = []
        self._lane: _BatchInFlight | None = None
        """The prefill lane's step in flight (PREFILL_SPLIT): it holds its split as an encoder batch would."""
        self._last_decode_output: float | None = None
        logger.info("SM allocator: splits %s of %d SMs, TPOT SLO %.0f ms, TTFT SLO %.0f ms",
                    [s.encoder_sms for s in self.allocator.splits], self.total_sms, self.config.slo_tpot_ms,
                    self.config.slo_ttft_ms)

    def decide(self, scheduler: Scheduler, encoder_scheduler: EncoderScheduler) -> Allocation:
        if self._nothing_to_weigh(scheduler, encoder_scheduler):
            # steady decoding, nothing to encode or prefill: the LM gets every SM; skips the state and the forecast
            # (milliseconds of host time) on the steps where only one answer is possible
            decision = Allocation(Placement.LM_WHOLE, 0, self.total_sms, self.config.max_num_batched_tokens,
                                  decode_stalled_ms=self._stalled_ms(time.monotonic()), reason="decodes only")
            self.counters.record_decision(decision)
            return decision
        now = time.monotonic()
        in_flight = None
        occupying = self._in_flight + ([self._lane] if self._lane is not None else [])
        if occupying:
            # the lane's requests are "waiting on the flight": their first token comes when its step ends
            ids = frozenset().union(*(b.request_ids for b in occupying))
            in_flight = EncoderInFlight(occupying[0].encoder_sms, max(b.ends_at for b in occupying), ids)
        state = allocator_state(scheduler, encoder_scheduler, now, in_flight=in_flight,
                                decode_stalled_ms=self._stalled_ms(now),
                                lm_step_scales=(self.lm_step_split.factor, self.lm_step_whole.factor),
                                lm_step_host_ms=self.lm_step_host.value_ms)
        decision = self.allocator.decide(state)
        self.counters.record_decision(decision)
        return decision

    def _stalled_ms(self, now: float) -> float:
        return 0.0 if self._last_decode_output is None else (now - self._last_decode_output) * 1e3

    def _nothing_to_weigh(self, scheduler: Scheduler, encoder_scheduler: EncoderScheduler) -> bool:
        if self._in_flight or self._lane is not None or encoder_scheduler.has_work or scheduler.num_waiting:
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

    def enable_prefill_split(self) -> None:
        """The engine has a prefill lane: the allocator may choose PREFILL_SPLIT."""
        self.config = replace(self.config, prefill_split=True)
        self.allocator.config = self.config

    def prefill_dispatched(self, encoder_sms: int, request_ids: frozenset[str], num_tokens: int) -> None:
        """A lane step of `num_tokens` launched on the encoder's `encoder_sms`. Its prediction is the curve's for
        those tokens (the decision's was for the whole backlog's chunk), scaled as the LM's steps beside the encoder."""
        predicted_ms = float(self.allocator.prefill_curve_ms(encoder_sms, num_tokens)) * self.lm_step_split.factor
        ends_at = time.monotonic() + predicted_ms / 1e3
        self._lane = _BatchInFlight(encoder_sms, ends_at, request_ids, predicted_ms=predicted_ms)

    def prefill_finished(self, gpu_ms: float | None) -> None:
        """The lane's step ended; `gpu_ms`: its GPU time (None off CUDA)."""
        lane, self._lane = self._lane, None
        if lane is not None and gpu_ms is not None:
            self.counters.record_prefill_step(lane.predicted_ms, gpu_ms)

    def lm_step_timed(self, decision: Allocation | None, gpu_ms: float) -> None:
        """A step's GPU time, once its events completed (possibly a few steps after it was collected)."""
        if decision is None:
            return
        self.counters.record_lm_step(decision, gpu_ms)
        if decision.lm_step_curve_ms is not None:
            correction = self.lm_step_whole if decision.lm_sms >= self.total_sms else self.lm_step_split
            correction.observe(decision.lm_step_curve_ms, gpu_ms)
        self._pair(decision, gpu_ms=gpu_ms)

    def lm_step_collected(self, decision: Allocation | None, decoded: bool) -> None:
        """A step collected (after `lm_step_timed` for the steps whose GPU time came with this collection)."""
        now = time.monotonic()
        gap_ms = None
        if decoded:
            if decision is not None and self._last_decode_output is not None:
                gap_ms = (now - self._last_decode_output) * 1e3
                self.counters.record_decode_gap(decision, gap_ms, self.config.slo_tpot_ms)
            self._last_decode_output = now
        else:
            self._last_decode_output = None
        if decision is not None:
            if gap_ms is None:
                self._unpaired.pop(id(decision), None)  # no gap ended with this step: its GPU time pairs with nothing
            else:
                self._pair(decision, gap_ms=gap_ms)

    def _pair(self, decision: Allocation, *, gap_ms: float | None = None, gpu_ms: float | None = None) -> None:
        """Learn the host time from a step once both its decode gap and its GPU time have come."""
        times = self._unpaired.get(id(decision))
        if times is None:
            times = self._unpaired[id(decision)] = _StepTimes(decision)
        times.gap_ms = gap_ms if gap_ms is not None else times.gap_ms
        times.gpu_ms = gpu_ms if gpu_ms is not None else times.gpu_ms
        if times.gap_ms is not None and times.gpu_ms is not None:
            del self._unpaired[id(decision)]
            self.lm_step_host.observe(times.gap_ms, times.gpu_ms, decision.decode_stalled_ms)
        while len(self._unpaired) > self.MAX_UNPAIRED_STEPS:
            self._unpaired.popitem(last=False)

    def prometheus_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """The counters' samples for /metrics, and the host time learned from the decode gaps (counters: a window's
        mean excess per gap is the ratio of their rates)."""
        host = self.lm_step_host
        return [*self.counters.prometheus_samples(),
                ("spaceserve:allocator_lm_step_host_gaps_total", {}, float(host.samples)),
                ("spaceserve:allocator_lm_step_host_excess_seconds_total", {}, host.total_excess_ms / 1e3)]

    def as_dict(self) -> dict[str, float]:
        """The counters' totals, and the host time per step: `allocator_lm_step_host_ms` is the value learned now
        (0.0 until learned; not a total), `_count` and `_excess_s` the gaps learned from and their summed excess."""
        flat = self.counters.as_dict()
        host = self.lm_step_host
        flat["allocator_lm_step_host_ms"] = host.value_ms or 0.0
        flat["allocator_lm_step_host_count"] = host.samples
        flat["allocator_lm_step_host_excess_s"] = host.total_excess_ms / 1e3
        return flat
