"""The engine core in a process of its own: the same tokens as in process, start-up errors of the right kind, a
core that dies fails every request without a hang, and shutdown leaves no process or socket file behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from spaceserve import SamplingParams
from spaceserve.core.errors import ConfigError, InvalidInputError
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.async_llm import AsyncLLM, EngineDeadError
from tests.engine.test_multiplex import DEVICE, _mixed_prompts
from tests.llm_factory import TEST_KV_CACHE_BYTES, make_llm

KWARGS = dict(max_model_len=512, device=DEVICE, dtype="float32", kv_cache_memory_bytes=TEST_KV_CACHE_BYTES)


def _summaries(outputs):
    return [(tuple(o.outputs[0].token_ids), o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs]


@pytest.fixture(scope="module")
def process_llm():
    llm = make_llm("tiny-qwen2-vl", multiprocess=True, **KWARGS)
    yield llm
    llm.llm_engine.shutdown()


def test_offline_generate_in_a_core_process_equals_in_process(process_llm):
    prompts = _mixed_prompts(seed=41, count=10)
    rng = np.random.default_rng(2)
    params = [
        SamplingParams(temperature=0, max_tokens=int(rng.integers(2, 16)), min_tokens=1, stop=("e",) if i % 3 else ())
        for i in range(len(prompts))
    ]
    local = make_llm("tiny-qwen2-vl", multiprocess=False, **KWARGS)
    expected = _summaries(local.generate(prompts, params))
    assert _summaries(process_llm.generate(prompts, params)) == expected
    engine = process_llm.llm_engine
    engine.check_idle_integrity()
    assert engine.call_utility("kv_block_counts")[0] == engine.info["num_kv_blocks"]
    assert engine.loop_counters()["lm_steps"] > 0
    with pytest.raises(RuntimeError, match="in-process"):
        engine.core


def test_bad_input_is_refused_in_the_front_and_the_core_keeps_serving(process_llm):
    engine = process_llm.llm_engine
    with pytest.raises(InvalidInputError, match="limit_mm_per_prompt"):
        pad = "<|vision_start|><|image_pad|><|vision_end|>"
        image = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        engine.add_request({"prompt": pad * 17, "multi_modal_data": {"image": [image] * 17}})
    engine.add_request("still here", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), "after")
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["after"] and len(finished[0].outputs[0].token_ids) == 3
    engine.check_idle_integrity()


def test_a_start_up_error_reaches_the_caller_as_its_own_kind():
    with pytest.raises(ConfigError, match="green contexts|multiplex"):
        make_llm("tiny-qwen2-vl", multiprocess=True, multiplex="space", **{**KWARGS, "device": "cpu"})


def _async_llm() -> AsyncLLM:
    return AsyncLLM.from_engine_args(EngineArgs(model="tiny-qwen2-vl", multiprocess=True, **KWARGS))


def test_async_streams_abort_and_utilities_work_across_processes():
    llm = _async_llm()
    try:
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        local = make_llm("tiny-qwen2-vl", multiprocess=False, **KWARGS)
        prompts = _mixed_prompts(seed=3, count=6)
        expected = [o.outputs[0].token_ids for o in local.generate(prompts, params)]

        async def collect(prompt):
            return [o async for o in llm.generate(prompt, params)]

        async def main():
            streams = await asyncio.gather(*(collect(p) for p in prompts))
            assert [s[-1].outputs[0].token_ids for s in streams] == expected
            outputs = []
            async for output in llm.generate("to be aborted", long, "abort-me"):
                outputs.append(output)
                if len(outputs) == 2:
                    await llm.abort("abort-me")
            assert outputs[-1].outputs[0].finish_reason == "abort"
            while await llm.call_utility("has_unfinished_requests"):
                await asyncio.sleep(0.01)
            await llm.call_utility("check_idle_integrity")
            free, total = await llm.call_utility("kv_block_counts")
            assert free == total
            with pytest.raises(RuntimeError, match="in-process"):
                await llm.run_in_engine(lambda core: None)

        asyncio.run(main())
    finally:
        llm.shutdown()


def test_a_core_process_that_dies_fails_every_stream_and_nothing_hangs():
    llm = _async_llm()
    try:
        long = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)

        async def main():
            streams = [await llm.add_request(f"prompt {i}", long) for i in range(3)]
            for stream in streams:
                await stream.__anext__()
            os.kill(llm._client.process.pid, signal.SIGKILL)
            started = time.monotonic()
            for stream in streams:
                with pytest.raises(EngineDeadError, match="died"):
                    async for _ in stream:
                        pass
            assert time.monotonic() - started < 10
            assert not llm.is_running
            with pytest.raises(EngineDeadError):
                await llm.add_request("after death", long)

        asyncio.run(main())
    finally:
        llm.shutdown()


def test_shutdown_leaves_no_process_and_no_socket_directory():
    llm = _async_llm()
    process, directory = llm._client.process, llm._client._dir
    assert process.poll() is None and os.path.isdir(directory)
    llm.shutdown()
    assert process.poll() is not None and not os.path.exists(directory)
    llm.shutdown()  # twice is fine


def test_sigterm_ends_the_core_process_in_order_and_the_front_hears_of_it():
    llm = _async_llm()
    try:
        process = llm._client.process
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(15) == 0  # the busy loop returned and the core shut down: a clean exit, not a kill
        deadline = time.monotonic() + 10
        while llm.is_running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not llm.is_running
    finally:
        llm.shutdown()
