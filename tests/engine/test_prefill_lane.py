"""The prefill lane (PREFILL_SPLIT) in the engine loop, on the CPU: a second runner takes the prefill steps while
decode-only steps run, the tokens stay those of `time` (greedy and seeded), an abort of a request whose lane step is
in flight leaks nothing, and later LM steps wait on the device for a lane step whose request freed its blocks. On a
GPU: lane steps on the encoder's side of a real split, beside decode steps, with the same tokens."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from spaceserve import SamplingParams
from spaceserve.core.errors import ConfigError
from spaceserve.engine.prefill_lane import LaneStep, PrefillLane
from spaceserve.runtime.sm_partition import green_context_support
from spaceserve.sched.allocation_types import Placement
from tests.engine.test_multiplex import CUDA, _mixed_prompts
from tests.engine.test_sm_allocation import _generate, _space_on_cpu
from tests.llm_factory import make_llm

KWARGS = dict(max_model_len=1024, device="cpu", dtype="float32", slo_tpot_ms=50)


def _space_with_lane(engine, force: bool = True) -> None:
    """space on the CPU with a prefill lane; `force`: PREFILL_SPLIT whenever something decodes and something waits
    for its prefill (the allocator's own choice depends on the curves)."""
    _space_on_cpu(engine)
    core = engine.core
    core.attach_prefill_lane(PrefillLane(core.model_runner.sibling(None)))
    if force:
        _force_prefill_split(core)


def _force_prefill_split(core) -> None:
    real_decide = core.allocation.decide
    stage = core.encoder_stage

    def prefer_the_lane(scheduler, encoder_scheduler):
        decision = real_decide(scheduler, encoder_scheduler)
        decoding = any(r.num_output_tokens for r in scheduler.running)
        prefilling = scheduler.waiting or any(not r.num_output_tokens for r in scheduler.running)
        if not (decision.lm_sms and decoding and prefilling):
            return decision
        splits = [p for p in stage.layout.partitions if stage.can_hold_split(p)]
        if not splits:
            return decision  # a whole-device batch is in flight
        preferred = [p for p in splits if p.encoder_sms == decision.encoder_sms] or splits
        return dataclasses.replace(decision, placement=Placement.PREFILL_SPLIT, prefill_sms=preferred[0].encoder_sms,
                                   prefill_tokens=core.config.scheduler.max_num_batched_tokens)

    core.allocation.decide = prefer_the_lane


def _times_tokens(prompts, params, **kwargs) -> list[list[int]]:
    engine = make_llm("tiny-qwen2-vl", multiplex="time", **{**KWARGS, **kwargs}).llm_engine
    try:
        return _generate(engine, prompts, params)
    finally:
        engine.shutdown()


@contextlib.contextmanager
def _lane_engine(force: bool = True, **kwargs):
    """A CPU engine in space's shape with a prefill lane (`_space_with_lane`), shut down afterwards."""
    engine = make_llm("tiny-qwen2-vl", multiplex="streams", **{**KWARGS, **kwargs}).llm_engine
    try:
        _space_with_lane(engine, force)
        yield engine
    finally:
        engine.shutdown()


def _generate_staggered(engine, prompts, params, every: int = 2) -> list[list[int]]:
    """Add a request every `every` steps, so that requests arrive while others decode."""
    pending = list(enumerate(prompts))
    finished, steps = {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and steps % every == 0:
            index, prompt = pending.pop(0)
            engine.add_request(prompt, params, f"r{index}")
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        steps += 1
    return [list(finished[f"r{i}"].outputs[0].token_ids) for i in range(len(prompts))]


GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_prefill_steps_in_the_lane_give_times_tokens(params):
    prompts = _mixed_prompts(seed=31, count=12)
    expected = _times_tokens(prompts, params)
    with _lane_engine() as engine:
        assert _generate_staggered(engine, prompts, params) == expected
        engine.check_idle_integrity()
        counters = engine.loop_counters()
        assert counters["prefill_lane_steps"] > 0 and counters["prefill_lane_tokens"] > 0
        assert counters["allocator_prefill_split_decisions"] > 0
        metrics = {name: value for name, labels, value in engine.core.stats().allocator if not labels}
        assert metrics["spaceserve:prefill_lane_steps_total"] == counters["prefill_lane_steps"]
        assert metrics["spaceserve:prefill_lane_tokens_total"] == counters["prefill_lane_tokens"]
        assert metrics["spaceserve:allocator_lm_step_host_gaps_total"] == 0  # no GPU times on the CPU
        assert counters["allocator_prefill_step_count"] == 0  # no CUDA events on the CPU: no measured GPU time
        assert engine.core.scheduler.in_prefill_lane == set()


def test_preemption_under_kv_pressure_with_the_lane_keeps_times_tokens_and_leaks_nothing():
    prompts = _mixed_prompts(seed=34, count=16)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tight = dict(max_model_len=512, num_gpu_blocks_override=48, encoder_cache_tokens=400)
    expected = _times_tokens(prompts, params, **tight)
    with _lane_engine(**tight) as engine:
        core = engine.core
        real_schedule, stale = core.scheduler.schedule, []

        def schedule(budget):
            out = real_schedule(budget)
            # the lane schedules before the decode lane in a step: none of these can be the lane's again yet
            core.step_checks.append(out.preempted_request_ids)
            return out

        core.step_checks = []
        core.scheduler.schedule = schedule
        real_step = core.step

        def step():
            outputs = real_step()
            for preempted in core.step_checks:
                stale.extend(r for r in preempted if r in core.prefill_lane.runner.input_batch._requests)
            core.step_checks.clear()
            return outputs

        core.step = step
        assert _generate_staggered(engine, prompts, params, every=1) == expected
        engine.check_idle_integrity()
        assert core.scheduler.num_preemptions > 0 and engine.loop_counters()["prefill_lane_steps"] > 0
        assert stale == []  # the lane's runner forgot the blocks of every request the decode lane preempted


def test_videos_chunked_through_the_lane_keep_times_tokens():
    import io

    from spaceserve.multimodal.video.synthetic import make_clip

    clips = []
    for seed in (3, 4):
        buffer = io.BytesIO()
        make_clip(buffer, width=64, height=48, seconds=2, fps=10, gop=10, seed=seed)
        clips.append(buffer.getvalue())
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    prompts = [*_mixed_prompts(seed=35, count=6)[:3],
               *({"prompt": f"{video} what happens, clip {i}?", "multi_modal_data": {"video": clip}}
                 for i, clip in enumerate(clips)),
               *_mixed_prompts(seed=35, count=6)[3:]]
    kwargs = dict(mm_processor_kwargs={"min_pixels": 3136, "max_pixels": 28 * 28 * 16}, video_chunk_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = _times_tokens(prompts, params, **kwargs)
    with _lane_engine(**kwargs) as engine:
        assert _generate_staggered(engine, prompts, params) == expected
        engine.check_idle_integrity()
        assert engine.loop_counters()["prefill_lane_steps"] > 0


def test_the_allocator_is_told_it_may_choose_the_lane():
    engine = make_llm("tiny-qwen2-vl", multiplex="streams", **KWARGS).llm_engine
    try:
        _space_on_cpu(engine)
        assert not engine.core.allocation.allocator.config.prefill_split
        _space_with_lane(engine, force=False)
        assert engine.core.allocation.allocator.config.prefill_split
        assert engine.core.describe()["prefill_split"]
        prompts = _mixed_prompts(seed=32, count=8)
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        assert _generate_staggered(engine, prompts, params) == _times_tokens(prompts, params)
        engine.check_idle_integrity()
    finally:
        engine.shutdown()


def test_an_abort_while_the_lane_step_is_in_flight_leaks_nothing():
    with _lane_engine() as engine:
        core = engine.core
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        engine.add_request("the first request decodes for a while", params, "first")
        while not core.scheduler.requests["first"].num_output_tokens:
            engine.step()
        engine.add_request("a second prompt, long enough to be worth a prefill step " * 3, params, "second")
        while core.prefill_lane.in_flight is None:
            engine.step()
        assert core.prefill_lane.in_flight.request_ids == {"second"}
        engine.abort_request(["second"])
        assert "second" not in core.scheduler.requests
        outputs = {}
        while engine.has_unfinished_requests():
            outputs.update({o.request_id: o for o in engine.step() if o.finished})
        assert len(outputs["first"].outputs[0].token_ids) == 12
        engine.check_idle_integrity()
        assert core.prefill_lane.in_flight is None


def test_prefill_split_is_refused_with_an_encoder_process():
    with pytest.raises(ConfigError, match="enable_prefill_split"):
        make_llm("tiny-qwen2-vl", multiplex="streams", encoder_process=True, enable_prefill_split=True, **KWARGS)


class _Event:
    def __init__(self, done: bool) -> None:
        self.done = done

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


class _Stream:
    def __init__(self) -> None:
        self.waited: list[_Event] = []

    def wait_event(self, event) -> None:
        self.waited.append(event)


class _Handle:
    def __init__(self, end: _Event) -> None:
        self.gpu_span = None
        self.done = end


class _Runner:
    def collect(self, handle):
        return "output"


def test_lm_steps_wait_on_the_device_for_a_lane_step_whose_request_finished():
    lane = PrefillLane(_Runner())
    end = _Event(done=False)
    seq = type("Seq", (), {"request": type("Req", (), {"request_id": "r"})()})()
    scheduled = type("Out", (), {"sequences": (seq,)})()
    lane.in_flight = LaneStep(scheduled, _Handle(end), frozenset({"r"}))
    stream = _Stream()
    lane.fence_finished(["other"])
    lane.order_after_fence(stream)
    assert stream.waited == []  # nothing of the lane's step was freed
    lane.fence_finished(["r"])
    lane.order_after_fence(stream)
    lane.order_after_fence(stream)
    assert stream.waited == [end, end]  # every LM step until the lane's step is collected
    assert lane.take_finished() is None  # still running
    end.done = True
    assert lane.take_finished()[1] == "output"
    lane.order_after_fence(stream)
    assert stream.waited == [end, end]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_on_the_gpu_lane_steps_run_beside_decode_steps_and_the_tokens_stay_times():
    reason = green_context_support(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    prompts = _mixed_prompts(seed=33, count=16)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kwargs = dict(max_model_len=1024, attention_backend="triton")
    expected = _generate(make_llm("tiny-qwen2-vl", multiplex="time", **kwargs).llm_engine, prompts, params)
    engine = make_llm("tiny-qwen2-vl", multiplex="space", encoder_sms="32,64", enable_prefill_split=True,
                      **kwargs).llm_engine
    try:
        core = engine.core
        assert core.prefill_lane is not None and core.allocation.allocator.config.prefill_split
        assert all(p.prefill_stream is not None for p in core.layout.partitions)
        _force_prefill_split(core)
        assert _generate_staggered(engine, prompts, params) == expected
        engine.check_idle_integrity()
        counters = engine.loop_counters()
        assert counters["prefill_lane_steps"] > 0 and counters["prefill_lane_lm_steps_beside"] > 0
        assert counters["allocator_prefill_step_count"] > 0  # the lane's steps timed on the device
    finally:
        engine.shutdown()


def test_a_lane_step_holds_its_split_in_the_allocators_view_and_is_timed_against_its_tokens():
    with _lane_engine(force=False) as engine:
        allocation = engine.core.allocation
        allocation.prefill_dispatched(64, frozenset({"lane-request"}), 640)
        seen = []
        real_decide = allocation.allocator.decide
        allocation.allocator.decide = lambda state: seen.append(state) or real_decide(state)
        allocation.decide(engine.core.scheduler, engine.core.encoder_stage.scheduler)  # nothing queued: still weighed
        in_flight = seen[0].encoder_in_flight
        assert in_flight is not None and in_flight.encoder_sms == 64 and "lane-request" in in_flight.request_ids
        allocation.prefill_finished(7.5)
        counters = engine.loop_counters()
        curve_ms = float(allocation.allocator.prefill_curve_ms(64, 640))
        assert counters["allocator_prefill_step_count"] == 1
        assert counters["allocator_prefill_step_predicted_s"] == pytest.approx(curve_ms / 1e3)  # factor 1: unlearned
        assert counters["allocator_prefill_step_actual_s"] == pytest.approx(7.5e-3)
        assert curve_ms > float(allocation.allocator.prefill_curve_ms(64, 64)) > 0
        allocation.allocator.decide = real_decide
        allocation.decide(engine.core.scheduler, engine.core.encoder_stage.scheduler)  # the lane's split is free again
        allocation.prefill_finished(None)  # nothing in flight: nothing counted
        assert engine.loop_counters()["allocator_prefill_step_count"] == 1
