"""Where the engine core's loop spends its time (LoopStats, totals the benchmarks read as loop counters) and the GPU
time of each LM step, from CUDA events recorded around its work on its stream."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from spaceserve.core.scheduler_output import SchedulerOutput
from spaceserve.runtime.model_runner import StepHandle
from spaceserve.sched.allocation_types import Allocation


@dataclass
class LoopStats:
    """Where the engine thread's time goes (totals): `lm_host_s` is Python work around LM steps (scheduling,
    input preparation, launches, output handling), `lm_wait_s` the time spent waiting for the device."""

    lm_steps: int = 0
    lm_rows: int = 0
    """Sequences in the LM steps, summed (lm_rows / lm_steps is the mean batch)."""
    lm_host_s: float = 0.0
    lm_wait_s: float = 0.0
    encoder_inline_s: float = 0.0
    """time: host time launching the encoder batches run inside steps (not in lm_host_s; their device time is
    waited for in the LM step that follows)."""
    encoder_inline_batches: int = 0
    lm_gpu_s: float = 0.0
    """GPU time of LM steps (CUDA events around each step's work on its stream; 0 off CUDA)."""
    lm_gpu_gap_s: float = 0.0
    """GPU time with no LM step queued between consecutive LM steps while requests ran (host overhead the GPU
    waited for); an encoder batch run inline between them (time mode) is not counted as a gap."""


@dataclass(frozen=True)
class LaunchedStep:
    scheduled: SchedulerOutput
    handle: StepHandle
    gap_start: torch.cuda.Event | None
    """The previous LM step's end event, when the GPU had one just before this step (for lm_gpu_gap_s)."""
    inline_encoder_span: tuple[torch.cuda.Event, torch.cuda.Event] | None
    allocation: Allocation | None = None
    """The SM allocator's decision this step was scheduled under (space), to count its prediction."""



class PendingGpuTimes:
    """Collected LM steps whose GPU time is not known yet. A step that samples nothing (a prefill chunk that does not
    end its prompt) is collected without waiting for the device, so its end event may still be pending; blocking on
    it would take away the overlap. Each is accounted, in launch order, once its events have completed."""

    MAX_PENDING = 64
    """Past this many the oldest is waited for (its events belong to work launched long ago)."""

    def __init__(self) -> None:
        self._pending: deque[LaunchedStep] = deque()

    def collected(self, stats: LoopStats, step: LaunchedStep) -> list[tuple[LaunchedStep, float]]:
        """Queue `step`, account every queued step whose events completed; returns those steps with their GPU ms."""
        self._pending.append(step)
        if len(self._pending) > self.MAX_PENDING:
            for event in _events(self._pending[0]):
                event.synchronize()
        timed = []
        while self._pending and all(event.query() for event in _events(self._pending[0])):
            done = self._pending.popleft()
            gpu_ms = account_gpu_time(stats, done)
            if gpu_ms is not None:
                timed.append((done, gpu_ms))
        return timed


def _events(step: LaunchedStep) -> list[torch.cuda.Event]:
    events = list(step.handle.gpu_span or ())
    if events and step.gap_start is not None:
        events.append(step.gap_start)
        events += list(step.inline_encoder_span or ())
    return events


def account_gpu_time(stats: LoopStats, step: LaunchedStep) -> float | None:
    """Add a collected step's GPU time and the idle gap before it (its events must have completed); returns the
    step's GPU ms (None off CUDA)."""
    span = step.handle.gpu_span
    if span is None:
        return None
    step_ms = span[0].elapsed_time(span[1])
    stats.lm_gpu_s += step_ms / 1e3
    if step.gap_start is not None:
        gap = step.gap_start.elapsed_time(span[0]) / 1e3
        if step.inline_encoder_span is not None:
            gap -= step.inline_encoder_span[0].elapsed_time(step.inline_encoder_span[1]) / 1e3
        stats.lm_gpu_gap_s += max(gap, 0.0)
    return step_ms
