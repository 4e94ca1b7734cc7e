"""The SM allocator's decisions against fake curves (tests/sched/fake_curves.py), no GPU: hand-made situations with
the expected shape of the answer, and random states against the invariants every decision keeps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from spaceserve.sched.allocation_counters import AllocatorCounters
from spaceserve.sched.allocation_types import (
    Allocation,
    AllocatorConfig,
    AllocatorState,
    EncoderInFlight,
    EncoderItem,
    PendingRequest,
    Placement,
)
from spaceserve.sched.allocator import SMAllocator
from tests.sched.fake_curves import TOTAL_SMS, fake_curves, lm_model

NOW = 100.0
CURVES = fake_curves()


def images(count: int, patches: int = 4096, first: int = 0) -> tuple[EncoderItem, ...]:
    return tuple(EncoderItem((f"r{i}",), patches, patches // 4) for i in range(first, first + count))


def pending(count: int, tokens: int = 1100, first: int = 0, age_s: float = 0.01) -> tuple[PendingRequest, ...]:
    return tuple(PendingRequest(f"r{i}", NOW - age_s * (count - i), tokens) for i in range(first, first + count))


def decide(state: AllocatorState, **config) -> Allocation:
    return SMAllocator(CURVES, AllocatorConfig(**config)).decide(state)


def test_idle_lm_gets_the_encoder_the_whole_gpu():
    decision = decide(AllocatorState(NOW, images(1), pending(1)))
    assert decision.placement is Placement.ENCODER_WHOLE
    assert decision.encoder_sms == TOTAL_SMS and decision.lm_sms == 0 and decision.prefill_tokens == 0
    assert decision.predicted_encoder_batch_ms == pytest.approx(float(CURVES.encoder_ms(TOTAL_SMS, 4096)))
    assert decision.predicted_decode_gap_ms is None and decision.tpot_ok


def test_light_decode_leaves_the_encoder_most_sms_and_heavy_decode_protects_tpot():
    light = decide(AllocatorState(NOW, images(4), pending(4), decode_contexts=(600,) * 2), slo_tpot_ms=25)
    heavy_contexts = (8000,) * 256
    heavy = decide(AllocatorState(NOW, images(4), pending(4), decode_contexts=heavy_contexts), slo_tpot_ms=25)
    assert light.placement is Placement.SPLIT and heavy.placement is Placement.SPLIT
    assert light.encoder_sms >= 80
    assert heavy.encoder_sms < light.encoder_sms
    budget = 0.9 * 25
    for decision, contexts in ((light, (600,) * 2), (heavy, heavy_contexts)):
        assert decision.tpot_ok and decision.predicted_decode_gap_ms <= budget
        # the gap it predicts is the curve's step on its LM side with its chunk, plus the overhead
        step = lm_model(decision.lm_sms, len(contexts), np.mean(contexts), decision.prefill_tokens) + 1.0
        assert decision.predicted_decode_gap_ms == pytest.approx(float(step), rel=0.05)


def test_a_tight_tpot_slo_shrinks_the_encoder_share_until_decode_fits():
    contexts = (8000,) * 256
    state = AllocatorState(NOW, images(8), pending(8), decode_contexts=contexts)
    # TTFT alone (no weight on the decodes' delay): only the TPOT SLO holds the encoder share back
    loose = decide(state, slo_tpot_ms=200, decode_delay_weight=0.0)
    tight = decide(state, slo_tpot_ms=5, decode_delay_weight=0.0)
    assert loose.encoder_sms >= 120
    budget = 0.9 * 5
    fitting = [s.encoder_sms for s in CURVES.usable_splits()
               if lm_model(s.lm_sms, 256, 8000, 0) + 1.0 <= budget]
    assert fitting and max(fitting) < loose.encoder_sms
    assert tight.tpot_ok and tight.encoder_sms in fitting
    assert tight.predicted_decode_gap_ms <= budget


def test_an_encoder_backlog_gets_a_larger_share():
    contexts = (2000,) * 64
    short = decide(AllocatorState(NOW, images(2), pending(2), decode_contexts=contexts), slo_tpot_ms=25)
    backlog = decide(AllocatorState(NOW, images(100), pending(100), decode_contexts=contexts), slo_tpot_ms=25)
    assert backlog.encoder_sms > short.encoder_sms
    assert backlog.predicted_mean_ttft_ms > short.predicted_mean_ttft_ms


def test_nothing_to_encode_gives_the_lm_everything():
    decision = decide(AllocatorState(NOW, (), pending(3), decode_contexts=(2000,) * 64))
    assert decision.placement is Placement.LM_WHOLE
    assert decision.lm_sms == TOTAL_SMS and decision.encoder_sms == 0
    assert decision.predicted_encoder_batch_ms is None and decision.prefill_tokens > 0
    empty = decide(AllocatorState(NOW))
    assert empty.placement is Placement.LM_WHOLE and empty.lm_sms == TOTAL_SMS and empty.encoder_sms == 0


def test_prefill_budget_fills_the_tpot_slo_only_when_ttft_is_worth_it():
    contexts = (2000,) * 32
    state = AllocatorState(NOW, (), pending(40, tokens=3000), decode_contexts=contexts)
    ttft_only = decide(state, slo_tpot_ms=25, decode_delay_weight=0.0)
    balanced = decide(state, slo_tpot_ms=25)
    assert ttft_only.prefill_tokens >= balanced.prefill_tokens > 0
    # TTFT alone: the largest chunk whose step still fits the budget
    budget = 0.9 * 25
    granule = 64
    assert lm_model(TOTAL_SMS, 32, 2000, ttft_only.prefill_tokens) + 1.0 <= budget
    limit = 8192 - 32
    if ttft_only.prefill_tokens + granule <= limit:
        assert lm_model(TOTAL_SMS, 32, 2000, ttft_only.prefill_tokens + granule) + 1.0 > budget
    # without decodes the chunk is as large as the backlog can use, whatever the SLO
    alone = decide(AllocatorState(NOW, (), pending(2, tokens=1000)), slo_tpot_ms=1)
    assert alone.prefill_tokens == 2048 and alone.predicted_decode_gap_ms is None


def test_decodes_that_already_waited_get_a_smaller_chunk():
    contexts = (2000,) * 32
    state = AllocatorState(NOW, (), pending(40, tokens=3000), decode_contexts=contexts)
    fresh = decide(state, slo_tpot_ms=25, decode_delay_weight=0.0)
    stalled = decide(dataclasses.replace(state, decode_stalled_ms=12.0), slo_tpot_ms=25, decode_delay_weight=0.0)
    assert stalled.prefill_tokens < fresh.prefill_tokens
    assert stalled.predicted_decode_gap_ms <= 0.9 * 25


def test_a_batch_in_flight_pins_the_split():
    in_flight = EncoderInFlight(48, NOW + 0.02, frozenset({"r0"}))
    state = AllocatorState(NOW, images(5, first=1), pending(6), decode_contexts=(1000,) * 8,
                           encoder_in_flight=in_flight)
    decision = decide(state)
    assert decision.placement is Placement.SPLIT
    assert (decision.encoder_sms, decision.lm_sms) == (48, TOTAL_SMS - 48)
    drained = decide(dataclasses.replace(state, encoder_queue=()))
    assert drained.encoder_sms == 0 and drained.lm_sms == TOTAL_SMS - 48  # nothing more to dispatch; still its side


def test_the_lm_waits_for_a_whole_device_batch_unless_decodes_cannot():
    in_flight = EncoderInFlight(TOTAL_SMS, NOW + 0.005, frozenset({"r0"}))
    state = AllocatorState(NOW, images(2, first=1), pending(3), decode_contexts=(1000,) * 4,
                           encoder_in_flight=in_flight)
    waits = decide(state, slo_tpot_ms=50)
    assert waits.placement is Placement.ENCODER_WHOLE and waits.lm_sms == 0 and waits.encoder_sms == 0
    late = decide(dataclasses.replace(state, decode_stalled_ms=40.0), slo_tpot_ms=50)
    assert late.lm_sms == TOTAL_SMS and late.prefill_tokens == 0 and not late.tpot_ok


def test_prefill_on_its_own_side_when_decode_steps_cannot_carry_it():
    contexts = (6000,) * 200
    state = AllocatorState(NOW, (), pending(30, tokens=4000), decode_contexts=contexts)
    co_located = decide(state, slo_tpot_ms=6)
    split = decide(state, slo_tpot_ms=6, prefill_split=True)
    assert co_located.placement is Placement.LM_WHOLE
    assert split.placement is Placement.PREFILL_SPLIT
    assert split.prefill_sms + split.lm_sms == TOTAL_SMS and split.prefill_sms > 0
    assert split.prefill_tokens > co_located.prefill_tokens
    assert split.predicted_decode_gap_ms <= 0.9 * 6 and split.predicted_prefill_step_ms > 0
    assert split.predicted_mean_ttft_ms < co_located.predicted_mean_ttft_ms


def test_same_state_same_decision():
    state = AllocatorState(NOW, images(7), pending(9), decode_contexts=tuple(range(500, 532)),
                           decode_remaining_tokens=tuple(range(10, 42)))
    assert decide(state) == decide(state)


def random_state(rng: np.random.Generator) -> AllocatorState:
    num_requests = int(rng.integers(0, 40))
    requests = [PendingRequest(f"q{i}", NOW - float(rng.uniform(0, 3)), int(rng.integers(1, 5000)))
                for i in range(num_requests)]
    items = []
    for request in requests:
        for _ in range(int(rng.integers(0, 4))):
            patches = int(rng.choice([256, 1024, 2304, 4096, 9216]))
            items.append(EncoderItem((request.request_id,), patches, patches // 4))
    rng.shuffle(items)
    num_decodes = int(rng.choice([0, 1, 4, 32, 128, 256]))
    contexts = tuple(int(c) for c in rng.integers(100, 9000, num_decodes))
    remaining = tuple(int(r) for r in rng.integers(1, 300, num_decodes)) if rng.random() < 0.5 else None
    in_flight = None
    if rng.random() < 0.3:
        sms = int(rng.choice([TOTAL_SMS, 32, 64, 96]))
        waiting = frozenset(r.request_id for r in requests[: int(rng.integers(0, 4))])
        in_flight = EncoderInFlight(sms, NOW + float(rng.uniform(-0.01, 0.05)), waiting)
    return AllocatorState(NOW, tuple(items), tuple(requests), contexts, remaining, in_flight,
                          float(rng.choice([0.0, 0.0, 3.0])))


@pytest.mark.parametrize("seed", range(4))
def test_random_states_keep_every_invariant(seed):
    rng = np.random.default_rng([seed, 13])
    sides = {s.encoder_sms for s in CURVES.usable_splits()}
    lm_sides = {s.lm_sms for s in CURVES.usable_splits()}
    for _ in range(40):
        state = random_state(rng)
        tpot = float(rng.choice([8.0, 25.0, 50.0]))
        config = AllocatorConfig(slo_tpot_ms=tpot, prefill_split=bool(rng.random() < 0.5))
        decision = SMAllocator(CURVES, config).decide(state)
        budget = config.tpot_budget_ms
        in_flight = state.encoder_in_flight
        assert decision.placement in Placement
        assert decision.encoder_sms in {0, TOTAL_SMS} | sides
        assert decision.lm_sms in {0, TOTAL_SMS} | lm_sides
        assert 0 <= decision.prefill_tokens <= 8192 - len(state.decode_contexts) or not state.decode_contexts
        assert decision.prefill_tokens % 64 == 0 or decision.prefill_tokens == 8192 - len(state.decode_contexts)
        if in_flight is not None and in_flight.encoder_sms == TOTAL_SMS:
            assert decision.encoder_sms == 0  # a whole-device batch runs alone
        elif in_flight is not None:
            assert decision.encoder_sms in (0, in_flight.encoder_sms)
            assert decision.lm_sms == TOTAL_SMS - in_flight.encoder_sms
        else:
            assert (decision.encoder_sms > 0) == bool(state.encoder_queue)
        if state.decode_contexts and decision.tpot_ok:
            assert decision.predicted_decode_gap_ms <= budget + 1e-9
        if state.decode_contexts and not decision.tpot_ok and in_flight is None:
            # nothing met the SLO: no split gives the decodes a smaller gap than the one chosen
            assert decision.predicted_decode_gap_ms >= lm_model(TOTAL_SMS, len(state.decode_contexts),
                                                                np.mean(state.decode_contexts), 0) + 1.0 - 1e-9
        waiting_lm = not state.decode_contexts and in_flight is None and state.encoder_queue and all(
            any(r.request_id in item.request_ids for item in state.encoder_queue) for r in state.pending)
        if waiting_lm:  # the LM has nothing it could run: pausing it costs nothing
            assert decision.placement is Placement.ENCODER_WHOLE
        if not config.prefill_split:
            assert decision.placement is not Placement.PREFILL_SPLIT
        looser = SMAllocator(CURVES, dataclasses.replace(config, slo_tpot_ms=tpot * 4)).decide(state)
        assert looser.tpot_ok or not decision.tpot_ok


def test_counters_add_up_predicted_against_actual():
    counters = AllocatorCounters()
    decision = decide(AllocatorState(NOW, images(3), pending(3), decode_contexts=(1000,) * 8))
    counters.record_decision(decision)
    counters.record_lm_step(decision, actual_ms=decision.predicted_lm_step_ms * 1.5)
    counters.record_encoder_batch(decision, actual_ms=decision.predicted_encoder_batch_ms * 0.5)
    counters.record_decode_gap(decision, actual_ms=60.0, slo_tpot_ms=50.0)
    flat = counters.as_dict()
    assert flat[f"allocator_{decision.placement.value}_decisions"] == 1
    assert flat["allocator_lm_step_count"] == 1 and flat["allocator_lm_step_under_predicted"] == 1
    assert flat["allocator_lm_step_abs_error_s"] == pytest.approx(decision.predicted_lm_step_ms * 0.5e-3)
    assert flat["allocator_encoder_batch_under_predicted"] == 0
    assert flat["allocator_tpot_violations"] == 1 and flat["allocator_prefill_step_count"] == 0
    names = {name for name, _, _ in counters.prometheus_samples()}
    assert "spaceserve:allocator_decisions_total" in names
    assert "spaceserve:allocator_prediction_abs_error_seconds_total" in names
    with pytest.raises(ValueError, match=">= 0"):
        counters.record_lm_step(decision, actual_ms=-1.0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="SLOs"):
        AllocatorConfig(slo_tpot_ms=0)
    with pytest.raises(ValueError, match="tpot_margin"):
        AllocatorConfig(tpot_margin=1.5)


def test_settings_come_from_the_engine_flags(tmp_path):
    from spaceserve.core.errors import ConfigError
    from spaceserve.engine.arg_utils import EngineArgs
    from spaceserve.sched.resource_curves import CurvesFile

    path = tmp_path / "curves.json"
    file = CurvesFile()
    file.put(CURVES.to_entry())
    file.write(path)
    engine = EngineArgs("tiny-qwen2-vl", sm_curves=str(path), slo_tpot_ms=25, slo_ttft_ms=1500,
                        max_num_batched_tokens=4096, encoder_budget_tokens=2048).create_engine_config()
    assert engine.allocation.sm_curves == str(path)
    config = AllocatorConfig.from_engine_config(engine, prefill_split=True)
    assert (config.slo_tpot_ms, config.slo_ttft_ms, config.max_num_batched_tokens) == (25, 1500, 4096)
    assert config.encoder_budget_tokens == 2048 and config.prefill_split
    with pytest.raises(ConfigError, match="--sm-curves: cannot read"):
        EngineArgs("tiny-qwen2-vl", sm_curves=str(tmp_path / "none.json")).create_engine_config()
    with pytest.raises(ConfigError, match="SLOs must be > 0"):
        EngineArgs("tiny-qwen2-vl", slo_tpot_ms=0).create_engine_config()
