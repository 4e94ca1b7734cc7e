"""The allocator's state read from real schedulers (no model): pending prefill, decodes, the encoder queue in the
policy's order; and a decision made from it."""

import random

from spaceserve.config import EncoderConfig
from spaceserve.sched.allocation_state import allocator_state
from spaceserve.sched.allocation_types import AllocatorConfig, EncoderInFlight, Placement
from spaceserve.sched.allocator import SMAllocator
from spaceserve.sched.encoder_scheduler import EncoderScheduler
from tests.sched.fake_curves import fake_curves
from tests.sched.test_scheduler import image_request, make_scheduler, run_encoder, step, text_request


def test_state_follows_the_requests_through_prefill_and_decode():
    rng = random.Random(3)
    sched = make_scheduler(budget=64, cache_tokens=64)
    sched.encoder_scheduler = EncoderScheduler(EncoderConfig(policy="twsrft", window_s=10.0, budget_tokens=64,
                                                             cache_tokens=64), sched.encoder_cache)
    big = image_request("big", rng, 4, 12, 3, "h-big", max_tokens=5)
    small = image_request("small", rng, 2, 4, 2, "h-small", max_tokens=5)
    text = text_request("text", 10, rng, max_tokens=6)
    for request in (big, small, text):
        sched.add_request(request)
    state = allocator_state(sched, sched.encoder_scheduler, now=1e9)
    assert {p.request_id: p.prefill_tokens for p in state.pending} == {"big": 19, "small": 8, "text": 10}
    # twsrft: the request with fewer remaining patches first
    assert [item.request_ids for item in state.encoder_queue] == [("small",), ("big",)]
    assert [item.patches for item in state.encoder_queue] == [16, 48] and state.encoder_queue[0].tokens == 4
    assert state.decode_contexts == ()

    step(sched)  # text prefills fully; the image requests stop before their images
    state = allocator_state(sched, sched.encoder_scheduler, now=1e9)
    assert state.decode_contexts == (11,) and state.decode_remaining_tokens == (5,)
    assert {p.request_id: p.prefill_tokens for p in state.pending} == {"big": 15, "small": 6}

    run_encoder(sched)
    in_flight = EncoderInFlight(48, 1e9 + 0.01, frozenset({"big"}))
    state = allocator_state(sched, sched.encoder_scheduler, now=1e9, in_flight=in_flight, decode_stalled_ms=2.0)
    assert state.encoder_queue == () and state.encoder_in_flight is in_flight and state.decode_stalled_ms == 2.0
    decision = SMAllocator(fake_curves(), AllocatorConfig()).decide(state)
    assert decision.placement is Placement.SPLIT and decision.lm_sms == 132 - 48
