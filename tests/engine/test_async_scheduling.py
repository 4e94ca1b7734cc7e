"""Overlapped (async) scheduling: step N+1 is scheduled and launched before step N's tokens reach the host, its
decode inputs fed from the device. Every request must end at exactly the token it ends at without overlap: EOS,
stop strings, stop token ids, max_tokens, min_tokens, seeded sampling, preemption, prefix hits and aborts."""

from __future__ import annotations

import numpy as np
import pytest

from spaceserve import SamplingParams
from tests.engine.test_multiplex import DEVICE, _mixed_prompts
from tests.llm_factory import make_llm


def _engine(model: str, async_scheduling: bool, **kwargs):
    kwargs.setdefault("max_model_len", 512)
    return make_llm(model, device=DEVICE, dtype="float32", async_scheduling=async_scheduling, **kwargs).llm_engine


def _run(engine, prompts, params, abort_at=None):
    """Feed prompts two per step, abort some at given steps; returns (request id -> output) of finished requests."""
    abort_at = abort_at or {}
    finished, added, step = {}, 0, 0
    while True:
        for index in range(added, min(added + 2, len(prompts))):
            engine.add_request(prompts[index], params[index], f"r{index}")
        added = min(added + 2, len(prompts))
        for request_id, at in abort_at.items():
            if step == at:
                engine.abort_request([request_id])
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        step += 1
        if added == len(prompts) and not engine.has_unfinished_requests():
            return finished


def _summary(outputs):
    return {
        request_id: (tuple(o.outputs[0].token_ids), o.outputs[0].text, o.outputs[0].finish_reason,
                     o.outputs[0].stop_reason)
        for request_id, o in outputs.items()
    }


def _varied_params(rng: np.random.Generator, count: int) -> list[SamplingParams]:
    params = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            params.append(SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 20))))
        elif kind == 1:
            params.append(SamplingParams(temperature=0, max_tokens=16, min_tokens=int(rng.integers(1, 8))))
        elif kind == 2:
            params.append(SamplingParams(temperature=0.9, top_p=0.9, seed=int(rng.integers(0, 1 << 30)), max_tokens=12))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))
    return params


@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_overlap_gives_the_same_outputs_as_serial_scheduling(model):
    prompts = _mixed_prompts(seed=31, count=16)
    params = _varied_params(np.random.default_rng(3), len(prompts))
    results = {}
    for overlap in (False, True):
        engine = _engine(model, overlap)
        try:
            results[overlap] = _summary(_run(engine, prompts, params))
            engine.check_idle_integrity()
            fed = engine.core.model_runner.num_placeholder_tokens_fed
            assert (fed > 0) == overlap, f"overlap={overlap} fed {fed} tokens from the device"
        finally:
            engine.shutdown()
    assert results[True] == results[False]
    assert len(results[True]) == len(prompts)


def test_stop_strings_and_stop_token_ids_end_at_the_same_token_with_overlap():
    prompts = [f"tell me about w{i} and w{i + 7} " * (1 + i % 3) for i in range(10)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = _engine("tiny-qwen2-vl", False)
    try:
        free_run = _run(engine, prompts, [greedy] * len(prompts))
    finally:
        engine.shutdown()
    # stops taken from what the model says, so they trigger mid-output
    params = []
    for index in range(len(prompts)):
        completion = free_run[f"r{index}"].outputs[0]
        if index % 2 and len(completion.text) > 6:
            stop = completion.text[len(completion.text) // 2 : len(completion.text) // 2 + 3]
            params.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,) if stop else ()))
        else:
            token = completion.token_ids[len(completion.token_ids) // 3]
            params.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=(token,)))
    results = {}
    for overlap in (False, True):
        engine = _engine("tiny-qwen2-vl", overlap)
        try:
            results[overlap] = _summary(_run(engine, prompts, params))
            engine.check_idle_integrity()
        finally:
            engine.shutdown()
    assert results[True] == results[False]
    stopped = [r for r in results[True].values() if r[2] == "stop"]
    assert len(stopped) >= len(prompts) // 2, "the stops were meant to end most requests early"


def test_overlap_under_preemption_prefix_hits_and_aborts_loses_nothing_and_matches_serial():
    prompts = _mixed_prompts(seed=8, count=30)
    shared_prefix = "a long shared system prompt " * 6
    prompts = [shared_prefix + p if isinstance(p, str) else p for p in prompts]
    rng = np.random.default_rng(5)
    params = [SamplingParams(temperature=0, max_tokens=int(rng.integers(4, 24)), ignore_eos=True) for _ in prompts]
    abort_at = {"r4": 2, "r11": 5, "r20": 9}
    results = {}
    for overlap in (False, True):
        engine = _engine("tiny-qwen2-vl", overlap, max_num_seqs=16, num_gpu_blocks_override=48, encoder_cache_tokens=300)
        try:
            outputs = _run(engine, prompts, params, abort_at)
            assert engine.core.scheduler.num_preemptions > 0, "the KV cache was meant to be tight enough to preempt"
            assert engine.core.kv_manager.prefix_cache_stats.hits > 0
            engine.check_idle_integrity()
            assert engine.core.kv_manager.num_free_blocks == engine.core.kv_manager.num_blocks
        finally:
            engine.shutdown()
        completed = {f"r{i}" for i in range(len(prompts))} - set(abort_at)
        assert completed <= set(outputs)
        for request_id in completed:
            assert len(outputs[request_id].outputs[0].token_ids) == params[int(request_id[1:])].max_tokens
        results[overlap] = {r: s for r, s in _summary(outputs).items() if r in completed}
    assert results[True] == results[False]


def test_a_finished_request_gets_no_token_from_the_step_already_in_flight():
    engine = _engine("tiny-qwen2-vl", True)
    try:
        request = engine.add_request("count with me", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        seen = []
        while engine.has_unfinished_requests():
            for output in engine.step():
                seen.append(list(output.outputs[0].token_ids))
        assert len(request.output_token_ids) == 3 and seen[-1] == request.output_token_ids
        # max_tokens is known ahead: no step beyond the third token is even scheduled
        assert request.num_output_placeholders == 0
        engine.check_idle_integrity()
    finally:
        engine.shutdown()
