"""AsyncLLM: the engine thread, per-request streams, abort on every way a consumer can leave, engine failures."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from spaceserve import SamplingParams
from spaceserve.core.errors import InvalidInputError
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.async_llm import AsyncLLM, EngineDeadError
from tests.llm_factory import TEST_KV_CACHE_BYTES, make_llm

PAD = "<|vision_start|><|image_pad|><|vision_end|>"
ENGINE_KWARGS = dict(max_model_len=512, kv_cache_memory_bytes=TEST_KV_CACHE_BYTES, limit_mm_per_prompt={"image": 2})
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)


def image(seed, size=(48, 64)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def random_prompts(seed, count):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "tau", "rho"]
    prompts = []
    for i in range(count):
        text = " ".join(rng.choice(words, size=int(rng.integers(2, 12))))
        if i % 3 == 0:
            prompts.append({"prompt": text + " " + PAD, "multi_modal_data": {"image": image(seed * 100 + i)}})
        else:
            prompts.append(text)
    return prompts


class FinishRecorder:
    """A stat logger remembering how each request ended."""

    def __init__(self) -> None:
        self.finish_reasons: dict[str, str] = {}

    def record_finished(self, output) -> None:
        self.finish_reasons[output.request_id] = output.outputs[0].finish_reason


def make_async_llm() -> AsyncLLM:
    return AsyncLLM.from_engine_args(EngineArgs(model="tiny-qwen2-vl", **ENGINE_KWARGS), stat_loggers=[FinishRecorder()])


def finish_reason(llm: AsyncLLM, request_id: str) -> str | None:
    return llm.stat_loggers[0].finish_reasons.get(request_id)


@pytest.fixture(scope="module")
def async_llm():
    llm = make_async_llm()
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def offline_llm():
    return make_llm("tiny-qwen2-vl", **ENGINE_KWARGS)


def run(coro):
    return asyncio.run(coro)


async def wait_idle(llm: AsyncLLM) -> None:
    while await llm.run_in_engine(lambda engine: engine.has_unfinished_requests()):
        await asyncio.sleep(0.01)


async def assert_idle_and_clean(llm: AsyncLLM) -> None:
    await wait_idle(llm)
    await llm.run_in_engine(lambda engine: engine.check_idle_integrity())
    free, total = await llm.run_in_engine(lambda e: (e.kv_manager.num_free_blocks, e.kv_manager.num_blocks))
    assert free == total


async def collect(llm, prompt, params, request_id=None):
    outputs = [o async for o in llm.generate(prompt, params, request_id)]
    return outputs


def test_outputs_are_cumulative_and_equal_the_offline_engine(async_llm, offline_llm):
    prompts = random_prompts(1, 7)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in offline_llm.generate(prompts, params)]

    async def main():
        return await asyncio.gather(*(collect(async_llm, p, params) for p in prompts))

    streams = run(main())
    for outputs, tokens in zip(streams, expected):
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert outputs[-1].outputs[0].token_ids == tokens
        for earlier, later in zip(outputs, outputs[1:]):
            assert later.outputs[0].token_ids[: len(earlier.outputs[0].token_ids)] == earlier.outputs[0].token_ids
        assert outputs[-1].metrics["finished_time"] >= outputs[-1].metrics["first_token_time"]
        assert outputs[-1].metrics["first_token_time"] >= outputs[-1].metrics["arrival_time"]
    run(assert_idle_and_clean(async_llm))


def test_bad_input_raises_before_anything_is_yielded_and_disturbs_nothing(async_llm, offline_llm):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    good = random_prompts(2, 2)
    expected = [o.outputs[0].token_ids for o in offline_llm.generate(good, params)]
    bad_prompts = [
        ({"prompt": PAD, "multi_modal_data": {"image": b"not an image"}}, "image"),
        ({"prompt": PAD * 3, "multi_modal_data": {"image": [image(1), image(2), image(3)]}}, "limit"),
        ("word " * 600, "max_model_len"),
    ]

    async def main():
        tasks = [asyncio.create_task(collect(async_llm, p, params)) for p in good]
        for prompt, message in bad_prompts:
            generator = async_llm.generate(prompt, params)
            with pytest.raises(InvalidInputError, match=message):
                await generator.__anext__()
        return await asyncio.gather(*tasks)

    streams = run(main())
    assert [s[-1].outputs[0].token_ids for s in streams] == expected
    run(assert_idle_and_clean(async_llm))


def test_duplicate_request_id_is_rejected_without_touching_the_first(async_llm):
    async def main():
        first = await async_llm.add_request("first prompt", LONG, "same-id")
        await first.__anext__()
        with pytest.raises(InvalidInputError, match="already in use"):
            await async_llm.add_request("second prompt", LONG, "same-id")
        second_output = await first.__anext__()  # still streaming
        assert not second_output.finished
        first.close()
        await assert_idle_and_clean(async_llm)
        assert finish_reason(async_llm, "same-id") == "abort"

    run(main())


def test_abort_ends_the_stream_and_frees_everything(async_llm):
    prompt = {"prompt": "look " + PAD, "multi_modal_data": {"image": image(5)}}

    async def main():
        outputs = []
        async for output in async_llm.generate(prompt, LONG, "to-abort"):
            outputs.append(output)
            if len(outputs) == 3:
                stats = async_llm.stats  # published after the step before this output's step
                assert stats.num_running == 1 and stats.num_free_kv_blocks < stats.num_kv_blocks
                await async_llm.abort("to-abort")
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
        assert len(outputs[-1].outputs[0].token_ids) < LONG.max_tokens
        await assert_idle_and_clean(async_llm)
        assert async_llm.stats.num_running == 0 and async_llm.stats.num_free_kv_blocks == async_llm.stats.num_kv_blocks

    run(main())


@pytest.mark.parametrize("how", ["cancel", "aclose", "break"])
def test_a_consumer_that_stops_early_aborts_its_request(async_llm, how):
    prompt = {"prompt": "stop early " + PAD, "multi_modal_data": {"image": image(6)}}

    request_id = f"leaves-by-{how}"

    async def consume(seen: asyncio.Event):
        generator = async_llm.generate(prompt, LONG, request_id)
        if how == "break":
            async with contextlib.aclosing(generator):
                async for _ in generator:
                    break
            return
        await generator.__anext__()
        if how == "aclose":
            await generator.aclose()
            return
        seen.set()
        async for _ in generator:
            pass

    async def main():
        seen = asyncio.Event()
        task = asyncio.create_task(consume(seen))
        if how == "cancel":
            await seen.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await task
        await assert_idle_and_clean(async_llm)
        assert finish_reason(async_llm, request_id) == "abort"

    run(main())


def test_cancelled_while_being_queued_leaves_nothing_behind(async_llm):
    async def main():
        for attempt in range(5):
            prompt = {"prompt": PAD, "multi_modal_data": {"image": image(9)}}
            task = asyncio.create_task(collect(async_llm, prompt, LONG, f"cancelled-early-{attempt}"))
            await asyncio.sleep(0)  # let it start processing the input, then leave
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await assert_idle_and_clean(async_llm)
        for attempt in range(5):  # either never queued or aborted; never run to its length
            assert finish_reason(async_llm, f"cancelled-early-{attempt}") in (None, "abort")

    run(main())


def test_idle_engine_does_not_step(async_llm):
    async def main():
        await wait_idle(async_llm)
        calls = []

        def count_steps(engine):
            original = engine.step
            engine.step = lambda: calls.append(1) or original()
            return original

        original = await async_llm.run_in_engine(count_steps)
        await asyncio.sleep(0.2)
        idle_calls = len(calls)
        outputs = await collect(async_llm, "one more", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        await async_llm.run_in_engine(lambda engine: setattr(engine, "step", original))
        assert idle_calls == 0 and len(calls) >= 3 and outputs[-1].finished

    run(main())


def test_an_engine_failure_reaches_every_stream_and_marks_the_engine_dead():
    llm = make_async_llm()
    try:

        async def main():
            streams = [await llm.add_request(f"prompt {i}", LONG) for i in range(3)]
            for stream in streams:
                await stream.__anext__()

            def broken_step():
                raise RuntimeError("simulated device fault")

            await llm.run_in_engine(lambda engine: setattr(engine, "step", broken_step))
            for stream in streams:
                with pytest.raises(EngineDeadError, match="simulated device fault"):
                    async for _ in stream:
                        pass
            assert not llm.is_running
            with pytest.raises(EngineDeadError, match="simulated device fault"):
                await llm.add_request("after death", LONG)
            with pytest.raises(EngineDeadError):
                await llm.run_in_engine(lambda engine: None)

        run(main())
    finally:
        llm.shutdown()


def test_shutdown_ends_open_streams():
    llm = make_async_llm()

    async def main():
        stream = await llm.add_request("will be cut", LONG)
        await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, llm.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass

    run(main())
    llm.shutdown()  # twice is fine
