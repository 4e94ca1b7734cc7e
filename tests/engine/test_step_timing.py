"""GPU time of LM steps from their CUDA events (engine/step_timing.py), with stand-in events: a step collected before
its end event completed (a prefill chunk that samples nothing is collected without waiting; on the H200 reading its
elapsed time then killed the engine core) is accounted once the event completes, in launch order, with its gap."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from spaceserve.core.scheduler_output import SchedulerOutput
from spaceserve.engine.step_timing import LaunchedStep, LoopStats, PendingGpuTimes


class FakeEvent:
    def __init__(self, at_ms: float, done: bool = True) -> None:
        self.at_ms, self.done, self.waited = at_ms, done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = self.waited = True

    def elapsed_time(self, end: FakeEvent) -> float:
        if not (self.done and end.done):
            raise RuntimeError("Both events must be completed before calculating elapsed time.")
        return end.at_ms - self.at_ms


def _step(start_ms: float, end_ms: float, previous_end: FakeEvent | None, end_done: bool = True) -> LaunchedStep:
    span = (FakeEvent(start_ms), FakeEvent(end_ms, end_done))
    return LaunchedStep(SchedulerOutput(()), SimpleNamespace(gpu_span=span), previous_end, None)


def test_a_step_whose_end_is_pending_is_accounted_when_it_completes():
    stats, pending = LoopStats(), PendingGpuTimes()
    first = _step(0.0, 4.0, None)
    assert [ms for _, ms in pending.collected(stats, first)] == [4.0]
    chunk = _step(5.0, 9.0, first.handle.gpu_span[1], end_done=False)  # 1 ms gap after the first step
    assert pending.collected(stats, chunk) == []
    assert stats.lm_gpu_s == pytest.approx(0.004) and stats.lm_gpu_gap_s == 0.0
    chunk.handle.gpu_span[1].done = True
    last = _step(9.5, 12.0, chunk.handle.gpu_span[1])
    timed = pending.collected(stats, last)
    assert [(step is chunk, ms) for step, ms in timed] == [(True, 4.0), (False, 2.5)]
    assert stats.lm_gpu_s == pytest.approx(0.0105) and stats.lm_gpu_gap_s == pytest.approx(0.0015)


def test_past_the_limit_the_oldest_step_is_waited_for():
    stats, pending = LoopStats(), PendingGpuTimes()
    steps = [_step(10.0 * i, 10.0 * i + 3, None, end_done=False) for i in range(PendingGpuTimes.MAX_PENDING + 1)]
    for step in steps[:-1]:
        assert pending.collected(stats, step) == []
    timed = pending.collected(stats, steps[-1])
    assert [step for step, _ in timed] == steps[:1] and steps[0].handle.gpu_span[1].waited
    assert not steps[1].handle.gpu_span[1].waited


def test_steps_without_events_are_not_timed():
    stats, pending = LoopStats(), PendingGpuTimes()
    off_cuda = LaunchedStep(SchedulerOutput(()), SimpleNamespace(gpu_span=None), None, None)
    assert pending.collected(stats, off_cuda) == [] and stats.lm_gpu_s == 0.0
