"""Timing device work: CUDA events around each call after a warm-up, the host clock on CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingStats:
    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def p90_ms(self) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]

    def summary(self) -> dict[str, float]:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "p90_ms": self.p90_ms, "n": len(self.samples_ms)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int) -> TimingStats:
    """Per-call time of `fn` over `iters` calls after `warmup` untimed ones.

    On CUDA each call sits between two events on the current stream and the host syncs once at the end, so
    back-to-back asynchronous calls are timed as the device ran them; a call that synchronises inside (an engine
    step returning token ids) is timed from the moment it was issued to the device going idle.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return TimingStats(tuple(start.elapsed_time(end) for start, end in events))
    samples = []
    for _ in range(iters):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e3)
    return TimingStats(tuple(samples))
