"""The scheduler's prefill lane (PREFILL_SPLIT): prompt chunks only, its requests kept out of the decode steps and
never preempted while its step is in flight, and back in either lane once it is released."""

import random

from spaceserve.core import ModelRunnerOutput
from spaceserve.core.request import RequestStatus
from tests.sched.test_scheduler import image_request, make_scheduler, run_encoder, step, text_request


def _finish_lane(sched, out, token=7):
    sched.release_prefill_lane(out)
    sampled = {s.request.request_id: token for s in out.sequences if s.samples}
    return sched.update_from_output(out, ModelRunnerOutput(sampled))


def _decode_one_token(sched, rng, rid="d"):
    sched.add_request(text_request(rid, 6, rng, max_tokens=50))
    step(sched)
    assert sched.requests[rid].num_output_tokens == 1


def test_the_lane_takes_prompt_chunks_only_and_the_decode_steps_skip_its_requests():
    rng = random.Random(1)
    sched = make_scheduler(budget=64)
    _decode_one_token(sched, rng)
    sched.add_request(text_request("p", 50, rng))
    sched.add_request(text_request("q", 30, rng))
    lane = sched.schedule_prefill_lane(60)
    assert [(s.request.request_id, s.num_scheduled_tokens) for s in lane.sequences] == [("p", 50), ("q", 10)]
    assert [s.samples for s in lane.sequences] == [True, False]
    assert sched.in_prefill_lane == {"p", "q"}
    decode = sched.schedule(0)  # the decode lane: one token for d, nothing of p or q
    assert [(s.request.request_id, s.num_scheduled_tokens) for s in decode.sequences] == [("d", 1)]
    # even with a prefill budget, the decode lane leaves the lane's requests alone until released
    sched.update_from_output(decode, ModelRunnerOutput({"d": 3}))
    decode = sched.schedule(64)
    assert {s.request.request_id for s in decode.sequences} == {"d"}
    sched.update_from_output(decode, ModelRunnerOutput({"d": 4}))
    updated = _finish_lane(sched, lane)
    assert [r.request_id for r in updated] == ["p"]
    assert sched.in_prefill_lane == set()
    after = sched.schedule(64)
    assert {(s.request.request_id, s.num_scheduled_tokens) for s in after.sequences} == {("d", 1), ("p", 1), ("q", 20)}


def test_a_decoding_request_is_never_taken_by_the_lane():
    rng = random.Random(2)
    sched = make_scheduler(budget=64)
    _decode_one_token(sched, rng)
    assert sched.schedule_prefill_lane(64).is_empty
    assert sched.in_prefill_lane == set()


def test_the_lane_stops_before_an_image_that_is_not_encoded():
    rng = random.Random(3)
    sched = make_scheduler(budget=64)
    sched.add_request(image_request("i", rng, prefix=5, image_len=8, suffix=4, image_hash="img"))
    lane = sched.schedule_prefill_lane(64)
    assert [(s.request.request_id, s.num_scheduled_tokens) for s in lane.sequences] == [("i", 5)]
    _finish_lane(sched, lane)
    assert sched.schedule_prefill_lane(64).is_empty  # still waiting for its image
    run_encoder(sched)
    lane = sched.schedule_prefill_lane(64)
    assert [(s.num_computed_tokens, s.num_scheduled_tokens, s.samples) for s in lane.sequences] == [(5, 12, True)]


def test_the_decode_lane_never_preempts_a_request_of_the_prefill_lane():
    rng = random.Random(4)
    sched = make_scheduler(num_blocks=10, budget=64)  # 40 token slots
    _decode_one_token(sched, rng)  # 6 prompt tokens + 1: 2 blocks
    sched.add_request(text_request("p", 28, rng))  # 7 blocks: 1 left
    lane = sched.schedule_prefill_lane(64)
    assert [s.request.request_id for s in lane.sequences] == ["p"]
    decode_request = sched.requests["d"]
    for token in range(12):  # d grows until it needs a block nobody but p could give
        out = sched.schedule(0)
        if not out.sequences:
            break
        assert out.preempted_request_ids in ((), ("d",))
        sched.update_from_output(out, ModelRunnerOutput({s.request.request_id: token for s in out.sequences}))
    assert sched.requests["p"].status == RequestStatus.RUNNING and "p" in sched.in_prefill_lane
    assert sched.kv_manager.block_ids("p")  # p kept its blocks
    assert decode_request.status == RequestStatus.PREEMPTED and sched.num_preemptions == 1  # d, the newest but p
    _finish_lane(sched, lane)
    assert "p" not in sched.in_prefill_lane


def test_the_lane_never_preempts_and_waits_for_blocks():
    rng = random.Random(5)
    sched = make_scheduler(num_blocks=4, budget=64)  # 16 token slots
    _decode_one_token(sched, rng)
    sched.add_request(text_request("big", 30, rng))
    lane = sched.schedule_prefill_lane(64)
    assert lane.is_empty and sched.in_prefill_lane == set()
    assert sched.requests["d"].status == RequestStatus.RUNNING
    assert [r.request_id for r in sched.waiting] == ["big"]


def test_a_finished_request_leaves_the_lane():
    rng = random.Random(6)
    sched = make_scheduler(budget=64)
    sched.add_request(text_request("p", 20, rng))
    sched.schedule_prefill_lane(64)
    assert sched.in_prefill_lane == {"p"}
    sched.finish_requests(["p"], RequestStatus.FINISHED_ABORTED)
    assert sched.in_prefill_lane == set() and not sched.requests
    sched.kv_manager.check_integrity()
