"""The LM step corrections: the GPU time factor, learned from measured / curve ratios, and the host time a decode gap
adds to its step, learned from measured gaps; each waits for enough samples, is robust to single outliers and
bounded; and the allocator's predictions follow what it is handed."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest

from spaceserve.sched.allocation_types import AllocatorConfig, AllocatorState, Placement
from spaceserve.sched.allocator import SMAllocator
from spaceserve.sched.prediction_correction import HostTimeCorrection, StepTimeCorrection
from tests.sched.fake_curves import TOTAL_SMS, fake_curves, lm_model
from tests.sched.test_allocator import NOW, images, pending, random_state

CURVES = fake_curves()


def test_the_factor_converges_to_the_measured_ratio_and_waits_for_evidence():
    rng = random.Random(5)
    correction = StepTimeCorrection(min_samples=8)
    for index in range(7):
        correction.observe(4.0, 4.0 * 1.7)
        assert correction.factor == 1.0  # too few steps yet
    for _ in range(400):
        curve = rng.uniform(2.0, 30.0)
        correction.observe(curve, curve * 1.7 * math.exp(rng.gauss(0, 0.1)))
    assert correction.factor == pytest.approx(1.7, rel=0.06)
    correction.observe(3.0, 300.0)  # one step 100x slow (a preemption, a page fault) barely moves it
    assert correction.factor == pytest.approx(1.7, rel=0.35)
    assert correction.factor < 2.5


def test_long_steps_weigh_by_their_length():
    """As on the H200: short steps several times their curve (fixed costs), long ones 1.2x. The allocator's choices
    turn on the long steps, so the factor must be near theirs, not the mean of the ratios (2.7 here)."""
    correction = StepTimeCorrection()
    for _ in range(300):
        correction.observe(0.5, 3.0)
        correction.observe(30.0, 36.0)
    assert correction.factor == pytest.approx((2.0 + 36.0) / 30.5, rel=0.02)  # 3.0 clipped to 4x its curve


def test_the_factor_follows_a_change_and_stays_within_its_bounds():
    correction = StepTimeCorrection(min_samples=1, low=0.5, high=4.0)
    for _ in range(200):
        correction.observe(5.0, 10.0)
    assert correction.factor == pytest.approx(2.0, rel=1e-3)
    for _ in range(200):  # the encoder stopped: steps run at their curve again
        correction.observe(5.0, 5.0)
    assert correction.factor == pytest.approx(1.0, rel=0.01)
    for _ in range(200):
        correction.observe(1.0, 50.0)
    assert correction.factor == pytest.approx(4.0, rel=1e-3)
    for _ in range(400):
        correction.observe(10.0, 0.1)
    assert correction.factor == pytest.approx(0.5, rel=1e-3)


def test_nothing_measured_is_no_evidence():
    correction = StepTimeCorrection(min_samples=1)
    for curve, measured in ((0.0, 3.0), (3.0, 0.0), (float("nan"), 1.0), (2.0, float("inf"))):
        correction.observe(curve, measured)
    assert correction.samples == 0 and correction.factor == 1.0
    with pytest.raises(ValueError):
        StepTimeCorrection(weight=0)
    with pytest.raises(ValueError):
        StepTimeCorrection(low=1.5)


def test_the_allocator_scales_its_lm_predictions_by_the_factors():
    contexts = (4000,) * 64
    state = AllocatorState(NOW, images(4), pending(4), decode_contexts=contexts)
    slo = 6.5  # the curve's step with a 512-token chunk fits; 1.8x of it does not
    allocator = SMAllocator(CURVES, AllocatorConfig(slo_tpot_ms=slo))
    plain = allocator.decide(state)
    slow = allocator.decide(AllocatorState(NOW, images(4), pending(4), decode_contexts=contexts,
                                           lm_step_scale_split=1.8))
    for decision, scale in ((plain, 1.0), (slow, 1.8)):
        assert decision.lm_sms < TOTAL_SMS  # a split: the split's factor applies
        # the step it runs now is the decodes' (every queued prompt waits for its image); the gap it allows, the
        # decodes plus the largest chunk, both scaled
        curve = lm_model(decision.lm_sms, len(contexts), np.mean(contexts), 0)
        assert decision.lm_step_curve_ms == pytest.approx(float(curve), rel=0.05)
        assert decision.predicted_lm_step_ms == pytest.approx(decision.lm_step_curve_ms * scale + 1.0, rel=1e-9)
        gap = CURVES.lm_step_ms(decision.lm_sms, len(contexts), np.mean(contexts), decision.prefill_tokens) * scale + 1
        assert decision.predicted_decode_gap_ms == pytest.approx(float(gap), rel=0.05)
        assert decision.tpot_ok and decision.predicted_decode_gap_ms <= 0.9 * slo
    # a slower LM side leaves less of the TPOT budget for prefill beside the decodes, or more SMs to the LM
    assert plain.prefill_tokens >= 512
    assert slow.prefill_tokens < plain.prefill_tokens or slow.lm_sms > plain.lm_sms


def test_the_whole_device_factor_applies_to_steps_on_every_sm():
    contexts = (3000,) * 32
    state = AllocatorState(NOW, (), pending(2, tokens=3000), decode_contexts=contexts, lm_step_scale_split=3.0,
                           lm_step_scale_whole=1.5)
    decision = SMAllocator(CURVES, AllocatorConfig(slo_tpot_ms=50)).decide(state)
    assert decision.lm_sms == TOTAL_SMS
    assert decision.predicted_lm_step_ms == pytest.approx(decision.lm_step_curve_ms * 1.5 + 1.0, rel=1e-9)
    with pytest.raises(ValueError, match="positive number"):
        SMAllocator(CURVES).decide(AllocatorState(NOW, images(1), pending(1), lm_step_scale_split=0.0))


def test_the_host_time_converges_to_the_mean_excess_and_waits_for_evidence():
    rng = random.Random(11)
    host = HostTimeCorrection(min_samples=8)
    excesses = [rng.uniform(4.0, 10.0) for _ in range(400)]
    for index, excess in enumerate(excesses):
        gpu = rng.uniform(2.0, 30.0)
        host.observe(gpu + excess, gpu)
        if index < 7:
            assert host.value_ms is None  # too few gaps yet
        elif index == 7:
            assert host.value_ms == pytest.approx(np.mean(excesses[:8]))  # the first gaps make a plain mean
    assert host.value_ms == pytest.approx(7.0, abs=1.0)
    assert host.samples == 400 and host.total_excess_ms == pytest.approx(sum(excesses))


def test_the_host_time_clips_outliers_and_counts_the_stall_apart():
    host = HostTimeCorrection(min_samples=1, weight=0.05, high_ms=50.0)
    for _ in range(100):
        host.observe(15.0, 9.0)
    assert host.value_ms == pytest.approx(6.0)
    host.observe(5009.0, 9.0)  # one gap behind a 5 s stall counts as the cap
    assert host.value_ms == pytest.approx(6.0 + 0.05 * (50.0 - 6.0))
    assert host.total_excess_ms == pytest.approx(100 * 6.0 + 50.0)
    host = HostTimeCorrection(min_samples=1, weight=1.0)
    host.observe(8.0, 10.0)  # the GPU step hid the host work: no excess
    assert host.value_ms == 0.0
    host.observe(20.0, 5.0, stalled_ms=12.0)  # the 12 ms already waited at the decision are not the step's
    assert host.value_ms == pytest.approx(3.0)


def test_a_gap_without_a_step_time_is_no_evidence():
    host = HostTimeCorrection(min_samples=1)
    for gap, gpu, stalled in ((0.0, 3.0, 0.0), (5.0, 0.0, 0.0), (-5.0, 3.0, 0.0), (float("nan"), 1.0, 0.0),
                              (float("inf"), 1.0, 0.0), (5.0, float("inf"), 0.0), (5.0, 1.0, -1.0),
                              (5.0, 1.0, float("nan"))):
        host.observe(gap, gpu, stalled)
    assert host.samples == 0 and host.value_ms is None and host.total_excess_ms == 0.0
    for bad in (dict(weight=0), dict(min_samples=0), dict(high_ms=0)):
        with pytest.raises(ValueError):
            HostTimeCorrection(**bad)


def test_a_learned_host_time_adds_to_every_predicted_step():
    rng = np.random.default_rng(7)
    contexts = (3000,) * 32
    state = AllocatorState(NOW, images(2), pending(2), decode_contexts=contexts)
    allocator = SMAllocator(CURVES, AllocatorConfig())
    plain = allocator._situation(state)
    for host_ms in rng.uniform(1.0, 40.0, 5):
        slow = allocator._situation(dataclasses.replace(state, lm_step_host_ms=float(host_ms)))
        assert slow.step_overhead_ms == host_ms and plain.step_overhead_ms == 1.0
        sms, chunk = rng.choice([36, 68, 100, TOTAL_SMS], 20), rng.integers(0, 4096, 20)
        np.testing.assert_allclose(slow.step(sms, chunk) - plain.step(sms, chunk), host_ms - 1.0)
        extra = slow.prefill_only(sms, chunk) - plain.prefill_only(sms, chunk)
        np.testing.assert_allclose(extra, np.where(chunk > 0, host_ms - 1.0, 0.0))
    # decodes alone (nothing to encode or prefill): one plan, whose gap grows by the difference, its curve does not
    decodes = AllocatorState(NOW, decode_contexts=contexts)
    before = allocator.decide(decodes)
    for host_ms in rng.uniform(1.0, 40.0, 5):
        after = allocator.decide(dataclasses.replace(decodes, lm_step_host_ms=float(host_ms)))
        assert after.predicted_decode_gap_ms == pytest.approx(before.predicted_decode_gap_ms + host_ms - 1.0)
        assert after.predicted_lm_step_ms == pytest.approx(before.predicted_lm_step_ms + host_ms - 1.0)
        assert after.lm_step_curve_ms == pytest.approx(before.lm_step_curve_ms)


def test_a_longer_host_time_leaves_less_of_the_tpot_budget_for_prefill():
    contexts = (3000,) * 32
    state = AllocatorState(NOW, (), pending(2, tokens=3000), decode_contexts=contexts)
    allocator = SMAllocator(CURVES, AllocatorConfig(slo_tpot_ms=10.0, decode_delay_weight=0.0))
    budget = allocator.config.tpot_budget_ms
    chunks = []
    for host_ms in (None, 2.5, 4.0):
        decision = allocator.decide(dataclasses.replace(state, lm_step_host_ms=host_ms))
        situation = allocator._situation(dataclasses.replace(state, lm_step_host_ms=host_ms))
        assert decision.placement is Placement.LM_WHOLE and decision.tpot_ok
        assert decision.predicted_decode_gap_ms <= budget
        # the largest chunk of the grid within the budget (TTFT alone is weighed: nothing holds it back)
        assert float(situation.step(TOTAL_SMS, decision.prefill_tokens + 64)) > budget
        chunks.append(decision.prefill_tokens)
    assert chunks[0] > chunks[1] > chunks[2] > 0
    too_slow = allocator.decide(dataclasses.replace(state, lm_step_host_ms=budget))
    assert not too_slow.tpot_ok and too_slow.prefill_tokens == 0  # the decodes alone miss the SLO


def test_a_host_time_below_the_configured_overhead_changes_nothing():
    rng = np.random.default_rng(21)
    allocator = SMAllocator(CURVES, AllocatorConfig(lm_step_overhead_ms=2.0))
    for _ in range(30):
        state = random_state(rng)
        below = dataclasses.replace(state, lm_step_host_ms=float(rng.uniform(0.0, 2.0)))
        assert allocator.decide(below) == allocator.decide(state)
    for bad in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match="host time"):
            allocator.decide(dataclasses.replace(state, lm_step_host_ms=bad))
