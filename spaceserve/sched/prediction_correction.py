"""A correction of the SM allocator's LM step predictions, learned online from the steps' measured GPU times.

The curves are measured with the LM alone on its side of a split. In serving, the encoder runs on the other side at
the same time and takes memory bandwidth and L2, so an LM step on a split is slower than its curve; measured on an
H200 (benchmarks/results/capacity-2b-h200) the LM steps took 1.15-2.25x their predictions. How much slower depends
on what the encoder runs, so the factor is learned, not fixed: the engine feeds each step's curve prediction and its
measured GPU time, one factor for steps beside the encoder (the LM on a split) and one for steps on the whole device,
and the allocator scales its LM curve by them (`AllocatorState.lm_step_scales`).

The factor is an exponentially weighted mean of log(measured / curve), so one slow step moves it little and a ratio of
2 and one of 0.5 average to 1; it stays 1 until `min_samples` steps were seen and is held within [low, high], so a
burst of outliers cannot make the allocator believe the LM is many times slower than measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class StepTimeCorrection:
    weight: float = 0.05
    """Weight of the newest step in the mean (about the last 1 / weight steps count)."""
    min_samples: int = 8
    low: float = 0.5
    high: float = 4.0
    samples: int = 0
    _mean_log: float = 0.0

    def __post_init__(self) -> None:
        if not (0 < self.weight <= 1 and self.min_samples >= 1 and 0 < self.low <= 1 <= self.high):
            raise ValueError("weight must be in (0, 1], min_samples >= 1 and low <= 1 <= high")

    def observe(self, curve_ms: float, measured_ms: float) -> None:
        if not (curve_ms > 0 and measured_ms > 0 and math.isfinite(curve_ms) and math.isfinite(measured_ms)):
            return  # nothing predicted, or a step with no GPU time: no evidence either way
        ratio = math.log(measured_ms / curve_ms)
        # the first steps set the mean outright; afterwards each moves it by `weight`
        weight = max(self.weight, 1.0 / (self.samples + 1))
        self._mean_log += weight * (ratio - self._mean_log)
        self.samples += 1

    @property
    def factor(self) -> float:
        if self.samples < self.min_samples:
            return 1.0
        return min(self.high, max(self.low, math.exp(self._mean_log)))
