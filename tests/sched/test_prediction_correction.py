"""The LM step correction: learned from measured / curve ratios, 1 until enough steps were seen, robust to single
outliers, bounded; and the allocator's predictions follow the factors it is handed."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from spaceserve.sched.allocation_types import AllocatorConfig, AllocatorState
from spaceserve.sched.allocator import SMAllocator
from spaceserve.sched.prediction_correction import StepTimeCorrection
from tests.sched.fake_curves import TOTAL_SMS, fake_curves, lm_model
from tests.sched.test_allocator import NOW, images, pending

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
