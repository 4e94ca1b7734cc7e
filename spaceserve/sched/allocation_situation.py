"""The allocator's view of one decision: the state (allocation_types.AllocatorState) turned into the arrays every
plan's evaluation shares (the encoder queue cut into batches, the backlog, the decodes), and the LM step model of the
decision: the curves' section for the running decodes, scaled by the factors the engine learned
(prediction_correction.py), plus the per-step overhead (the config's, or the host time the engine learned when
larger). Pure numpy, no state of its own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from spaceserve.sched.allocation_forecast import Backlog
from spaceserve.sched.allocation_types import AllocatorConfig, AllocatorState, EncoderInFlight
from spaceserve.sched.resource_curves import ResourceCurves


@dataclass(frozen=True)
class Situation:
    """The state turned into arrays, shared by every plan's evaluation."""

    batches_patches: np.ndarray
    backlog: Backlog
    num_decodes: int
    context: float
    decode_lifetimes_ms: np.ndarray
    pending_tokens: int
    ready_now_tokens: int
    """Prefill tokens of queued requests with no image left to encode."""
    in_flight: EncoderInFlight | None
    in_flight_end_ms: float
    largest_chunk: int
    alone_gap_ms: float
    """A decode-only step on the whole GPU."""
    step: Callable[[np.ndarray, np.ndarray], np.ndarray]
    """(LM SMs, prefill chunk) -> predicted ms of a step with the running decodes (scaled, overhead included)."""
    prefill_only: Callable[[np.ndarray, np.ndarray], np.ndarray]
    """The same for a prefill step with no decodes (PREFILL_SPLIT's compute side)."""
    scale_split: float
    scale_whole: float
    step_overhead_ms: float
    """Added to every predicted step (`step`, `prefill_only`) after the scale."""
    decode_stalled_ms: float
    """What the decodes have already waited (>= 0)."""

    chunk_grid: np.ndarray
    """The prefill chunks a step may take (multiples of the granularity, and the largest)."""
    _steps_by_side: dict[float, np.ndarray] = field(default_factory=dict)

    @property
    def has_encoder_work(self) -> bool:
        return bool(self.batches_patches.size) or self.in_flight is not None

    def chunk_steps(self, sides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(chunk grid, [side, chunk] step ms), computed once per side in a decision."""
        missing = np.array([s for s in sides if float(s) not in self._steps_by_side])
        if missing.size:
            for side, row in zip(missing, self.step(missing[:, None], self.chunk_grid[None, :])):
                self._steps_by_side[float(side)] = row
        return self.chunk_grid, np.stack([self._steps_by_side[float(s)] for s in sides])


def build_situation(state: AllocatorState, config: AllocatorConfig, curves: ResourceCurves, prefill_section) -> Situation:
    """`prefill_section`: the curves' prefill-only section (batch 0, context 0), made once by the allocator."""
    total = curves.total_sms
    pending = sorted(state.pending, key=lambda r: (r.arrival_time, r.request_id))[: config.max_backlog_requests]
    index = {r.request_id: i for i, r in enumerate(pending)}
    batches: list[int] = []
    ready_batch = np.full(len(pending), -1, dtype=np.int64)
    tokens_in_batch = 0
    for item in state.encoder_queue:
        if not batches or tokens_in_batch + item.tokens > config.encoder_budget_tokens:
            batches.append(0)
            tokens_in_batch = 0
        batches[-1] += item.patches
        tokens_in_batch += item.tokens
        for request_id in item.request_ids:
            if request_id in index:
                ready_batch[index[request_id]] = len(batches) - 1
    in_flight = state.encoder_in_flight
    waits_on_flight = np.array([in_flight is not None and r.request_id in in_flight.request_ids for r in pending],
                               dtype=bool)
    tokens = np.array([max(0, r.prefill_tokens) for r in pending], dtype=np.int64)
    backlog = Backlog(
        age_ms=np.array([(state.now - r.arrival_time) * 1e3 for r in pending], dtype=np.float64),
        prefill_tokens=tokens,
        ready_batch=ready_batch,
        in_flight=waits_on_flight,
    )
    contexts = np.asarray(state.decode_contexts, dtype=np.float64)
    num_decodes = int(contexts.size)
    context = float(contexts.mean()) if num_decodes else 0.0
    pending_tokens = int(tokens.sum())
    granule = config.prefill_granularity
    largest = min(max(0, config.max_num_batched_tokens - num_decodes), -(-pending_tokens // granule) * granule)
    scales = (_valid_scale(state.lm_step_scale_split), _valid_scale(state.lm_step_scale_whole))
    overhead = config.lm_step_overhead_ms
    if state.lm_step_host_ms is not None:
        overhead = max(overhead, _valid_host_time(state.lm_step_host_ms))
    step = scaled_step(curves.lm_step.section(batch=num_decodes, context=context), num_decodes, total, overhead,
                       *scales)
    alone = float(step(total, 0)) if num_decodes else 0.0
    remaining = state.decode_remaining_tokens
    if not num_decodes:
        lifetimes = np.zeros(0)
    elif remaining is None or len(remaining) != num_decodes:
        lifetimes = np.full(num_decodes, np.inf)
    else:
        lifetimes = np.maximum(np.asarray(remaining, dtype=np.float64), 0.0) * alone
    return Situation(
        batches_patches=np.asarray(batches, dtype=np.float64),
        backlog=backlog,
        num_decodes=num_decodes,
        context=context,
        decode_lifetimes_ms=lifetimes,
        pending_tokens=pending_tokens,
        ready_now_tokens=int(tokens[(ready_batch < 0) & ~waits_on_flight].sum()),
        in_flight=in_flight,
        in_flight_end_ms=0.0 if in_flight is None else max(0.0, (in_flight.ends_at - state.now) * 1e3),
        largest_chunk=int(largest),
        alone_gap_ms=alone,
        step=step,
        prefill_only=scaled_step(prefill_section, 0, total, overhead, *scales),
        scale_split=scales[0],
        scale_whole=scales[1],
        step_overhead_ms=overhead,
        decode_stalled_ms=max(0.0, state.decode_stalled_ms),
        chunk_grid=np.unique(np.append(np.arange(0, largest + 1, granule), largest)),
    )


def scaled_step(section, num_decodes: int, total_sms: int, overhead_ms: float, scale_split: float = 1.0,
                scale_whole: float = 1.0) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """(LM SMs, prefill chunk) -> predicted ms: the curve section scaled by what the engine measured (a step on fewer
    than all SMs runs beside the encoder), plus the overhead; without decodes a step with no chunk is no step."""

    def step(sms, chunk):
        sms, chunk = np.broadcast_arrays(np.asarray(sms, dtype=np.float64), np.asarray(chunk, dtype=np.float64))
        timed = section(sms, chunk) * np.where(sms >= total_sms, scale_whole, scale_split) + overhead_ms
        if num_decodes:
            return timed
        return np.where(chunk > 0, timed, 0.0)

    return step


def _valid_scale(scale: float) -> float:
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"an LM step scale must be a positive number, got {scale}")
    return float(scale)


def _valid_host_time(host_ms: float) -> float:
    if not (np.isfinite(host_ms) and host_ms >= 0):
        raise ValueError(f"the LM step host time must be a number >= 0 ms, got {host_ms}")
    return float(host_ms)
