"""The SM allocator in the engine loop (space), on the CPU: a layout of splits whose streams are the CPU's (the
worker thread runs every batch), fake curves shaped like a 132-SM Hopper. Each decision is acted on (the split a batch
runs on, the prefill chunk an LM step takes, the LM waiting behind a whole-device batch), counted with its
predictions, and the tokens stay those of `time`. And what the engine learns: the GPU time factors, and the host
time from each decode gap paired with its step's GPU time, in whichever order they come."""

from __future__ import annotations

import dataclasses
import math
import random
from types import SimpleNamespace

import pytest

from spaceserve import SamplingParams
from spaceserve.engine import sm_allocation
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.sm_allocation import SMAllocation
from spaceserve.sched.allocation_types import Allocation, Placement
from spaceserve.runtime.multiplex import ExecutionLayout
from spaceserve.runtime.sm_partition import SMPartition
from tests.engine.test_multiplex import _mixed_prompts
from tests.llm_factory import make_llm
from tests.sched.fake_curves import TOTAL_SMS, fake_curves

SPLITS = (32, 64, 96)


def _space_on_cpu(engine) -> None:
    """Swap a streams-mode engine core's layout for space's shape: splits with CPU 'streams' (None)."""
    core = engine.core
    partitions = tuple(SMPartition(e, TOTAL_SMS - e, TOTAL_SMS, None, None) for e in SPLITS)
    layout = ExecutionLayout("space", "space", "test: splits on the CPU", lm_stream=None, partitions=partitions)
    core.layout = layout
    core.encoder_stage.layout = layout
    allocation = SMAllocation(core.config, fake_curves(), layout.encoder_sms_counts)
    core.attach_allocation(allocation)


def _generate(engine, prompts, params):
    for index, prompt in enumerate(prompts):
        engine.add_request(prompt, params, f"r{index}")
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    return [list(finished[f"r{i}"].outputs[0].token_ids) for i in range(len(prompts))]


def test_the_allocators_decisions_are_acted_on_and_tokens_stay_times():
    prompts = _mixed_prompts(seed=23, count=12)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kwargs = dict(max_model_len=1024, device="cpu", dtype="float32", slo_tpot_ms=50)
    expected = _generate(make_llm("tiny-qwen2-vl", multiplex="time", **kwargs).llm_engine, prompts, params)
    engine = make_llm("tiny-qwen2-vl", multiplex="streams", **kwargs).llm_engine
    try:
        _space_on_cpu(engine)
        assert _generate(engine, prompts, params) == expected
        engine.check_idle_integrity()
        counters = engine.loop_counters()
        decisions = {k: v for k, v in counters.items() if k.endswith("_decisions")}
        assert sum(decisions.values()) >= counters["lm_steps"]
        assert counters["allocator_encoder_whole_decisions"] + counters["allocator_split_decisions"] > 0
        assert counters["allocator_encoder_batch_count"] == counters["encoder_batches"] > 0
        assert counters["allocator_lm_step_count"] == 0  # no CUDA events on the CPU: no measured GPU step
    finally:
        engine.shutdown()


def test_a_zero_prefill_chunk_holds_prefill_and_never_the_decodes():
    engine = make_llm("tiny-qwen2-vl", multiplex="streams", max_model_len=512, device="cpu").llm_engine
    try:
        _space_on_cpu(engine)
        core = engine.core
        real_decide = core.allocation.decide

        def no_prefill_while_decoding(scheduler, encoder_scheduler):
            decision = real_decide(scheduler, encoder_scheduler)
            decoding = any(r.num_output_tokens for r in scheduler.running)
            return dataclasses.replace(decision, prefill_tokens=0) if decoding else decision

        core.allocation.decide = no_prefill_while_decoding
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        engine.add_request("first words", params, "first")
        while not core.scheduler.running or not core.scheduler.running[0].num_output_tokens:
            engine.step()
        engine.add_request("second request " * 8, params, "second")
        for _ in range(3):
            engine.step()
        second = core.scheduler.requests["second"]
        assert second.num_computed_tokens == 0  # held: every step so far allowed no prefill beside the decode
        assert core.scheduler.requests["first"].num_output_tokens >= 3
        core.allocation.decide = real_decide
        while engine.has_unfinished_requests():
            engine.step()
        engine.check_idle_integrity()
    finally:
        engine.shutdown()


def test_a_layout_split_outside_the_curves_is_not_offered():
    engine = make_llm("tiny-qwen2-vl", multiplex="streams", max_model_len=256, device="cpu").llm_engine
    try:
        # the encoder curve starts at 64 SMs: a 32-SM encoder side would be extrapolated, so it is not offered
        allocation = SMAllocation(engine.core.config, fake_curves(encoder_sms=(64, 96, TOTAL_SMS)), (32, 64, 96))
        assert [s.encoder_sms for s in allocation.allocator.splits] == [64, 96]
    finally:
        engine.shutdown()


def test_measured_lm_steps_teach_the_allocator_their_slowdown():
    engine = make_llm("tiny-qwen2-vl", multiplex="streams", max_model_len=256, device="cpu").llm_engine
    try:
        _space_on_cpu(engine)
        allocation = engine.core.allocation
        on_split = Allocation(Placement.SPLIT, 64, TOTAL_SMS - 64, 128, predicted_lm_step_ms=5.0,
                              lm_step_curve_ms=4.0)
        whole = Allocation(Placement.LM_WHOLE, 0, TOTAL_SMS, 128, predicted_lm_step_ms=4.0, lm_step_curve_ms=3.0)
        for _ in range(60):
            allocation.lm_step_timed(on_split, 8.0)  # beside the encoder: twice its curve
            allocation.lm_step_timed(whole, 3.3)
        allocation.lm_step_timed(None, 99.0)  # a step scheduled without a decision teaches nothing
        assert allocation.lm_step_split.factor > 1.9 and 1.05 < allocation.lm_step_whole.factor < 1.15
        for _ in range(10):
            allocation.lm_step_host.observe(14.0, 8.0)
        seen = []
        real_decide = allocation.allocator.decide
        allocation.allocator.decide = lambda state: seen.append(state) or real_decide(state)
        engine.add_request("a prompt to weigh", SamplingParams(temperature=0, max_tokens=2), "r")
        engine.step()
        assert seen and seen[0].lm_step_scale_split == allocation.lm_step_split.factor
        assert seen[0].lm_step_scale_whole == allocation.lm_step_whole.factor
        assert seen[0].lm_step_host_ms == pytest.approx(6.0)
        counters = engine.loop_counters()
        assert counters["allocator_lm_step_curve_count"] == 120
        assert counters["allocator_lm_step_curve_actual_s"] == pytest.approx(60 * (8.0 + 3.3) / 1e3)
        assert counters["allocator_lm_step_host_ms"] == pytest.approx(6.0)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.shutdown()


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _allocation_on_a_clock(monkeypatch) -> tuple[SMAllocation, _Clock]:
    config = EngineArgs(model="tiny-qwen2-vl", max_model_len=256, slo_tpot_ms=50).create_engine_config()
    clock = _Clock()
    monkeypatch.setattr(sm_allocation, "time", SimpleNamespace(monotonic=clock.monotonic))
    return SMAllocation(config, fake_curves(), SPLITS), clock


def _decodes_only(stalled_ms: float = 0.0) -> Allocation:
    """Like the fast path's decisions: a fresh object each step, equal by value to the others."""
    return Allocation(Placement.LM_WHOLE, 0, TOTAL_SMS, 8192, decode_stalled_ms=stalled_ms, reason="decodes only")


def test_each_decode_gap_pairs_with_the_gpu_time_of_its_step_in_either_order(monkeypatch):
    rng = random.Random(17)
    allocation, clock = _allocation_on_a_clock(monkeypatch)
    allocation.lm_step_collected(_decodes_only(), decoded=True)  # the first decode: no gap yet
    expected, untimed = [], []
    for _ in range(200):
        gap, gpu, stalled = rng.uniform(10.0, 30.0), rng.uniform(2.0, 9.0), rng.uniform(0.0, 1.0)
        expected.append(gap - stalled - gpu)
        decision = _decodes_only(stalled)
        clock.now += gap / 1e3
        if rng.random() < 0.5:  # its events completed by its own collection
            allocation.lm_step_timed(decision, gpu)
            allocation.lm_step_collected(decision, decoded=True)
        else:  # they complete a few collections later
            allocation.lm_step_collected(decision, decoded=True)
            untimed.append((decision, gpu))
        while untimed and (len(untimed) > 3 or rng.random() < 0.3):
            allocation.lm_step_timed(*untimed.pop(0))
    for late in untimed:
        allocation.lm_step_timed(*late)
    host = allocation.lm_step_host
    assert host.samples == 200 and not allocation._unpaired
    assert host.total_excess_ms == pytest.approx(sum(expected), rel=1e-6)
    assert host.value_ms == pytest.approx(sum(expected[-40:]) / 40, abs=3.0)
    counters = allocation.as_dict()
    assert counters["allocator_lm_step_host_ms"] == host.value_ms
    assert counters["allocator_lm_step_host_count"] == 200
    assert counters["allocator_lm_step_host_excess_s"] == pytest.approx(sum(expected) / 1e3, rel=1e-6)


def test_halves_that_never_pair_are_bounded_and_teach_nothing(monkeypatch):
    allocation, clock = _allocation_on_a_clock(monkeypatch)
    for _ in range(500):  # on the CPU: gaps, and never a GPU time
        clock.now += 0.02
        allocation.lm_step_collected(_decodes_only(), decoded=True)
    assert len(allocation._unpaired) == SMAllocation.MAX_UNPAIRED_STEPS
    for _ in range(500):  # GPU times of steps whose gap never comes
        allocation.lm_step_timed(_decodes_only(), 5.0)
    assert len(allocation._unpaired) == SMAllocation.MAX_UNPAIRED_STEPS
    prefill = _decodes_only()
    allocation.lm_step_timed(prefill, 5.0)
    allocation.lm_step_collected(prefill, decoded=False)  # ended no decode gap: its GPU time pairs with nothing
    assert id(prefill) not in allocation._unpaired
    for _ in range(20):  # steps without a decision
        clock.now += 0.02
        allocation.lm_step_timed(None, 5.0)
        allocation.lm_step_collected(None, decoded=True)
    assert allocation.lm_step_host.samples == 0 and allocation.lm_step_host.value_ms is None
    counters = allocation.as_dict()
    assert counters["allocator_lm_step_host_ms"] == 0.0 and counters["allocator_lm_step_host_count"] == 0
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in counters.values())
