"""The LM scheduler without a model: budgets, chunked prefill, preemption, prefix hits and waiting on images."""

import random

from spaceserve.config import EncoderConfig, SchedulerConfig
from spaceserve.core import ModelRunnerOutput, MultiModalFeature, PlaceholderRange, Request, SamplingParams
from spaceserve.core.request import RequestStatus
from spaceserve.kvcache.encoder_cache import EncoderCache
from spaceserve.kvcache.kv_manager import KVCacheManager
from spaceserve.sched.encoder_scheduler import EncoderScheduler
from spaceserve.sched.scheduler import Scheduler

BLOCK = 4
IMAGE_TOKEN = 999


def make_scheduler(num_blocks=64, budget=32, max_seqs=8, max_model_len=256, cache_tokens=64, prefix_caching=True):
    kv = KVCacheManager(num_blocks, BLOCK, prefix_caching)
    cache = EncoderCache(cache_tokens)
    encoder = EncoderScheduler(EncoderConfig(budget_tokens=64, cache_tokens=cache_tokens), cache)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=max_model_len)
    return Scheduler(config, kv, cache, encoder)


def text_request(rid, length, rng, max_tokens=4, prompt=None):
    prompt = prompt or [rng.randrange(1, 500) for _ in range(length)]
    return Request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


def image_request(rid, rng, prefix, image_len, suffix, image_hash, max_tokens=3):
    prompt = [rng.randrange(1, 500) for _ in range(prefix)] + [IMAGE_TOKEN] * image_len
    prompt += [rng.randrange(1, 500) for _ in range(suffix)]
    feature = MultiModalFeature(image_hash, "image", PlaceholderRange(prefix, image_len), 4 * image_len, (1, 2, 2 * image_len))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, prompt, params, mm_features=[feature])


def run_encoder(scheduler):
    batch = scheduler.encoder_scheduler.schedule()
    if batch is not None:
        for item in batch.items:
            scheduler.encoder_cache.mark_ready(item.mm_hash)
    return batch


def step(scheduler, token=7):
    out = scheduler.schedule()
    sampled = {s.request.request_id: token for s in out.sequences if s.samples}
    scheduler.update_from_output(out, ModelRunnerOutput(sampled))
    return out


def test_chunked_prefill_respects_the_token_budget():
    rng = random.Random(0)
    sched = make_scheduler(budget=40)
    for rid in "abc":
        sched.add_request(text_request(rid, 30, rng))
    first = step(sched)
    assert [(s.request.request_id, s.num_scheduled_tokens) for s in first.sequences] == [("a", 30), ("b", 10)]
    assert [s.samples for s in first.sequences] == [True, False]
    second = step(sched)
    assert [(s.request.request_id, s.num_computed_tokens, s.num_scheduled_tokens) for s in second.sequences] == [
        ("a", 30, 1),
        ("b", 10, 20),
        ("c", 0, 19),
    ]
    while sched.has_unfinished_requests:
        assert step(sched).num_batched_tokens <= 40
    sched.kv_manager.check_integrity()
    assert sched.kv_manager.num_free_blocks == 64


def test_preemption_recomputes_the_newest_request_and_everyone_finishes():
    rng = random.Random(1)
    sched = make_scheduler(num_blocks=10, budget=64)  # 40 token slots for two 15-token prompts growing by 12
    requests = [text_request(rid, 15, rng, max_tokens=12) for rid in ("old", "new")]
    for r in requests:
        sched.add_request(r)
    preempted = []
    while sched.has_unfinished_requests:
        out = step(sched)
        preempted += out.preempted_request_ids
    assert preempted and set(preempted) == {"new"}
    assert requests[1].num_preemptions >= 1
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 12 for r in requests)
    sched.kv_manager.check_integrity()
    assert sched.kv_manager.num_free_blocks == 10


def test_prefill_stops_before_an_unencoded_image_and_resumes_once_ready():
    rng = random.Random(2)
    sched = make_scheduler()
    request = image_request("img", rng, prefix=5, image_len=8, suffix=3, image_hash="h1")
    sched.add_request(request)
    out = step(sched)
    assert [(s.num_computed_tokens, s.num_scheduled_tokens) for s in out.sequences] == [(0, 5)]
    assert step(sched).is_empty  # still not encoded: nothing to do
    assert sched.encoder_scheduler.has_work
    batch = run_encoder(sched)
    assert [item.mm_hash for item in batch.items] == ["h1"]
    out = step(sched)
    assert [(s.num_computed_tokens, s.num_scheduled_tokens, s.samples) for s in out.sequences] == [(5, 11, True)]
    # the image's span is consumed: its cache entry is no longer referenced by the request
    assert request.request_id not in sched.encoder_cache.request_ids("h1")
    while sched.has_unfinished_requests:
        step(sched)
    sched.encoder_cache.check_integrity()


def test_text_requests_are_not_held_up_by_a_request_waiting_on_its_image():
    rng = random.Random(3)
    sched = make_scheduler()
    sched.add_request(image_request("img", rng, prefix=0, image_len=8, suffix=2, image_hash="h2"))
    sched.add_request(text_request("txt", 6, rng))
    out = step(sched)
    assert [s.request.request_id for s in out.sequences] == ["txt"]
    assert [r.request_id for r in sched.waiting] == ["img"]


def test_prefix_cache_hit_skips_computed_blocks_and_the_covered_image():
    rng = random.Random(4)
    sched = make_scheduler()
    first = image_request("first", rng, prefix=4, image_len=8, suffix=9, image_hash="same")
    sched.add_request(first)
    run_encoder(sched)
    while sched.has_unfinished_requests:
        step(sched)
    second = Request("second", list(first.prompt_token_ids), first.sampling_params, mm_features=first.mm_features)
    sched.add_request(second)
    out = step(sched)
    # 21 prompt tokens: five full blocks would cover all of them, so the hit stops at 20 to leave one to compute
    assert [(s.num_computed_tokens, s.num_scheduled_tokens) for s in out.sequences] == [(20, 1)]
    while sched.has_unfinished_requests:
        step(sched)
    sched.kv_manager.check_integrity()


def test_same_tokens_with_a_different_image_get_no_prefix_hit():
    rng = random.Random(5)
    sched = make_scheduler()
    first = image_request("first", rng, prefix=4, image_len=8, suffix=9, image_hash="cat")
    sched.add_request(first)
    run_encoder(sched)
    while sched.has_unfinished_requests:
        step(sched)
    other_image = MultiModalFeature("dog", "image", PlaceholderRange(4, 8), 32, (1, 2, 16))
    second = Request("second", list(first.prompt_token_ids), first.sampling_params, mm_features=[other_image])
    sched.add_request(second)
    run_encoder(sched)
    out = step(sched)
    # only the block before the image is shared; everything from the image on is computed again
    assert [(s.num_computed_tokens, s.num_scheduled_tokens) for s in out.sequences] == [(4, 17)]


def test_finish_and_abort_release_kv_blocks_and_encoder_references():
    rng = random.Random(6)
    sched = make_scheduler()
    waiting_on_image = image_request("a", rng, prefix=2, image_len=8, suffix=2, image_hash="x")
    running = text_request("b", 9, rng, max_tokens=50)
    sched.add_request(waiting_on_image)
    sched.add_request(running)
    step(sched)
    step(sched)
    aborted = sched.finish_requests(["a", "b", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in aborted} == {"a", "b"}
    assert not sched.has_unfinished_requests
    assert sched.kv_manager.num_free_blocks == 64
    assert not sched.encoder_scheduler.has_work
    sched.kv_manager.check_integrity()
    sched.encoder_cache.check_integrity()


def test_max_num_seqs_caps_the_running_batch():
    rng = random.Random(7)
    sched = make_scheduler(max_seqs=2, budget=100)
    for rid in "abcd":
        sched.add_request(text_request(rid, 5, rng))
    out = step(sched)
    assert [s.request.request_id for s in out.sequences] == ["a", "b"]
    assert sched.num_waiting == 2


def test_a_prefill_cap_limits_prefill_chunks_and_never_the_decodes():
    rng = random.Random(11)
    sched = make_scheduler(budget=64, max_seqs=8)
    for rid in "ab":
        sched.add_request(text_request(rid, 10, rng, max_tokens=8))
    step(sched)  # both prefilled, each now decodes
    for rid in "cd":
        sched.add_request(text_request(rid, 30, rng, max_tokens=4))
    capped = sched.schedule(max_prefill_tokens=12)
    rows = {s.request.request_id: s.num_scheduled_tokens for s in capped.sequences}
    assert rows["a"] == rows["b"] == 1  # decodes untouched by the cap
    assert sum(n for rid, n in rows.items() if rid in "cd") == 12 and rows["c"] == 12 and "d" not in rows
    sampled = {s.request.request_id: 5 for s in capped.sequences if s.samples}
    sched.update_from_output(capped, ModelRunnerOutput(sampled))
    none = sched.schedule(max_prefill_tokens=0)
    assert {s.request.request_id for s in none.sequences} == {"a", "b"}
