"""Counters of the allocator's decisions and of its predictions against what was measured, for the engine's loop
counters and /metrics.

The engine records, for each decision it acts on, the measured time of what the decision predicted: the LM step
(`record_lm_step`; and against the bare curve, `lm_step_curve`, whose ratio is the interference the allocator
corrects for), the encoder batch (`record_encoder_batch`), the prefill step beside a decode step
(`record_prefill_step`), and the gap the running decodes saw (`record_decode_gap`). Each kind keeps totals
(count, predicted, actual, absolute error, and how often the actual time exceeded the prediction by more than
`UNDER_PREDICTION_SLACK`), so any window's mean error is a difference of two snapshots, as for the other loop
counters. `as_dict` flattens them for `LLMEngine.loop_counters`; `prometheus_samples` names them for /metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spaceserve.sched.allocation_types import Allocation, Placement

UNDER_PREDICTION_SLACK = 1.2
"""An actual time above this multiple of its prediction counts as under-predicted."""
PREDICTION_KINDS = ("lm_step", "lm_step_curve", "encoder_batch", "prefill_step", "decode_gap")


@dataclass
class PredictionTotals:
    count: int = 0
    predicted_s: float = 0.0
    actual_s: float = 0.0
    abs_error_s: float = 0.0
    under_predicted: int = 0

    def add(self, predicted_ms: float, actual_ms: float) -> None:
        if predicted_ms < 0 or actual_ms < 0:
            raise ValueError(f"times must be >= 0, got predicted {predicted_ms} ms and actual {actual_ms} ms")
        self.count += 1
        self.predicted_s += predicted_ms / 1e3
        self.actual_s += actual_ms / 1e3
        self.abs_error_s += abs(actual_ms - predicted_ms) / 1e3
        self.under_predicted += actual_ms > UNDER_PREDICTION_SLACK * predicted_ms


@dataclass
class AllocatorCounters:
    decisions: dict[str, int] = field(default_factory=lambda: {p.value: 0 for p in Placement})
    tpot_infeasible: int = 0
    """Decisions for which no plan met the TPOT SLO."""
    tpot_violations: int = 0
    """Recorded decode gaps longer than the TPOT SLO."""
    predictions: dict[str, PredictionTotals] = field(
        default_factory=lambda: {kind: PredictionTotals() for kind in PREDICTION_KINDS}
    )

    def record_decision(self, decision: Allocation) -> None:
        self.decisions[decision.placement.value] += 1
        self.tpot_infeasible += not decision.tpot_ok

    def record_lm_step(self, decision: Allocation, actual_ms: float) -> None:
        if decision.predicted_lm_step_ms is not None:
            self.predictions["lm_step"].add(decision.predicted_lm_step_ms, actual_ms)
        if decision.lm_step_curve_ms is not None:
            self.predictions["lm_step_curve"].add(decision.lm_step_curve_ms, actual_ms)

    def record_encoder_batch(self, decision: Allocation, actual_ms: float) -> None:
        if decision.predicted_encoder_batch_ms is not None:
            self.predictions["encoder_batch"].add(decision.predicted_encoder_batch_ms, actual_ms)

    def record_prefill_step(self, predicted_ms: float, actual_ms: float) -> None:
        """The prefill lane's step (its prediction is made for the tokens it took, not by the decision)."""
        self.predictions["prefill_step"].add(predicted_ms, actual_ms)

    def record_decode_gap(self, decision: Allocation, actual_ms: float, slo_tpot_ms: float) -> None:
        if decision.predicted_decode_gap_ms is not None:
            self.predictions["decode_gap"].add(decision.predicted_decode_gap_ms, actual_ms)
        self.tpot_violations += actual_ms > slo_tpot_ms

    def as_dict(self) -> dict[str, float]:
        """Flat totals, e.g. allocator_split_decisions, allocator_lm_step_predicted_s."""
        flat: dict[str, float] = {f"allocator_{name}_decisions": n for name, n in self.decisions.items()}
        flat["allocator_tpot_infeasible"] = self.tpot_infeasible
        flat["allocator_tpot_violations"] = self.tpot_violations
        for kind, totals in self.predictions.items():
            for name in ("count", "predicted_s", "actual_s", "abs_error_s", "under_predicted"):
                flat[f"allocator_{kind}_{name}"] = getattr(totals, name)
        return flat

    def prometheus_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """(metric name, labels, value) for counters named as the server's other metrics."""
        samples = [("spaceserve:allocator_decisions_total", {"placement": name}, float(n))
                   for name, n in self.decisions.items()]
        samples.append(("spaceserve:allocator_tpot_infeasible_total", {}, float(self.tpot_infeasible)))
        samples.append(("spaceserve:allocator_tpot_violations_total", {}, float(self.tpot_violations)))
        for kind, totals in self.predictions.items():
            labels = {"kind": kind}
            samples += [
                ("spaceserve:allocator_predictions_total", labels, float(totals.count)),
                ("spaceserve:allocator_predicted_seconds_total", labels, totals.predicted_s),
                ("spaceserve:allocator_actual_seconds_total", labels, totals.actual_s),
                ("spaceserve:allocator_prediction_abs_error_seconds_total", labels, totals.abs_error_s),
                ("spaceserve:allocator_under_predictions_total", labels, float(totals.under_predicted)),
            ]
        return samples
