"""A correction of the SM allocator's LM step predictions, learned online from the steps' measured GPU times.

The curves are measured with the LM alone on its side of a split. In serving, the encoder runs on the other side at
the same time and takes memory bandwidth and L2, so an LM step on a split is slower than its curve; measured on an
H200 (benchmarks/results/capacity-2b-h200) the LM steps took 1.15-2.25x their predictions. How much slower depends
on what the encoder runs, so the factor is learned, not fixed: the engine feeds each step's curve prediction and its
measured GPU time, one factor for steps beside the encoder (the LM on a split) and one for steps on the whole device,
and the allocator scales its LM curve by them (`AllocatorState.lm_step_scales`).

The factor is the ratio of two exponentially weighted means, of the measured times and of the curve's, so a step
counts by its length: measured on the H200 (commit 50a8fab) the short decode steps ran up to several times their
curve (fixed costs the curve misses), the long prefill steps 1.1-1.8x, and a mean of per-step ratios (tried first)
learned 4x and over-predicted the long steps threefold; what a decision needs right is the long steps. Each step's
measured time is clipped to [low, high] times its curve before it enters the mean, so one stalled step cannot swing
it; the factor stays 1 until `min_samples` steps were seen and within [low, high].
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class StepTimeCorrection:
    weight: float = 0.05
    """Weight of the newest step in the means (about the last 1 / weight steps count)."""
    min_samples: int = 8
    low: float = 0.5
    high: float = 4.0
    samples: int = 0
    _curve_ms: float = 0.0
    _measured_ms: float = 0.0

    def __post_init__(self) -> None:
        if not (0 < self.weight <= 1 and self.min_samples >= 1 and 0 < self.low <= 1 <= self.high):
            raise ValueError("weight must be in (0, 1], min_samples >= 1 and low <= 1 <= high")

    def observe(self, curve_ms: float, measured_ms: float) -> None:
        if not (curve_ms > 0 and measured_ms > 0 and math.isfinite(curve_ms) and math.isfinite(measured_ms)):
            return  # nothing predicted, or a step with no GPU time: no evidence either way
        measured_ms = min(self.high * curve_ms, max(self.low * curve_ms, measured_ms))
        # the first steps make a plain mean; afterwards each moves the means by `weight`
        weight = max(self.weight, 1.0 / (self.samples + 1))
        self._curve_ms += weight * (curve_ms - self._curve_ms)
        self._measured_ms += weight * (measured_ms - self._measured_ms)
        self.samples += 1

    @property
    def factor(self) -> float:
        if self.samples < self.min_samples:
            return 1.0
        return min(self.high, max(self.low, self._measured_ms / self._curve_ms))
