"""Corrections of the SM allocator's LM step predictions, learned online from what the engine measured: the steps'
GPU time (`StepTimeCorrection`) and the host time a decode gap adds to it (`HostTimeCorrection`).

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

The GPU time is not all of a decode gap: the engine's host work per step (scheduling, input preparation, output
handling, the GIL shared with the encoder thread) overlaps the GPU step before it (async scheduling) and shows as a
bubble when it is the longer. Measured on an H200 the decode gap ran 1.7-2.6x its prediction while the GPU step ran
0.95-1.47x its own: under load the host time per step was as long as a GPU step (6.6 ms at 10 req/s, 25 ms at 16 on
a 7B model), where the allocator added a fixed 1 ms. `HostTimeCorrection` learns that excess, a measured gap less
the GPU time of the step that ended it (and less what the decodes had already waited when the step was decided,
which the allocator's prediction counts on its own), clipped to [0, high_ms], as an exponentially weighted mean;
the allocator adds it to every predicted step in place of the fixed overhead when it is the larger
(`AllocatorState.lm_step_host_ms`). Measured afterwards (commit 3276a93, docs/PERFORMANCE.md) it learned 0.3-2.5 ms
on 2B and 7B at every rate: the host work mostly overlaps the GPU step, and the decode gap's remaining 1.3-2.6x is
not host time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _newest_weight(weight: float, samples: int) -> float:
    """The first samples make a plain mean; afterwards each moves the mean by `weight`."""
    return max(weight, 1.0 / (samples + 1))


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
        weight = _newest_weight(self.weight, self.samples)
        self._curve_ms += weight * (curve_ms - self._curve_ms)
        self._measured_ms += weight * (measured_ms - self._measured_ms)
        self.samples += 1

    @property
    def factor(self) -> float:
        if self.samples < self.min_samples:
            return 1.0
        return min(self.high, max(self.low, self._measured_ms / self._curve_ms))


@dataclass
class HostTimeCorrection:
    weight: float = 0.05
    """Weight of the newest gap in the mean (about the last 1 / weight gaps count)."""
    min_samples: int = 8
    high_ms: float = 200.0
    """Excess above this is clipped: one gap behind a stall (a page fault, a long encoder batch) cannot swing it."""
    samples: int = 0
    total_excess_ms: float = 0.0
    """Sum of the clipped excesses learned from (a counter: a window's mean is a difference of two snapshots)."""
    _mean_ms: float = 0.0

    def __post_init__(self) -> None:
        if not (0 < self.weight <= 1 and self.min_samples >= 1 and self.high_ms > 0):
            raise ValueError("weight must be in (0, 1], min_samples >= 1 and high_ms > 0")

    def observe(self, gap_ms: float, step_gpu_ms: float, stalled_ms: float = 0.0) -> None:
        """`stalled_ms`: what the decodes had waited when the step was decided (the allocator counts it apart)."""
        if not (gap_ms > 0 and step_gpu_ms > 0 and stalled_ms >= 0
                and math.isfinite(gap_ms) and math.isfinite(step_gpu_ms) and math.isfinite(stalled_ms)):
            return
        excess_ms = min(self.high_ms, max(0.0, gap_ms - stalled_ms - step_gpu_ms))
        self._mean_ms += _newest_weight(self.weight, self.samples) * (excess_ms - self._mean_ms)
        self.total_excess_ms += excess_ms
        self.samples += 1

    @property
    def value_ms(self) -> float | None:
        """The learned host time per step; None until `min_samples` gaps were seen."""
        return self._mean_ms if self.samples >= self.min_samples else None
